import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForTokenClassification, AutoTokenizer

from ftkit import DataError
from ftkit.conll import Sentence, read_conll
from ftkit.ner import (
    CASE_TYPES,
    add_case_types,
    count_invalid,
    decode_tags,
    encode_pieces,
    encode_sentences,
    entity_metrics,
    entity_spans,
    find_entities,
    group_sentences,
    label_list,
    merge_windows,
    plan_windows,
    score_spans,
    split_words,
    use_case_feature,
    word_pieces,
    word_shape,
)
from ftkit.text import special_tokens_template


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_plan_windows_overlap_by_stride_and_fit_the_budget():
    counts = [1, 2, 1, 1, 3, 1, 1, 2, 1]
    # The last window reaches back to fill the budget instead of leaving it half empty.
    assert plan_windows(counts, budget=5, stride=0) == [(0, 4), (4, 7), (5, 9)]
    # Overlap is whole words worth <= 2 sub-tokens: words 2-3 are shared; word 4 (3 sub-tokens) is not.
    assert plan_windows(counts, budget=5, stride=2) == [(0, 4), (2, 5), (5, 9)]
    assert plan_windows(counts, budget=100, stride=10) == [(0, 9)]
    assert plan_windows([], budget=5, stride=2) == []
    # A stride as large as the window still moves forward.
    assert plan_windows([1, 1, 1], budget=2, stride=5) == [(0, 2), (1, 3)]


def test_score_spans_split_overlaps_in_the_middle():
    assert score_spans([(0, 6), (2, 8), (6, 10)]) == [(0, 4), (4, 7), (7, 10)]
    assert score_spans([(0, 3), (3, 5)]) == [(0, 3), (3, 5)]


def test_labels_sit_on_the_first_sub_token(tok):
    words = ["Zanzibar", "visited", "Tokyo", "\u200b", "."]
    labels = [[7, 0, 1, 0, 0]]
    features = encode_pieces(word_pieces(tok, [words]), [[0]], special_tokens_template(tok), 64, 8, labels)
    (ids,), (row_labels,), (word_index,) = (
        features.rows["input_ids"],
        features.rows["labels"],
        features.rows["word_index"],
    )
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert len(tokens) > len(words) + 2  # the tiny vocab splits words into several pieces
    firsts = [i for i, w in enumerate(word_index) if w >= 0]
    assert [row_labels[i] for i in firsts] == labels[0]
    assert [tokens[i] for i in firsts][3] == "[UNK]"  # a word the tokenizer drops still gets a token
    assert sum(x != -100 for x in row_labels) == len(words)
    # The sub-tokens of each word, in order, spell the lower-cased word.
    bounds = [*firsts, len(tokens) - 1]
    assert "".join(tokens[bounds[0] : bounds[1]]).replace("##", "") == "zanzibar"


def test_long_sentence_is_windowed_not_cut(tok, fixtures):
    sentences = read_conll(fixtures / "ner" / "test.conll")
    labels = label_list(sentences)
    label2id = {x: i for i, x in enumerate(labels)}
    features = encode_sentences(tok, sentences, max_length=32, stride=8, label2id=label2id)
    assert features.n_long >= 1
    assert len(features.windows) > len(sentences)
    assert max(features.rows["length"]) <= 32
    merged = merge_windows(features, features.rows["labels"])
    assert [[labels[i] for i in m] for m in merged] == [s.tags for s in sentences]


def test_document_context_packs_neighbours_and_scores_each_word_once(tok, fixtures):
    sentences = read_conll(fixtures / "ner" / "train.conll")
    label2id = {x: i for i, x in enumerate(label_list(sentences))}
    groups = group_sentences([s.doc_id for s in sentences], "document")
    assert len(groups) == 4 and sum(map(len, groups)) == len(sentences)
    features = encode_sentences(tok, sentences, 64, 16, context="document", label2id=label2id)
    assert len(features.windows) < len(sentences)  # several sentences share a window
    # Windows never mix documents: each window belongs to one group.
    assert {w.seq for w in features.windows} == set(range(4))
    merged = merge_windows(features, features.rows["labels"])
    assert [[label2id[t] for t in s.tags] for s in sentences] == merged
    with pytest.raises(ValueError, match="context"):
        group_sentences([0], "paragraph")


