"""The multi-task recipe on the tiny model: per-head losses and metrics, heads alone, save/load, LoRA, 2 ranks."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import multitask  # noqa: E402

from ftkit import DataError  # noqa: E402
from ftkit.conll import read_conll  # noqa: E402
from ftkit.multitask import (  # noqa: E402
    MultiTaskTagger,
    head_metrics,
    predict_head_logits,
    predict_multitask,
)
from ftkit.ner import decode_tags, group_sentences  # noqa: E402
from ftkit.predict import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "fixtures" / "ner"
COLUMNS = {"ner": (3, "auto"), "pos": (1, "none"), "chunk": (2, "auto")}
HEADS = {"ner": "f1", "pos": "accuracy", "chunk": "f1"}


def recipe_args(tiny_model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(DATA / "train.conll"),
        "--validation_file", str(DATA / "valid.conll"),
        "--test_file", str(DATA / "test.conll"),
        "--output_dir", str(out),
        "--max_length", "32",  # the long fixture sentences need several windows
        "--stride", "8",
        "--num_train_epochs", "8",
        "--learning_rate", "5e-3",
        "--logging_steps", "5",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask") / "full"
    return out, multitask.main(recipe_args(tiny_model, out))


def test_conll_reads_several_tag_columns_each_in_its_scheme(tmp_path):
    sentences = read_conll(DATA / "train.conll", columns=COLUMNS)
    first = sentences[0]
    assert first.tags == first.layers["ner"] and list(first.layers) == ["ner", "pos", "chunk"]
    assert first.layers["pos"][:3] == ["NNP", "NNP", "NN"]  # plain labels, as written
    assert first.layers["chunk"][:2] == ["B-NP", "I-NP"]  # the fixture's IOB1 "I-NP I-NP", as IOB2
    # One column only: the reader as before.
    assert [s.tags for s in read_conll(DATA / "train.conll")] == [s.layers["ner"] for s in sentences]
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP B-NP B-ORG\nrejects VBZ E-VP O\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.conll:2 \(column 2, chunk\): tag 'E-VP' is outside the IOB1"):
        read_conll(bad, columns={"ner": (3, "auto"), "chunk": (2, "IOB1")})


def test_every_head_has_its_losses_and_metrics(full_run):
    out, results = full_run
    for split in ("eval", "test"):
        for head, metric in HEADS.items():
            assert 0 <= results[f"{split}_{head}_{metric}"] <= 1
            assert results[f"{split}_{head}_loss"] > 0
        # The reported loss is the training objective: the weighted (here: plain) sum of the heads' losses.
        assert results[f"{split}_loss"] == pytest.approx(sum(results[f"{split}_{h}_loss"] for h in HEADS))
    assert results["test_chunk_NP_f1"] >= 0 and results["test_ner_PER_f1"] >= 0
    # The fixture's recurring names and tags are learnable: a model that learned nothing scores ~0.
    assert (
        results["test_ner_f1"] > 0.5 and results["test_pos_accuracy"] > 0.8 and results["test_chunk_f1"] > 0.5
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["test_ner_f1"] == results["test_ner_f1"]
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "multi-task" and list(info["heads"]) == list(HEADS)
    assert info["heads"]["pos"] == ["CD", "NN", "NNP"] and info["heads"]["chunk"] == ["O", "B-NP", "I-NP"]
    assert info["head_schemes"] == {"ner": "IOB2", "pos": "none", "chunk": "IOB2"}
    assert info["loss_weights"] == {"ner": 1.0, "pos": 1.0, "chunk": 1.0}
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (
        "[chunk]" in (out / "test_report.txt").read_text()
        and "test_pos_accuracy" in (out / "README.md").read_text()
    )
    # The predictions file gives the reported metrics, head by head.
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    for head, metric in HEADS.items():
        scheme = "none" if head == "pos" else "IOB2"
        again = head_metrics([r["gold"][head] for r in rows], [r["pred"][head] for r in rows], scheme)
        assert again[metric] == pytest.approx(results[f"test_{head}_{metric}"])


def test_loss_is_the_weighted_sum_and_a_zero_weight_head_gets_no_gradient(tiny_model):
    torch.manual_seed(0)
    labels = {"a": ["x", "y", "z"], "b": ["p", "q"]}
    model = MultiTaskTagger.from_encoder(tiny_model, labels)
    model.loss_weights = {"a": 0.3, "b": 0.0}
    ids = torch.randint(5, 50, (2, 6))
    gold = torch.stack([torch.randint(0, 3, (2, 6)), torch.randint(0, 2, (2, 6))], dim=-1)
    gold[:, 0] = -100
    out = model(input_ids=ids, labels=gold, head_losses=True)
    assert out["loss"].item() == pytest.approx(0.3 * out["loss_a"].item())
    by_hand = torch.nn.functional.cross_entropy(out["logits_b"].reshape(-1, 2), gold[..., 1].reshape(-1))
    assert out["loss_b"].item() == pytest.approx(by_hand.item())
    out["loss"].backward()
    assert model.heads.linears["b"].weight.grad.abs().sum() == 0
    assert model.heads.linears["a"].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters()), "no unused parameters (no pooler)"


def split_windows(info: dict):
    """The test split and the run's windows of it (document context): word lists and their groups."""
    sentences = read_conll(DATA / "test.conll", columns=COLUMNS)
    groups = group_sentences([s.doc_id for s in sentences], info["context"])
    return sentences, [s.tokens for s in sentences], groups


