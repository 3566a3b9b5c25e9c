"""The sentiment recipe on the tiny model: polarity + calibration, ratings to polarity, class weights,
chunked long reviews, bad input, and the library pieces behind them (ECE, temperature, pooling, loss)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ftkit import DataError
from ftkit.cli import main as ftkit_main
from ftkit.metrics import expected_calibration_error
from ftkit.predict import load_run, predict_texts

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import sentiment  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "sentiment"


def run(tiny_model: str, out: Path, *extra: str) -> dict:
    args = [
        "--model_name_or_path", tiny_model,
        "--train_file", str(DATA / "polarity.csv"),
        "--output_dir", str(out),
        "--num_train_epochs", "2",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "8",
        "--logging_steps", "2",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip
    return sentiment.main(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recipe_predictions(out: Path) -> tuple[list[dict], np.ndarray]:
    """test_predictions.jsonl rows, and what `ftkit predict`'s library path gives for the same texts."""
    rows = read_jsonl(out / "test_predictions.jsonl")
    model, tok, info = load_run(out)
    scores = predict_texts(model, tok, [r["text"] for r in rows], info, batch_size=3, progress=False)
    return rows, scores


# ---------------------------------------------------------------------------------------------
# Recipe runs


@pytest.fixture(scope="module")
def polarity_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("senti") / "polarity"
    return out, run(tiny_model, out)


