"""Inference path chosen by measurement (ftkit.choose, `ftkit compress --choose`), on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ftkit import choose
from ftkit.cli import main as cli
from ftkit.compress import load_compressed

LABELS = ["food", "sports", "tech"]
TEXTS = ["The striker scored a goal.", "A new phone was released today.", "Bread and cheese for lunch."] * 4


def test_choice_is_the_fastest_within_the_accuracy_tolerance():
    figures = {
        "fp32": {"texts_per_s": 10.0, "accuracy": 0.900},
        "bf16": {"skipped": "no native bf16"},
        "torch-int8": {"texts_per_s": 30.0, "accuracy": 0.895},  # exactly 0.5 point lower: kept
        "onnx-int8": {"texts_per_s": 50.0, "accuracy": 0.894},  # 0.6 point lower: too far
    }
    assert choose.choose(figures) == "torch-int8"
    figures["torch-int8"]["accuracy"] = 0.89
    assert choose.choose(figures) == "fp32"  # nothing else within the tolerance
    figures["onnx-int8"]["accuracy"] = 0.91  # more accurate than fp32 is within it too
    assert choose.choose(figures) == "onnx-int8"


@pytest.fixture
def run_dir(tiny_model, tmp_path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    out = tmp_path / "run"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    info = {
        "format_version": 1,
        "task": "text-classification",
        "max_length": 32,
        "labels": LABELS,
        "lora": False,
    }
    (out / "ftkit_run.json").write_text(json.dumps(info))
    rows = [{"gold": LABELS[i % 3], "origin": f"t:{i}", "text": t} for i, t in enumerate(TEXTS)]
    (out / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize(("int8_accuracy", "chosen"), [(0.50, "fp32"), (0.505, "torch-int8")])
def test_compress_choose_records_every_candidate_and_predict_serves_the_choice(
    run_dir, tmp_path, monkeypatch, capsys, int8_accuracy, chosen
):
    monkeypatch.setattr(choose, "measure_speed", lambda models, batch: {"fp32": 10.0, "torch-int8": 30.0})
    accuracy = {"fp32": 0.51, "torch-int8": int8_accuracy}  # 1 point lower, then 0.5
    monkeypatch.setattr(choose, "measure_accuracy", lambda models, *a: accuracy)
    out = tmp_path / "chosen"
    args = ["compress", str(run_dir), "--out", str(out), "--choose", "--candidates", "fp32,torch-int8"]
    assert cli(args) == 0
    record = json.loads((out / "compress.json").read_text())
    assert record["choice"]["chosen"] == chosen and record["runtime"] == chosen
    assert record["choice"]["candidates"]["torch-int8"] == {"texts_per_s": 30.0, "accuracy": int8_accuracy}
    assert "test_predictions.jsonl" in record["choice"]["accuracy_on"]
    assert "cpu_flags" in record["choice"]["machine"]
    model = load_compressed(out)
    quantized = any("quantized" in type(m).__module__ for m in model.modules())
    assert quantized == (chosen == "torch-int8")
    texts = tmp_path / "new.txt"
    texts.write_text("The goalkeeper saved a penalty.\n")
    assert cli(["predict", str(out), "--input", str(texts)]) == 0
    assert json.loads((out / "predictions-new.jsonl").read_text())["label"] in LABELS


def test_measurements_are_real_figures(run_dir):
    tok = AutoTokenizer.from_pretrained(run_dir)
    models = choose._build(run_dir, ["fp32", "torch-int8"], run_dir, TEXTS)
    batch = choose.fixed_batch(tok, TEXTS)
    assert batch["input_ids"].shape == (32, 128)
    speed = choose.measure_speed(models, batch, rounds=1)
    accuracy = choose.measure_accuracy(
        models,
        tok,
        TEXTS,
        [LABELS[i % 3] for i in range(len(TEXTS))],
        json.loads((run_dir / "ftkit_run.json").read_text()),
    )
    assert all(v > 0 for v in speed.values()) and all(0 <= v <= 1 for v in accuracy.values())
