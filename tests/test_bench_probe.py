"""The benchmark's instrumentation on the tiny model: token counts, curve points, time-to-target logic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from probe import PROBE, ProbeTrainer  # noqa: E402
from train_speed import compare, time_to_reach  # noqa: E402

from ftkit.models import load_tokenizer  # noqa: E402


def test_probe_counts_real_and_padded_tokens(tiny_model, tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model)
    lengths = [5, 9, 3, 7]  # batch size 2, no shuffling: batches (5, 9) and (3, 7)
    ds = Dataset.from_dict(
        {"input_ids": [[2] + [7] * (n - 2) + [3] for n in lengths], "labels": [0, 1, 0, 1]}
    ).map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, eval_strategy="steps",
        eval_steps=1, save_strategy="no", report_to="none", train_sampling_strategy="sequential",
        disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    PROBE.reset()
    trainer = ProbeTrainer(
        model=model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=DataCollatorWithPadding(tok)
    )
    trainer.train()
    assert PROBE.lengths == lengths
    assert PROBE.padded_lengths == [9, 9, 7, 7] and PROBE.padded_tokens == 32
    assert [p["step"] for p in PROBE.curve] == [1, 2] and [p["examples"] for p in PROBE.curve] == [2, 4]
    assert all("eval_loss" in p for p in PROBE.curve)
    assert PROBE.calls["forward + backward"] == 2 and PROBE.calls["optimizer"] == 2
    assert PROBE.calls["evaluation"] == 2 and PROBE.shape.layers == 2 and PROBE.shape.hidden == 32
    # The training clock at each point excludes the evaluations before it (not the point's own).
    first, second = PROBE.curve
    assert first["train_seconds"] == first["wall_seconds"] > 0
    assert second["train_seconds"] == pytest.approx(second["wall_seconds"] - first["eval_seconds"])
    assert PROBE.train_seconds() == pytest.approx(
        PROBE.train_end - PROBE.train_start - first["eval_seconds"] - second["eval_seconds"]
    )


def test_time_to_reach_and_speedup():
    base = [{"train_seconds": 10, "eval_accuracy": 0.5}, {"train_seconds": 20, "eval_accuracy": 0.9},
            {"train_seconds": 30, "eval_accuracy": 0.8}]  # fmt: skip
    ftk = [{"train_seconds": 4, "eval_accuracy": 0.85}, {"train_seconds": 8, "eval_accuracy": 0.9}]
    # The baseline's final metric is 0.8: it first got there at 20 s, ftkit at 4 s.
    assert time_to_reach(base, "eval_accuracy", 0.8) == 20
    assert time_to_reach(ftk, "eval_accuracy", 0.95) is None
    out = compare(
        {"metric": "eval_accuracy", "final_metric": 0.8, "curve": base},
        {"metric": "eval_accuracy", "final_metric": 0.9, "curve": ftk},
    )
    assert out["baseline_seconds"] == 20 and out["ftkit_seconds"] == 4 and out["speedup"] == 5


@pytest.mark.parametrize(("target", "steps"), [(0.0, 1), (1e9, 4)])
def test_stop_at_target_ends_training_at_the_first_evaluation_reaching_it(
    tiny_model, tmp_path, target, steps
):
    tok = load_tokenizer(tiny_model)
    ds = Dataset.from_dict({"input_ids": [[2, 7, 7, 3]] * 8, "labels": [0, 1] * 4}).map(
        lambda r: {"attention_mask": [1] * len(r["input_ids"])}
    )
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, eval_strategy="steps",
        eval_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    PROBE.reset()
    PROBE.stop_at = {"metric": "eval_loss", "target": target}  # a loss is >= 0: reached at once
    trainer = ProbeTrainer(
        model=model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=DataCollatorWithPadding(tok)
    )
    trainer.train()
    assert trainer.state.global_step == steps and len(PROBE.curve) == steps
    PROBE.reset()
