"""End-to-end runs on the real embedded model and data (make test-slow). Minutes, not seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import textcls  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def all_cores():
    # conftest limits tests to one thread (right for the tiny model); the real model wants them all.
    import os

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def test_textcls_real_model_learns_bbc_news_quickly(tmp_path):
    out = tmp_path / "bbc"
    results = textcls.main(
        ["--output_dir", str(out), "--max_steps", "60", "--max_length", "64", "--eval_strategy", "no", "--save_strategy", "no",
         "--load_best_model_at_end", "false", "--disable_tqdm", "true"]
    )  # fmt: skip
    # 5 balanced-ish classes: chance is about 0.24; 60 steps on titles and leads get far above it.
    assert results["test_accuracy"] > 0.85
    assert results["data_duplicates_removed"] == 98 and results["data_test_rows"] == 213
    assert results["test_truncated"] > 150  # most BBC articles are longer than 64 tokens
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["labels"] == ["business", "entertainment", "politics", "sports", "tech"]


def test_ner_real_model_with_the_case_feature_learns_conll(tmp_path):
    import ner

    out = tmp_path / "conll"
    results = ner.main(
        ["--output_dir", str(out), "--max_steps", "60", "--disable_tqdm", "true"]
    )  # fmt: skip
    # 60 steps of 8 document windows (about a third of an epoch): far above a model that learned nothing.
    assert results["test_f1"] > 0.5 and results["test_invalid_sequences"] == 0
    assert results["test_words"] == 46435  # every CoNLL-2003 test word scored once
    assert json.loads((out / "ftkit_run.json").read_text())["case_feature"] is True


def test_sentiment_real_model_beats_chance_and_calibrates(tmp_path):
    import sentiment

    out = tmp_path / "rt"
    results = sentiment.main(
        ["--output_dir", str(out), "--max_steps", "60", "--eval_strategy", "no", "--save_strategy", "no",
         "--load_best_model_at_end", "false", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert results["test_accuracy"] > 0.7 and results["data_skipped_plot_rows"] == 1097
    assert 0 < results["calibration_temperature"] < 5 and results["test_ece"] < 0.1
