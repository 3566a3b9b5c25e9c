"""Compression on the tiny model: merge, int8, pruning, ONNX, and no unsafe torch.load in the package."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from ftkit import DataError, compress

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def _rows(fixtures: Path, split: str) -> list[tuple[str, str]]:
    with open(fixtures / "textcls" / f"{split}.csv", newline="", encoding="utf-8") as fh:
        return [(r["text"], r["label"]) for r in csv.DictReader(fh)]


def _write_run(model, tok, run_dir: Path, task: str = "text-classification", lora: bool = False) -> Path:
    if not lora:
        model.save_pretrained(run_dir)
    tok.save_pretrained(run_dir)
    info = {"task": task, "max_length": 64, "long_text": "head", "stride": 0, "lora": lora, "base_model": ""}
    if model is not None:
        info["labels"] = [model.config.id2label[i] for i in range(model.config.num_labels)]
    (run_dir / "ftkit_run.json").write_text(json.dumps(info))
    return run_dir


@pytest.fixture(scope="module")
def cls_run(tiny_model, tmp_path_factory, fixtures=Path(__file__).parent / "fixtures") -> Path:
    """A tiny classifier trained to fit the fixture CSV, so that its predictions have real margins."""
    torch.manual_seed(0)
    labels = sorted({label for _, label in _rows(fixtures, "train")})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    rows = _rows(fixtures, "train")
    batch = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    y = torch.tensor([labels.index(label) for _, label in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(**batch, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    return _write_run(model.eval(), tok, tmp_path_factory.mktemp("cls-run"))


@pytest.fixture(scope="module")
def texts(fixtures=Path(__file__).parent / "fixtures") -> list[str]:
    return [t for split in ("train", "validation", "test") for t, _ in _rows(fixtures, split)]


def _logits(model, tok, texts) -> np.ndarray:
    """Logits of all texts in one padded batch (padding included on purpose: masks must work)."""
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()


def test_merge_lora_matches_adapter_model(tiny_model, tmp_path, texts):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    lora_cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    peft_model = get_peft_model(base, lora_cfg)
    # lora_B starts at zero (merge would be trivially equal): give the adapter real weights.
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    run = tmp_path / "lora-run"
    peft_model.save_pretrained(run / "adapter")
    base.config.save_pretrained(run)
    _write_run(None, tok, run, lora=True)
    info = json.loads((run / "ftkit_run.json").read_text())
    (run / "ftkit_run.json").write_text(json.dumps({**info, "base_model": tiny_model}))

    out = compress.compress_run(run, tmp_path / "merged", merge_lora=True)

    assert not (out / "adapter").exists() and (out / "model.safetensors").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers load
    assert type(merged).__name__ == "BertForSequenceClassification"
    peft_model.eval()
    expected = _logits(peft_model, tok, texts)
    got = _logits(merged, tok, texts)
    with peft_model.disable_adapter():
        lora_effect = np.abs(expected - _logits(peft_model, tok, texts)).max()
    assert lora_effect > 1e-3  # the adapter matters, so equality below means something
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert json.loads((out / "ftkit_run.json").read_text())["lora"] is False


def test_onnx_export_matches_pytorch(cls_run, tmp_path, texts):
    out = compress.export_onnx(cls_run, tmp_path / "onnx", texts=texts)

    record = json.loads((out / "compress.json").read_text())
    assert record["format"] == "onnx" and record["onnx_max_abs_diff"] <= compress.ONNX_ATOL
    tok = AutoTokenizer.from_pretrained(out)
    expected = _logits(compress.load_torch_model(cls_run), tok, texts)
    got = _logits(compress.load_compressed(out), tok, texts)  # other lengths and batch sizes than the export
    np.testing.assert_allclose(got, expected, atol=compress.ONNX_ATOL, rtol=0)


@pytest.fixture(scope="module")
def int8_run(cls_run, tmp_path_factory) -> Path:
    return compress.compress_run(cls_run, tmp_path_factory.mktemp("int8") / "int8", quantize="int8")


def test_int8_loads_without_pickle_and_keeps_labels(cls_run, int8_run, texts):
    out = int8_run

    files = {p.name for p in out.iterdir()}
    assert "model.int8.onnx" in files and "model.onnx" not in files and "compress.json" in files
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in out.iterdir())
    import onnx

    graph = onnx.load(str(out / "model.int8.onnx")).graph
    weights = {init.name for init in graph.initializer}
    float_linear = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]
    assert float_linear == []  # every weight matmul is int8; activation x activation (attention) stays fp32
    assert (
        sum(n.op_type == "MatMulInteger" for n in graph.node) == 2 * 6 + 2
    )  # q k v o ffn1 ffn2, pooler, head
    tok = AutoTokenizer.from_pretrained(out)
    model = compress.load_compressed(out)
    assert model.config.id2label == compress.load_torch_model(cls_run).config.id2label
    fp32 = _logits(compress.load_torch_model(cls_run), tok, texts).argmax(-1)
    int8 = _logits(model, tok, texts).argmax(-1)
    assert (fp32 == int8).mean() >= 0.9


def test_bench_predict_writes_table(cls_run, int8_run, tmp_path, fixtures):
    from ftkit.bench import PIPELINE, bench_predict

    result = bench_predict(
        [cls_run, int8_run],
        test_file=fixtures / "textcls" / "test.csv",
        label_column="label",
        speed_texts=8,
        latency_texts=2,
        rounds=1,
        out_dir=tmp_path,
    )

    rows = result["rows"]
    assert list(rows)[0] == PIPELINE and len(rows) == 3
    fp32_row = next(r for name, r in rows.items() if name.startswith(cls_run.name))
    # Same model, same truncation: the pipeline and ftkit's predict path agree on every label.
    assert rows[PIPELINE]["accuracy"] == fp32_row["accuracy"] > 0.5
    assert rows[PIPELINE]["speedup_vs_pipeline"] == 1.0
    assert all(
        r["throughput_per_s"] > 0 and r["latency_p95_ms"] >= r["latency_p50_ms"] for r in rows.values()
    )
    assert json.loads((tmp_path / "bench_predict.json").read_text())["rows"] == rows
    assert (tmp_path / "bench_predict.md").read_text().count("\n| ") == 4  # header + 3 rows


def test_gated_heads_equal_physically_pruned_model(cls_run):
    """Removing heads/neurons must compute exactly what zeroing them computes."""
    tok = AutoTokenizer.from_pretrained(cls_run)
    batch = dict(tok(["Goal scored in the match today.", "A chip"], padding=True, return_tensors="pt"))
    model = compress.load_torch_model(cls_run)
    keep_heads, keep_ffn = [[0, 2], [1]], [list(range(0, 64, 2)), list(range(10))]
    hooks = []
    for layer, heads, ffn in zip(compress._layers(model), keep_heads, keep_ffn, strict=True):
        head_mask = torch.zeros(4).index_fill_(0, torch.tensor(heads), 1.0).repeat_interleave(8)
        ffn_mask = torch.zeros(64).index_fill_(0, torch.tensor(ffn), 1.0)
        hooks.append(
            layer.attention.output.dense.register_forward_pre_hook(lambda m, a, k=head_mask: (a[0] * k,))
        )
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, a, k=ffn_mask: (a[0] * k,)))
    with torch.no_grad():
        masked = model(**batch).logits
    for hook in hooks:
        hook.remove()
    layers = compress.prune_model(model, keep_heads, keep_ffn)
    with torch.no_grad():
        pruned = model(**batch).logits
    assert layers == [{"heads": 2, "intermediate": 32}, {"heads": 1, "intermediate": 10}]
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)


def test_pruned_model_has_fewer_heads_runs_and_reloads(cls_run, tmp_path, texts):
    out = compress.compress_run(
        cls_run,
        tmp_path / "pruned",
        prune_heads=0.5,
        prune_ffn=0.5,
        recover_steps=3,
        texts=texts,
        batch_size=8,
    )

    record = json.loads((out / "compress.json").read_text())
    assert sum(layer["heads"] for layer in record["layers"]) == 4  # of 2 layers x 4 heads
    assert all(layer["intermediate"] == 32 for layer in record["layers"])  # of 64
    model = compress.load_compressed(out)
    heads = [compress._num_heads(layer) for layer in compress._layers(model)]
    assert sum(heads) == 4 and min(heads) >= 1
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < sum(p.numel() for p in compress.load_torch_model(cls_run).parameters())
    tok = AutoTokenizer.from_pretrained(out)
    logits = _logits(model, tok, texts)
    assert logits.shape == (len(texts), model.config.num_labels) and np.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="mismatched"):  # pruned shapes never load silently as full
        AutoModelForSequenceClassification.from_pretrained(out)
    info = json.loads((out / "ftkit_run.json").read_text())
    (out / "ftkit_run.json").write_text(json.dumps({**info, "task": "summarization"}))
    with pytest.raises(DataError, match=r"ftkit_run.json: pruned layers of a 'summarization' run"):
        compress.load_compressed(out)  # a clear refusal, not a KeyError


def test_recovery_that_moves_away_from_the_teacher_is_dropped(cls_run, tmp_path, texts, monkeypatch):
    kwargs = {"prune_heads": 0.25, "texts": texts, "batch_size": 8}
    plain = compress.compress_run(cls_run, tmp_path / "plain", **kwargs)

    def harmful(model, teacher, batches, steps, lr=1e-5):  # stands for a recovery that overshoots
        with torch.no_grad():
            model.classifier.weight.mul_(-1.0)
        return [1.0] * steps

    monkeypatch.setattr(compress, "recover", harmful)
    out = compress.compress_run(cls_run, tmp_path / "harmed", recover_steps=5, **kwargs)
    record = json.loads((out / "compress.json").read_text())
    before, after = record["recover_gap_before_after"]
    assert after > before and record["recover_kept"] is False
    from safetensors.torch import load_file

    saved, expected = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)  # the unrecovered pruned model


def test_recover_brings_a_perturbed_student_back_to_its_teacher(cls_run, texts):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(cls_run)
    teacher = compress.load_torch_model(cls_run).eval()
    student = compress.load_torch_model(cls_run)
    with torch.no_grad():
        # Small enough for 40 AdamW steps at 3e-3 (each moves a weight by at most about lr) to undo.
        student.classifier.weight.add_(0.05 * torch.randn_like(student.classifier.weight))
    # Only the head trains: AdamW moves every weight by about lr per step whatever its gradient, which
    # at a learning rate this tiny model needs scrambles its small random body (hence 1e-5 by default).
    for name, param in student.named_parameters():
        param.requires_grad = name.startswith("classifier")
    for module in student.modules():  # dropout noise would swamp so small a gap
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batches = compress._batches(tok, texts, 8, 64)
    before = compress.distillation_gap(student, teacher, batches)
    losses = compress.recover(student, teacher, batches, steps=40, lr=3e-3)
    after = compress.distillation_gap(student, teacher, batches)
    assert len(losses) == 40 and after < before / 2


def test_recovery_that_closes_the_gap_is_kept(cls_run, tmp_path, texts, monkeypatch):
    kwargs = {"prune_heads": 0.5, "texts": texts, "batch_size": 8}
    plain = compress.compress_run(cls_run, tmp_path / "plain", **kwargs)
    real = compress.recover
    # A learning rate the tiny random model moves at (the default suits a real fine-tuned encoder).
    monkeypatch.setattr(compress, "recover", lambda m, t, b, steps: real(m, t, b, steps, lr=1e-2))
    # Whether recovery helps a tiny random model is luck (its pruned heads barely matter); what is
    # tested here is that a recovery judged helpful is the one saved.
    gaps = iter([1.0, 0.5])
    monkeypatch.setattr(compress, "distillation_gap", lambda model, teacher, batches: next(gaps))
    out = compress.compress_run(cls_run, tmp_path / "recovered", recover_steps=5, **kwargs)
    record = json.loads((out / "compress.json").read_text())
    assert record["recover_gap_before_after"] == [1.0, 0.5] and record["recover_kept"] is True
    from safetensors.torch import load_file

    saved, unrecovered = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert any(not torch.equal(saved[k], unrecovered[k]) for k in unrecovered)


def test_importance_ranks_a_disabled_head_last(cls_run, texts):
    tok = AutoTokenizer.from_pretrained(cls_run)
    model = compress.load_torch_model(cls_run)
    # Zero the output projection of head 3 in layer 0: it cannot affect the loss, so its importance is 0.
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 24:32] = 0
    heads, ffn = compress.estimate_importance(model, compress._batches(tok, texts, 8, 64))
    assert heads[0][3].item() == pytest.approx(0.0, abs=1e-9)
    assert all(h.shape == (4,) for h in heads) and all(f.shape == (64,) for f in ffn)
    keep_heads, _ = compress.select_units(heads, ffn, 0.25, 0.0)
    assert 3 not in keep_heads[0] and sum(map(len, keep_heads)) == 6


def test_pruned_int8_token_classification(tiny_model, tmp_path, texts):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3).eval()
    run = _write_run(model, tok, tmp_path / "ner-run", task="token-classification")

    pruned = compress.compress_run(run, tmp_path / "ner-p25", prune_heads=0.25, texts=texts, recover_steps=2)
    out = compress.compress_run(pruned, tmp_path / "ner-p25-int8", quantize="int8")  # quantize the pruned run

    record = json.loads((out / "compress.json").read_text())
    assert record["file"] == "model.int8.onnx" and record["source"] == str(pruned)
    assert sum(layer["heads"] for layer in record["layers"]) == 6  # carried over from the pruned source
    fp32 = _logits(compress.load_compressed(pruned), tok, texts[:5])
    int8 = _logits(compress.load_compressed(out), tok, texts[:5])
    assert int8.shape == fp32.shape == (5, max(len(ids) for ids in tok(texts[:5])["input_ids"]), 3)
    mask = tok(texts[:5], padding=True, return_tensors="np")["attention_mask"].astype(bool)
    assert (int8.argmax(-1) == fp32.argmax(-1))[mask].mean() >= 0.8


def test_onnx_of_a_case_feature_ner_run_takes_the_word_shapes(tiny_model, tmp_path, texts):
    from ftkit.ner import add_case_types, predict_word_logits

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3).eval()
    add_case_types(model)
    with torch.no_grad():  # as after training: each case type has an embedding of its own
        model.bert.embeddings.token_type_embeddings.weight.normal_()
    run = _write_run(model, tok, tmp_path / "ner-cased", task="token-classification")
    info = json.loads((run / "ftkit_run.json").read_text())
    (run / "ftkit_run.json").write_text(json.dumps({**info, "case_feature": True}))

    out = compress.export_onnx(run, tmp_path / "ner-cased-onnx", texts=texts)
    onnx_model = compress.load_compressed(out)
    assert [i.name for i in onnx_model.session.get_inputs()] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    words = [["Anna", "Berg", "visited", "NATO", "in", "Tokyo", "."], ["Reuters", "said", "so"]]
    expected = predict_word_logits(model, tok, words, 64, 8, case_feature=True)
    got = predict_word_logits(onnx_model, tok, words, 64, 8, case_feature=True)
    for x, y in zip(got, expected, strict=True):
        assert np.abs(x - y).max() <= compress.ONNX_ATOL
    blind = predict_word_logits(onnx_model, tok, words, 64, 8)  # word shapes missing: other logits
    assert not np.allclose(blind[0], expected[0], atol=compress.ONNX_ATOL)


def test_compress_needs_texts_for_pruning(cls_run, tmp_path):
    with pytest.raises(ValueError, match="validation texts"):
        compress.compress_run(cls_run, tmp_path / "x", prune_heads=0.3)


def _unsafe_torch_loads(source: str) -> list[int]:
    """Line numbers of `torch.load(...)` calls without a literal `weights_only=True`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
        ):
            lines.append(node.lineno)
    return lines