def test_merge_detects_a_word_scored_twice(tok):
    features = encode_sentences(tok, [Sentence(["a", "b"], ["O", "O"])], 16, 0)
    features.rows["word_index"][0] = [-1, 0, 0, -1]
    with pytest.raises(RuntimeError, match="scored"):
        merge_windows(features, [[0, 0, 0, 0]])


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.lists(st.integers(1, 6), max_size=40), min_size=1, max_size=6),
    docs=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    max_length=st.integers(3, 24),
    stride=st.integers(0, 24),
    context=st.sampled_from(["sentence", "document"]),
)
def test_property_every_word_gets_exactly_one_prediction(counts, docs, max_length, stride, context):
    # Fake sub-token splits: word w of sentence i has counts[i][w] pieces.
    pieces = [[[100 + i] * c for c in sent] for i, sent in enumerate(counts)]
    labels = [[(7 * i + w) % 9 for w in range(len(sent))] for i, sent in enumerate(counts)]
    groups = group_sentences(sorted(docs[: len(counts)]), context)
    features = encode_pieces(pieces, groups, ([1], [2]), max_length, stride, labels)
    assert all(length <= max_length for length in features.rows["length"])
    # Gold labels round-trip through the windows.
    assert merge_windows(features, features.rows["labels"]) == labels
    # Any per-row prediction (here: the row number) gives each word exactly one value.
    rows = [[r] * n for r, n in enumerate(features.rows["length"])]
    merged = merge_windows(features, rows)
    assert [len(m) for m in merged] == [len(s) for s in counts]
    assert all(v is not None for m in merged for v in m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=30),
    max_length=st.integers(4, 20),
    stride=st.integers(0, 10),
)
def test_property_real_tokenizer_random_words(tok, words, max_length, stride):
    tags = ["B-PER" if i % 3 == 0 else "O" for i in range(len(words))]
    label2id = {"O": 0, "B-PER": 1, "I-PER": 2}
    features = encode_sentences(tok, [Sentence(words, tags)], max_length, stride, label2id=label2id)
    assert max(features.rows["length"]) <= max_length
    assert merge_windows(features, features.rows["labels"]) == [[label2id[t] for t in tags]]


def test_entity_metrics_strict_iob2_and_invalid_count():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["I-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    m = entity_metrics(gold, pred)
    # Strict mode does not accept the I-PER I-PER chunk: 2 of 3 entities found, both right.
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["PER_recall"] == 0.0 and m["LOC_f1"] == 1.0 and m["ORG_support"] == 1.0
    assert m["invalid_sequences"] == 1.0
    assert m["accuracy"] == pytest.approx(5 / 6) and m["words"] == 6
    with pytest.raises(ValueError, match="exactly one"):
        entity_metrics(gold, [p[:-1] for p in pred])


def test_entity_spans_and_split_words_offsets():
    assert entity_spans(["B-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG", "I-ORG"]) == [
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("ORG", 4, 5),
        ("ORG", 5, 7),
    ]
    text = "The U.S. envoy met Anna Berg's team in New-York, \u00a0Tokyo! O'Neill paid 3.5 m"
    words = split_words(text)
    assert [w for w, _, _ in words] == [
        "The",
        "U.S.",
        "envoy",
        "met",
        "Anna",
        "Berg",
        "'s",
        "team",
        "in",
        "New-York",
        ",",
        "Tokyo",
        "!",
        "O'Neill",
        "paid",
        "3.5",
        "m",
    ]
    assert all(text[a:b] == w for w, a, b in words)


def test_find_entities_offsets_slice_back(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    labels = ["O", "B-PER", "I-PER"]
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    # Make every word a PER entity of its own, so the expected output is known.
    model.classifier.bias.data = model.classifier.bias.data.new_tensor([0.0, 50.0, 0.0])
    long_text = " ".join(["Anna Berg visited Tokyo."] * 12)
    texts = ["Anna Berg works for Acme Corp in Berlin.", "", long_text]
    out = find_entities(model, tok, texts, max_length=16, stride=4)
    assert out[1] == []
    for text, entities in zip(texts, out, strict=True):
        assert [e["text"] for e in entities] == [w for w, _, _ in split_words(text)]
        assert all(text[e["start"] : e["end"]] == e["text"] and e["type"] == "PER" for e in entities)
        assert all(0.99 < e["score"] <= 1.0 for e in entities)
    assert len(out[2]) == 12 * 5  # windowed: every word of the long text is predicted once


def test_word_pieces_match_the_tokenizer(tok):
    words = ["Nordic", "Bank", "opened"]
    assert [t for p in word_pieces(tok, [words])[0] for t in p] == tok(
        " ".join(words), add_special_tokens=False
    )["input_ids"]
    assert np.array_equal(special_tokens_template(tok)[0], [tok.cls_token_id])


def test_merge_detects_reordered_rows(tok, fixtures):
    sentences = read_conll(fixtures / "ner" / "valid.conll")
    label2id = {x: i for i, x in enumerate(label_list(sentences))}
    features = encode_sentences(tok, sentences, 32, 8, label2id=label2id)
    labels = features.rows["labels"]
    assert len(merge_windows(features, labels, labels)) == len(sentences)
    with pytest.raises(RuntimeError, match="reordered"):
        merge_windows(features, labels, labels[1:] + labels[:1])


NAMES = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5), min_size=5, max_size=5), max_size=12))
def test_property_viterbi_is_valid_and_agrees_with_a_valid_argmax(rows):
    logits = np.array(rows).reshape(-1, 5)
    best = decode_tags(logits, NAMES)
    argmax = decode_tags(logits, NAMES, "argmax")
    assert len(best) == len(rows) and count_invalid([best]) == 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) if len(rows) else logits

    def score(tags):
        return sum(log_probs[i, NAMES.index(t)] for i, t in enumerate(tags))

    # Viterbi finds the best valid path: as good as the argmax when that is valid (ties aside), and at
    # least as good as the argmax repaired by hand (an I- that cannot continue becomes B-).
    repaired = [
        "B" + t[1:] if t.startswith("I") and count_invalid([argmax[: i + 1]]) else t
        for i, t in enumerate(argmax)
    ]
    assert count_invalid([repaired]) == 0
    assert score(best) >= score(repaired) - 1e-9
    if count_invalid([argmax]) == 0:
        assert score(best) == pytest.approx(score(argmax))


