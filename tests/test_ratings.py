"""The ratings recipe on the tiny model: regression on numeric ratings, scores from `ftkit predict`,
LoRA, bad ratings, and the embedded amazon-ratings corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig

from ftkit import DataError
from ftkit.predict import load_run, predict_texts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import ratings  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "sentiment"


def run(tiny_model: str, out: Path, *extra: str) -> dict:
    args = [
        "--model_name_or_path", tiny_model,
        "--train_file", str(DATA / "ratings.csv"),
        "--output_dir", str(out),
        "--num_train_epochs", "3",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "8",
        "--max_length", "64",
        "--logging_steps", "2",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip
    return ratings.main(args)


def recipe_predictions(out: Path) -> tuple[list[dict], np.ndarray]:
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    model, tok, info = load_run(out)
    return rows, predict_texts(model, tok, [r["text"] for r in rows], info, batch_size=3, progress=False)


def test_regression_fits_ratings_and_predicts_scores(tiny_model, tmp_path):
    out = tmp_path / "reg"
    results = run(tiny_model, out)
    for key in ("mae", "rmse", "pearson", "spearman"):
        assert f"test_{key}" in results and f"eval_{key}" in results
    assert "test_accuracy" not in results and "calibration_temperature" not in results
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.problem_type == "regression"
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "regression" and info["temperature"] == 1.0
    rows, scores = recipe_predictions(out)
    gold = np.array([r["gold"] for r in rows])
    pred = np.array([r["score"] for r in rows])
    assert set(gold) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.abs(gold - pred).mean() == pytest.approx(results["test_mae"], abs=1e-5)
    np.testing.assert_allclose(scores, pred, atol=2e-5)
    # The head starts at the mean rating (3.0), so even a few steps predict in the rating range.
    assert 1.5 < pred.mean() < 4.5
    assert "metric_for_best_model: rmse" in (out / "config.yaml").read_text()  # selection on RMSE


def test_lora_regression_saves_adapter_and_reloads(tiny_model, tmp_path):
    out = tmp_path / "lora"
    run(
        tiny_model, out, "--use_lora", "--lora_r", "4", "--max_steps", "3", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false",
    )  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    rows, scores = recipe_predictions(out)
    np.testing.assert_allclose(scores, [r["score"] for r in rows], atol=2e-5)


def test_text_labels_are_an_error_naming_the_row(tiny_model, tmp_path):
    with pytest.raises(DataError, match=r"polarity\.csv:\d+: label '(positive|negative)' is not a number"):
        run(tiny_model, tmp_path / "bad", "--train_file", str(DATA / "polarity.csv"))


def test_bad_rating_names_the_file_and_row(tmp_path):
    # In-process: the exit status and one-line message of the shared main-guard are checked once,
    # on textcls, in tests/test_config_cli.py (a subprocess costs ~8 s of imports).
    bad = tmp_path / "r.csv"
    bad.write_text(
        "text,stars\ngood,5\nbad,1\nmeh,three\n" + "".join(f"review {i},{i % 5 + 1}\n" for i in range(20))
    )
    with pytest.raises(DataError, match=r"r\.csv:4: label 'three' is not a number"):
        ratings.main(["--train_file", str(bad), "--output_dir", str(tmp_path / "out")])


def test_embedded_amazon_ratings_corpus():
    from ftkit.data import VADER_SDIST, load_text_splits

    if not (Path(sys.prefix) / "share" / "ftkit" / VADER_SDIST).is_file():
        pytest.skip(f"{VADER_SDIST} not downloaded (make install does it)")
    splits, stats = load_text_splits(dataset_name="amazon-ratings")
    rows = [r for split in splits.values() for r in split]
    assert len(rows) + stats.duplicates_removed == 3708
    assert all(-4 <= r["label"] <= 4 for r in rows) and all(r["text"] for r in rows)
    # Split by rating quintiles: the three splits have about the same mean rating.
    means = [np.mean([r["label"] for r in split]) for split in splits.values()]
    assert max(means) - min(means) < 0.15
