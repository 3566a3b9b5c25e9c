"""The text-classification recipe end to end on the tiny model: files, metrics, weights, LoRA, reload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import textcls  # noqa: E402

from ftkit.fastlinear import use_onednn_linear  # noqa: E402
from ftkit.predict import load_run, predict_texts  # noqa: E402


def recipe_args(tiny_model: str, fixtures: Path, out: Path, *extra: str) -> list[str]:
    data = fixtures / "textcls"
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"),
        "--test_file", str(data / "test.csv"),
        "--output_dir", str(out),
        "--num_train_epochs", "2",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "8",
        "--logging_steps", "2",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    results = textcls.main(recipe_args(tiny_model, Path(__file__).parent / "fixtures", out))
    return out, results


def test_run_directory_has_every_output(full_run):
    out, results = full_run
    for name in (
        "model.safetensors", "config.json", "tokenizer.json", "ftkit_run.json", "all_results.json",
        "test_report.json", "test_report.txt", "test_predictions.jsonl", "confusion_matrix.png",
        "training_curves.png", "README.md", "config.yaml", "manifest.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "weights must be safetensors only"
    saved = json.loads((out / "all_results.json").read_text())
    for key in (
        "train_runtime",
        "train_real_tokens_per_second",
        "train_pad_share",
        "eval_accuracy",
        "eval_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "test_truncated",
    ):
        assert key in saved, key
    assert 0 <= saved["test_accuracy"] <= 1 and 0 <= saved["eval_macro_f1"] <= 1
    assert 0 <= saved["train_pad_share"] < 1 and saved["train_real_tokens_per_second"] > 0
    assert saved["data_train_rows"] == 42 and saved["data_test_rows"] == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["seed"] == 42 and len(manifest["data_fingerprint"]) == 16 and manifest["versions"]["torch"]
    )
    card = (out / "README.md").read_text()
    assert "test_accuracy" in card and "sports" in card
    preds = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {"gold", "label", "origin", "p_food", "p_sports", "p_tech"} <= set(preds[0])
    assert preds[0]["origin"].endswith("test.csv:2")
    assert abs(sum(preds[0][f"p_{n}"] for n in ("food", "sports", "tech")) - 1) < 1e-4
    # The accuracy in the results is the one the predictions file gives.
    acc = np.mean([p["gold"] == p["label"] for p in preds])
    assert acc == pytest.approx(saved["test_accuracy"])


def test_training_changed_the_encoder_and_labels_are_saved(full_run, tiny_model):
    out, _ = full_run
    before = load_file(Path(tiny_model) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[key], after["bert." + key])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "food", 1: "sports", 2: "tech"}


def test_saved_model_works_with_plain_pipeline(full_run):
    out, _ = full_run
    clf = pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")
    result = clf(["The striker scored a goal in the cup match."])
    assert result[0]["label"] in {"food", "sports", "tech"}


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
def test_predict_matches_the_recipe_test_predictions(full_run, linear_backend):
    out, _ = full_run
    model, tok, info = load_run(out)
    use_onednn_linear(model, linear_backend)
    preds = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    probs = predict_texts(model, tok, [p["text"] for p in preds], info, batch_size=5, progress=False)
    expected = np.array([[p[f"p_{n}"] for n in info["labels"]] for p in preds])
    np.testing.assert_allclose(probs, expected, atol=2e-5)


def test_lora_trains_adapter_and_head_only_and_reloads_identically(tiny_model, fixtures, tmp_path):
    out = tmp_path / "lora"
    textcls.main(recipe_args(tiny_model, fixtures, out, "--use_lora", "--lora_r", "4", "--merge_lora"))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert not any(k.endswith("query.base_layer.weight") for k in adapter), (
        "base weights must not be in the adapter"
    )
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero: it must have trained"
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["lora"] is True and info["merged"] is True

    # The merged model's encoder differs from the base; the adapter model matches it within 1e-5.
    base = load_file(Path(tiny_model) / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert not torch.equal(
        base["encoder.layer.0.attention.self.query.weight"],
        merged["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert torch.equal(
        base["embeddings.word_embeddings.weight"], merged["bert.embeddings.word_embeddings.weight"]
    )
    layer_norm = "encoder.layer.1.output.LayerNorm.weight"
    assert torch.equal(base[layer_norm], merged["bert." + layer_norm])
    # Base weights stayed frozen: merged - base is exactly the low-rank update B @ A * alpha / r.
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    a_key = next(k for k in adapter if k.startswith(prefix) and "lora_A" in k)
    delta = adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key] * (32 / 4)
    query = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged["bert." + query] - base[query], delta, atol=1e-6, rtol=1e-4)

    # Unmerged load path (base + adapter) against the merged plain model on the same inputs.
    (out / "model.safetensors").rename(out / "merged.safetensors.bak")
    adapter_model, tok, info = load_run(out)
    (out / "merged.safetensors.bak").rename(out / "model.safetensors")
    merged_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    enc = AutoTokenizer.from_pretrained(out)(
        ["Chef bakes bread in the oven.", "Server code for the network"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        a = adapter_model(**enc).logits
        m = merged_model(**enc).logits
    torch.testing.assert_close(a, m, atol=1e-5, rtol=0)
    preds = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    probs = predict_texts(adapter_model, tok, [p["text"] for p in preds], info, progress=False)
    np.testing.assert_allclose(probs, [[p[f"p_{n}"] for n in info["labels"]] for p in preds], atol=2e-5)


@pytest.mark.slow  # multi-process or kill/resume run: make test-slow keeps make test under 5 minutes
def test_two_process_cpu_launch_runs_two_ranks_and_predicts_each_test_row_once(
    tiny_model, fixtures, tmp_path
):
    import shutil
    import subprocess

    # 7 test rows: not divisible by the 2 ranks, so padding duplicates would show.
    lines = (fixtures / "textcls" / "test.csv").read_text().splitlines()
    test_file = tmp_path / "test7.csv"
    test_file.write_text("\n".join(lines[:8]) + "\n")
    out = tmp_path / "ddp"
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(Path(textcls.__file__)),
        *recipe_args(tiny_model, fixtures, out, "--num_train_epochs", "1"), "--test_file", str(test_file),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = next((out / "checkpoints").glob("checkpoint-*"))
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert sorted(r["origin"] for r in rows) == sorted(f"{test_file}:{n}" for n in range(2, 9))
    # The tiny model starts near uniform over 3 classes: losses near ln 3 = 1.10, not N times that.
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] < 1.5 and results["eval_loss"] < 1.5


def test_gradient_accumulation_does_not_scale_the_loss(tiny_model, fixtures, tmp_path):
    # Encoder heads take **kwargs, so Trainer would skip dividing by the accumulation steps unless
    # load_model marks them; a near-uniform 3-class model must log about ln 3 = 1.10, not 2.2.
    args = recipe_args(
        tiny_model, fixtures, tmp_path / "ga", "--gradient_accumulation_steps", "2", "--max_steps", "2"
    )
    results = textcls.main(
        [
            *args,
            "--learning_rate",
            "1e-6",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
        ]
    )
    assert results["train_loss"] == pytest.approx(1.0986, abs=0.05)


def test_seed_fixes_the_new_head(tiny_model, fixtures, tmp_path):
    # learning_rate 0: the saved weights are the initial ones, so only the seeding is compared.
    def head(name: str, seed: str) -> torch.Tensor:
        out = tmp_path / name
        extra = ("--seed", seed, "--max_steps", "1", "--learning_rate", "0", "--eval_strategy", "no")
        extra += ("--save_strategy", "no", "--load_best_model_at_end", "false")
        textcls.main(recipe_args(tiny_model, fixtures, out, *extra))
        return load_file(out / "model.safetensors")["classifier.weight"]

    first, again, other = head("a", "42"), head("b", "42"), head("c", "7")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_chunks_pool_in_the_recipe_in_predict_and_in_onnx(tiny_model, fixtures, tmp_path):
    from ftkit import compress

    out = tmp_path / "chunks"
    argv = recipe_args(
        tiny_model, fixtures, out, "--long_text", "chunks", "--max_length", "16", "--stride", "4"
    )
    results = textcls.main([*argv, "--max_chunks", "3", "--num_train_epochs", "1"])
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["long_text"] == "chunks" and info["max_chunks"] == 3 and info["stride"] == 4
    assert results["test_chunk_rows"] > results["data_test_rows"] == 12
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    names = info["labels"]
    saved = np.array([[r[f"p_{n}"] for n in names] for r in rows])
    model, tok, info = load_run(out)
    texts = [r["text"] for r in rows]
    np.testing.assert_allclose(predict_texts(model, tok, texts, info, progress=False), saved, atol=2e-5)
    onnx_dir = compress.export_onnx(out, tmp_path / "onnx", texts=texts[:4])
    onnx = compress.load_compressed(onnx_dir)
    got = predict_texts(
        onnx, tok, texts, json.loads((onnx_dir / "ftkit_run.json").read_text()), progress=False
    )
    np.testing.assert_allclose(got, saved, atol=1e-4)


def test_the_baseline_scores_the_test_rows_of_the_run(full_run):
    out, results = full_run
    assert results["baseline_test_rows"] == results["data_test_rows"] == 12
    assert results["baseline_eval_rows"] == results["data_validation_rows"]
    assert 0 <= results["baseline_test_accuracy"] <= 1 and "baseline_test_macro_f1" in results
    card = (out / "README.md").read_text()
    assert "baseline_test_accuracy" in card
    assert ("**Warning:**" in card) == (not results["baseline_beaten"])
