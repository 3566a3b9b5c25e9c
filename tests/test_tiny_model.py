from transformers import AutoModelForSequenceClassification, AutoTokenizer


def test_tiny_model_loads_and_tokenizes(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    enc = tok(["Goal scored in the match.", "A new chip for the server"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.cls_token_id
    assert tok.unk_token_id not in enc["input_ids"][0].tolist()
    assert model(**enc).logits.shape == (2, 3)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