def test_word_shapes():
    shapes = {
        w: CASE_TYPES[word_shape(w)] for w in ["paris", "Paris", "NATO", "U.S.", "A", "iPhone", "3-1", ","]
    }
    assert shapes == {
        "paris": "no capital",
        "Paris": "Capitalized",
        "NATO": "ALL CAPS",
        "U.S.": "ALL CAPS",
        "A": "Capitalized",
        "iPhone": "miXed",
        "3-1": "no capital",
        ",": "no capital",
    }


def test_case_feature_types_every_sub_token_of_a_word(tok):
    sentence = Sentence(["EU", "rejects", "Zanzibar", "call", "."], ["B-ORG", "O", "B-LOC", "O", "O"])
    label2id = {x: i for i, x in enumerate(label_list([sentence]))}
    plain = encode_sentences(tok, [sentence], 64, 8, label2id=label2id)
    cased = encode_sentences(tok, [sentence], 64, 8, label2id=label2id, case_feature=True)
    assert "token_type_ids" not in plain.rows
    assert cased.rows["input_ids"] == plain.rows["input_ids"] and cased.rows["labels"] == plain.rows["labels"]
    pieces = word_pieces(tok, [sentence.tokens])[0]
    expected = [0] + [word_shape(w) for w, p in zip(sentence.tokens, pieces, strict=True) for _ in p] + [0]
    assert cased.rows["token_type_ids"] == [expected]
    assert len(pieces[2]) > 1 and expected.count(1) == len(pieces[2])  # all of "Zanzibar", nothing else


def test_add_case_types_starts_from_the_pretrained_model(tiny_model, tok):
    model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3).eval()
    batch = tok(["Anna visited NATO in Paris"], return_tensors="pt")
    before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    add_case_types(model)
    assert model.config.type_vocab_size == len(CASE_TYPES)
    types = torch.arange(batch["input_ids"].numel()).remainder(len(CASE_TYPES)).view_as(batch["input_ids"])
    after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=types)
    torch.testing.assert_close(after.logits, before, atol=1e-6, rtol=0)
    # A new token type is a parameter of its own: training can move it away from type 0.
    with torch.no_grad():
        # Not a constant: LayerNorm right after the embeddings would subtract a uniform shift again.
        weight = model.bert.embeddings.token_type_embeddings.weight
        weight[2] += torch.linspace(-1.0, 1.0, weight.shape[1])
    moved = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=types)
    assert not torch.allclose(moved.logits, before)


def test_case_feature_auto_follows_the_tokenizer_and_model(tiny_model, tok):
    from transformers import DistilBertConfig, DistilBertForTokenClassification

    bert = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3)
    assert use_case_feature("auto", tok, bert)  # the tiny tokenizer lowercases, as MiniLM's does
    assert not use_case_feature("off", tok, bert)
    cased = AutoTokenizer.from_pretrained(tiny_model, do_lower_case=False)
    cased.backend_tokenizer.normalizer = None  # a cased tokenizer keeps "Paris" apart from "paris"
    assert not use_case_feature("auto", cased, bert) and use_case_feature("on", cased, bert)
    distil = DistilBertForTokenClassification(
        DistilBertConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=3)
    )
    assert not use_case_feature("auto", tok, distil)  # no token types to carry it
    with pytest.raises(DataError, match="no token-type embeddings"):
        use_case_feature("on", tok, distil)
    # `case_feature: off` in YAML is a boolean there and reaches the option as "False".
    assert not use_case_feature("False", tok, bert) and use_case_feature("True", cased, bert)
    with pytest.raises(DataError, match="must be auto, on or off"):
        use_case_feature("sometimes", tok, bert)