def test_polarity_run_writes_calibrated_probabilities_and_every_metric(polarity_run):
    out, results = polarity_run
    for name in (
        "model.safetensors", "config.json", "tokenizer.json", "ftkit_run.json", "all_results.json",
        "test_report.json", "test_report.txt", "test_predictions.jsonl", "confusion_matrix.png",
        "training_curves.png", "README.md", "config.yaml", "manifest.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["data_source"].endswith("polarity.csv") and saved["data_test_rows"] == 6
    for prefix in ("eval", "test"):
        for key in ("accuracy", "macro_f1", "roc_auc", "ece", "ece_uncalibrated", "nll"):
            assert 0 <= saved[f"{prefix}_{key}"] <= (1 if key != "nll" else 50), (prefix, key)
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "text-classification" and info["labels"] == ["negative", "positive"]
    assert "train_sampling_strategy: group_by_length" in (out / "config.yaml").read_text()
    assert info["temperature"] == pytest.approx(saved["calibration_temperature"]) and info["temperature"] != 1
    # The recipe's test metrics are the ones its predictions file gives...
    rows, scores = recipe_predictions(out)
    assert len(rows) == 6 and {"gold", "label", "p_negative", "p_positive", "origin"} <= set(rows[0])
    assert np.mean([r["gold"] == r["label"] for r in rows]) == pytest.approx(saved["test_accuracy"])
    probs = np.array([[r["p_negative"], r["p_positive"]] for r in rows])
    gold = np.array([info["labels"].index(r["gold"]) for r in rows])
    assert expected_calibration_error(gold, probs) == pytest.approx(saved["test_ece"], abs=1e-5)
    # ... and `ftkit predict` applies the same temperature to the same texts.
    np.testing.assert_allclose(scores, probs, atol=2e-5)
    model, tok, _ = load_run(out)
    raw = predict_texts(model, tok, [r["text"] for r in rows], {**info, "temperature": 1.0}, progress=False)
    assert not np.allclose(raw, probs, atol=1e-4), "the temperature must change the probabilities"


def test_predict_cli_on_a_polarity_run(polarity_run, tmp_path):
    out, _ = polarity_run
    txt = tmp_path / "in.txt"
    txt.write_text("A wonderful and moving film.\nDull, boring and tedious.\n")
    assert ftkit_main(["predict", str(out), "--input", str(txt), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert len(rows) == 2 and all(r["label"] in {"negative", "positive"} for r in rows)
    assert all(abs(r["p_negative"] + r["p_positive"] - 1) < 1e-4 for r in rows)


def test_rating_to_polarity_drops_and_counts_the_threshold(tiny_model, tmp_path):
    out = tmp_path / "thr"
    results = run(
        tiny_model, out, "--train_file", str(DATA / "ratings.csv"), "--rating_to_polarity", "3",
        "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    )  # fmt: skip
    assert results["data_skipped_rating_at_threshold"] == 12  # the 3-star rows of the fixture
    n = results["data_train_rows"] + results["data_validation_rows"] + results["data_test_rows"]
    assert n == 48
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["labels"] == ["negative", "positive"]
    rows = read_jsonl(out / "test_predictions.jsonl")
    assert {r["gold"] for r in rows} <= {"negative", "positive"}


def test_chunks_pool_to_exactly_one_prediction_per_input(tiny_model, tmp_path):
    out = tmp_path / "chunks"
    results = run(
        tiny_model, out, "--train_file", str(DATA / "long_reviews.csv"), "--long_text", "chunks",
        "--max_length", "32", "--stride", "8",
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out)
    rows = read_jsonl(out / "test_predictions.jsonl")
    assert len(rows) == results["data_test_rows"] == 4
    assert len({r["origin"] for r in rows}) == 4
    # More windows than inputs, and every input that did not fit is counted once.
    long = [len(tok(r["text"])["input_ids"]) > 32 for r in rows]
    assert results["test_chunk_rows"] > results["data_test_rows"]
    assert results["test_truncated"] == sum(long) >= 1
    assert results["train_truncated"] <= results["data_train_rows"] < results["train_chunk_rows"]
    # ftkit predict pools the same way (mean of probabilities over the windows).
    _, scores = recipe_predictions(out)
    assert scores.shape == (4, 2)
    np.testing.assert_allclose(scores, [[r["p_negative"], r["p_positive"]] for r in rows], atol=2e-5)
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["long_text"] == "chunks" and info["stride"] == 8 and info["max_length"] == 32


def test_class_weights_reach_the_trainer(tiny_model, tmp_path):
    # A zero weight on "positive" leaves only the negative rows' gradient: the model learns to say negative.
    out = tmp_path / "weights"
    results = run(tiny_model, out, "--class_weights", "1,0", "--num_train_epochs", "4")
    assert results["class_weights"] == {"negative": 1.0, "positive": 0.0}
    rows = read_jsonl(out / "test_predictions.jsonl")
    assert all(r["label"] == "negative" for r in rows)


def test_weighted_loss_is_not_scaled_by_gradient_accumulation(tiny_model, tmp_path):
    # With compute_loss_func Trainer skips its division by the accumulation steps; the loss divides by
    # the rows of the accumulated batch instead. A near-uniform 2-class model logs about ln 2 = 0.69.
    results = run(
        tiny_model, tmp_path / "ga", "--class_weights", "1,1", "--gradient_accumulation_steps", "2",
        "--max_steps", "2", "--learning_rate", "1e-6", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false",
    )  # fmt: skip
    assert results["train_loss"] == pytest.approx(0.6931, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Bad input: each case stops with its own message


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rating_to_polarity", "3"], r"polarity\.csv:\d+: label '(positive|negative)' is not a number"),
        (["--class_weights", "1,2,3"], r"gives 3 weight\(s\) for 2 classes; .* negative, positive"),
        (["--class_weights", "high,low"], "expected 'auto' or one number per class"),
        (["--class_weights", "1,-1"], "must be finite, >= 0"),
        (
            ["--long_text", "chunks", "--max_length", "32", "--stride", "16"],
            "--stride must be >= 0 and below",
        ),
        (
            ["--train_file", str(DATA / "ratings.csv"), "--rating_to_polarity", "0"],
            r"after --rating_to_polarity only one class is left",
        ),
    ],
)
def test_bad_input_gives_its_message(tiny_model, tmp_path, extra, message):
    with pytest.raises(DataError, match=message):
        run(tiny_model, tmp_path / "bad", *extra)


# ---------------------------------------------------------------------------------------------
# Configs


def test_seed_fixes_the_new_head(tiny_model, tmp_path):
    from safetensors.torch import load_file

    # learning_rate 0: the saved weights are the initial ones, so only the seeding is compared.
    def head(name: str, seed: str) -> torch.Tensor:
        extra = ("--seed", seed, "--max_steps", "1", "--learning_rate", "0", "--eval_strategy", "no")
        run(tiny_model, tmp_path / name, *extra, "--save_strategy", "no", "--load_best_model_at_end", "false")
        return load_file(tmp_path / name / "model.safetensors")["classifier.weight"]

    first, again, other = head("a", "42"), head("b", "42"), head("c", "7")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