def test_a_head_alone_gives_what_it_gives_in_the_shared_model(full_run):
    out, results = full_run
    model, tok, info = load_run(out)
    sentences, words, groups = split_windows(info)
    shared = predict_head_logits(model, tok, words, list(HEADS), 32, 8, case_feature=True, groups=groups)
    for head, metric in HEADS.items():
        alone = MultiTaskTagger(copy.deepcopy(model.encoder), {head: info["heads"][head]})
        alone.heads.linears[head].load_state_dict(model.heads.linears[head].state_dict())
        logits = predict_head_logits(alone, tok, words, [head], 32, 8, case_feature=True, groups=groups)[head]
        for x, y in zip(shared[head], logits, strict=True):
            torch.testing.assert_close(torch.from_numpy(x), torch.from_numpy(y), atol=1e-5, rtol=0)
        # Evaluated alone, the head scores what the recipe reported for it.
        method = "argmax" if head == "pos" else "viterbi"
        tags = [decode_tags(x, info["heads"][head], method) for x in logits]
        alone_score = head_metrics([s.layers[head] for s in sentences], tags, info["head_schemes"][head])[
            metric
        ]
        assert alone_score == pytest.approx(results[f"test_{head}_{metric}"])


def test_reloaded_run_predicts_the_recipes_test_predictions_and_raw_text(full_run, tmp_path):
    out, _ = full_run
    model, tok, info = load_run(out)
    assert isinstance(model, MultiTaskTagger) and not model.training
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    _, words, groups = split_windows(info)
    logits = predict_head_logits(model, tok, words, list(HEADS), 32, 8, case_feature=True, groups=groups)
    for head in HEADS:
        method = "argmax" if head == "pos" else "viterbi"
        assert [decode_tags(x, info["heads"][head], method) for x in logits[head]] == [
            r["pred"][head] for r in rows
        ]
    from ftkit.cli import main as cli

    texts = tmp_path / "texts.txt"
    texts.write_text("Anna Berg works for Acme Corp in Berlin.\n\nReuters said Tokyo beat Paris 2-1.\n")
    assert cli(["predict", str(out), "--input", str(texts), "--output", str(tmp_path / "p.jsonl")]) == 0
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in got] == [f"{texts}:1", f"{texts}:3"]
    for r in got:
        assert set(r["tags"]) == set(HEADS) and set(r["spans"]) == {"ner", "chunk"}
        assert all(len(tags) == len(r["words"]) for tags in r["tags"].values())
        assert all(
            r["text"][e["start"] : e["end"]] == e["text"] for spans in r["spans"].values() for e in spans
        )
    assert any(r["spans"]["ner"] for r in got)
    assert predict_multitask(model, tok, [""], ["x"], info)[0]["tags"] == {h: [] for h in HEADS}