def test_unsafe_torch_load_scanner_catches_bad_calls():
    bad = "import torch\nx = torch.load(f, map_location=torch.device('cpu'))\ny = torch.load(f, weights_only=False)\n"
    good = "import torch\nx = torch.load(f, map_location=torch.device('cpu'), weights_only=True)\n"
    assert _unsafe_torch_loads(bad) == [2, 3] and _unsafe_torch_loads(good) == []


def test_package_never_calls_torch_load_without_weights_only():
    package = Path(compress.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) >= 2
    offenders = {str(p): _unsafe_torch_loads(p.read_text(encoding="utf-8")) for p in sources}
    assert {p: lines for p, lines in offenders.items() if lines} == {}


def test_cut_to_tokens_gives_every_variant_the_same_short_texts(cls_run):
    from ftkit.bench import cut_to_tokens

    tok = AutoTokenizer.from_pretrained(cls_run)
    long_text = " ".join(["the match was won by the home team after a late goal"] * 20)
    short_text = "a goal"
    cut_long, cut_short = cut_to_tokens(tok, [long_text, short_text], 16)
    assert len(tok(cut_long)["input_ids"]) <= 16 < len(tok(long_text)["input_ids"])
    assert tok(cut_short)["input_ids"] == tok(short_text)["input_ids"]  # nothing to cut: the same tokens