def test_onnx_export_keeps_every_head_and_predicts_what_torch_predicts(full_run, tmp_path):
    from ftkit.cli import main as cli
    from ftkit.compress import compress_run, export_onnx, load_compressed

    out, _ = full_run
    onnx_dir = export_onnx(out, tmp_path / "onnx")
    model = load_compressed(onnx_dir)
    assert [o.name for o in model.session.get_outputs()] == [f"logits_{h}" for h in HEADS]
    record = json.loads((onnx_dir / "compress.json").read_text())
    assert record["onnx_max_abs_diff"] <= record["onnx_atol"]  # checked over all three heads
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "Anna Berg works for Acme Corp in Berlin.\nReuters said Tokyo beat Paris 2-1 on Monday.\n"
    )
    rows = {}
    for name, run in (("torch", out), ("onnx", onnx_dir)):
        assert (
            cli(["predict", str(run), "--input", str(texts), "--output", str(tmp_path / f"{name}.jsonl")])
            == 0
        )
        rows[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [r["tags"] for r in rows["onnx"]] == [r["tags"] for r in rows["torch"]]
    assert [[(e["type"], e["start"], e["end"]) for e in r["spans"]["ner"]] for r in rows["onnx"]] == [
        [(e["type"], e["start"], e["end"]) for e in r["spans"]["ner"]] for r in rows["torch"]
    ]
    with pytest.raises(DataError, match="multi-task runs can be exported to ONNX and quantized, not pruned"):
        compress_run(out, tmp_path / "pruned", prune_heads=0.5, texts=["a b c"])


def test_lora_trains_adapter_and_heads_and_reloads(tiny_model, tmp_path):
    out = tmp_path / "lora"
    extra = (
        "--use_lora",
        "--lora_r",
        "4",
        "--merge_lora",
        "--num_train_epochs",
        "2",
        "--context",
        "sentence",
    )
    multitask.main(recipe_args(tiny_model, out, *extra))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any(".heads." in k for k in adapter)
    assert any("token_type_embeddings" in k for k in adapter), "the case types train with the adapter"
    assert not any(k.endswith("query.base_layer.weight") for k in adapter), "base weights stay out"
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    (out / "model.safetensors").rename(out / "merged.bak")
    adapter_model, tok, info = load_run(out)  # base + adapter
    (out / "merged.bak").rename(out / "model.safetensors")
    merged_model, _, _ = load_run(out)
    words = [r["tokens"] for r in rows]
    a = predict_head_logits(adapter_model, tok, words, list(HEADS), 32, 8, case_feature=True)
    m = predict_head_logits(merged_model, tok, words, list(HEADS), 32, 8, case_feature=True)
    for head in HEADS:
        for x, y in zip(a[head], m[head], strict=True):
            torch.testing.assert_close(torch.from_numpy(x), torch.from_numpy(y), atol=1e-5, rtol=0)
        method = "argmax" if head == "pos" else "viterbi"
        assert [decode_tags(x, info["heads"][head], method) for x in a[head]] == [
            r["pred"][head] for r in rows
        ]


def test_head_options_must_agree(tiny_model, tmp_path):
    with pytest.raises(DataError, match="one entry per head"):
        multitask.main(recipe_args(tiny_model, tmp_path / "x", "--loss_weights", "1", "1"))


@pytest.mark.slow  # 95 s on the shared 2-core machine (two interpreters, gloo)
def test_two_processes_train_one_model(tiny_model, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed"
    out = tmp_path / "ddp"
    args = recipe_args(tiny_model, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "multitask_two_ranks.py"),
    ]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2-rank multitask run: {time.perf_counter() - start:.1f} s")
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    ranks = [json.loads((out / "checkpoints" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["ddp"] == "DistributedDataParallel"
    assert ranks[0]["find_unused_parameters"] is False
    assert ranks[0]["weights"] == ranks[1]["weights"], "both ranks end with the same (synced) weights"
    results = json.loads((out / "all_results.json").read_text())
    words = sum(len(s.tokens) for s in read_conll(DATA / "test.conll"))
    assert results["test_ner_words"] == results["test_pos_words"] == words  # every word once
    assert len((out / "test_predictions.jsonl").read_text().splitlines()) == len(
        read_conll(DATA / "test.conll")
    )


def test_a_one_head_run_trains_evaluates_and_saves(tiny_model, tmp_path):
    # Trainer hands a one-head model's logits back bare, not as a 1-tuple: the recipe must still index heads.
    out = tmp_path / "pos-only"
    extra = ["--heads", "pos", "--head_columns", "1", "--head_schemes", "none", "--loss_weights", "1"]
    results = multitask.main(recipe_args(tiny_model, out, "--num_train_epochs", "1", *extra))
    assert 0.0 <= results["test_pos_accuracy"] <= 1.0 and "test_ner_f1" not in results
    _, _, info = load_run(out)
    assert list(info["heads"]) == ["pos"]
