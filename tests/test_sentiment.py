"""The sentiment recipe on the tiny model: polarity + calibration, ratings regression, class weights,
chunked long reviews, bad input, and the library pieces behind them (ECE, temperature, pooling, loss)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from ftkit import DataError
from ftkit.cli import main as ftkit_main
from ftkit.config import parse_args
from ftkit.losses import class_weights, weighted_cross_entropy
from ftkit.metrics import expected_calibration_error, fit_temperature, regression_scores, roc_auc, softmax
from ftkit.models import ModelArguments
from ftkit.predict import load_run, predict_texts
from ftkit.text import pool_chunks

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


def test_regression_fits_ratings_and_predicts_scores(tiny_model, tmp_path):
    out = tmp_path / "reg"
    results = run(
        tiny_model, out, "--train_file", str(DATA / "ratings.csv"), "--task", "regression",
        "--num_train_epochs", "3",
    )  # fmt: skip
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


def test_lora_regression_saves_adapter_and_reloads(tiny_model, tmp_path):
    out = tmp_path / "lora"
    run(
        tiny_model, out, "--train_file", str(DATA / "ratings.csv"), "--task", "regression", "--use_lora",
        "--lora_r", "4", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false",
    )  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (
        out / "model.safetensors"
    ).exists()
    rows, scores = recipe_predictions(out)
    np.testing.assert_allclose(scores, [r["score"] for r in rows], atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: each case stops with its own message


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "regression"], r"polarity\.csv:\d+: label '(positive|negative)' is not a number"),
        (["--rating_to_polarity", "3"], r"polarity\.csv:\d+: label '(positive|negative)' is not a number"),
        (
            ["--train_file", str(DATA / "ratings.csv"), "--task", "regression", "--rating_to_polarity", "3"],
            "use it without --task regression",
        ),
        (["--task", "regression", "--class_weights", "auto"], "--task regression has none"),
        (["--class_weights", "1,2,3"], r"gives 3 weight\(s\) for 2 classes; .* negative, positive"),
        (["--class_weights", "high,low"], "expected 'auto' or one number per class"),
        (["--class_weights", "1,-1"], "must be finite, >= 0"),
        (
            ["--long_text", "chunks", "--max_length", "32", "--stride", "16"],
            "--stride must be >= 0 and below",
        ),
        (
            ["--train_file", str(DATA / "ratings.csv"), "--rating_to_polarity", "0"],
            r"after --rating_to_polarity only \['positive'\] is left",
        ),
    ],
)
def test_bad_input_gives_its_message(tiny_model, tmp_path, extra, message):
    with pytest.raises(DataError, match=message):
        run(tiny_model, tmp_path / "bad", *extra)


def test_recipe_exits_with_one_line_on_bad_ratings(tmp_path):
    import subprocess

    bad = tmp_path / "r.csv"
    bad.write_text(
        "text,stars\ngood,5\nbad,1\nmeh,three\n" + "".join(f"review {i},{i % 5 + 1}\n" for i in range(20))
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "sentiment.py"),
            "--train_file",
            str(bad),
            "--task",
            "regression",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "r.csv:4: label 'three' is not a number" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Library pieces


def test_class_weights_change_the_loss_on_the_same_batch(tiny_model):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = tok(
        ["A wonderful film.", "Dull and boring.", "Clever script.", "Awful plot."],
        padding=True,
        return_tensors="pt",
    )
    labels = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        outputs = model(**batch, labels=labels)
    plain = outputs.loss
    # Weights of 1 give the model's own (mean) cross-entropy.
    torch.testing.assert_close(weighted_cross_entropy([1.0, 1.0])(outputs, labels), plain)
    weighted = weighted_cross_entropy([3.0, 0.5])(outputs, labels)
    per_row = F.cross_entropy(outputs.logits, labels, reduction="none")
    expected = (per_row * torch.tensor([0.5, 3.0, 0.5, 0.5])).sum() / 4
    torch.testing.assert_close(weighted, expected)
    assert abs(weighted - plain) > 1e-3
    # Trainer's num_items_in_batch (rows in the accumulated batch) replaces the batch's own count.
    torch.testing.assert_close(
        weighted_cross_entropy([1.0, 1.0])(outputs, labels, num_items_in_batch=8), plain / 2
    )


def test_auto_class_weights_are_balanced():
    w = class_weights("auto", [0, 0, 0, 1], ["negative", "positive"])
    assert w == pytest.approx([4 / 6, 2.0])
    # Averaged over the rows, balanced weights are 1: the loss keeps its scale.
    assert np.mean([w[y] for y in [0, 0, 0, 1]]) == pytest.approx(1.0)
    assert class_weights("2, 1", [0, 1], ["a", "b"]) == [2.0, 1.0]


def test_expected_calibration_error_by_hand():
    # Bin (0.6, 0.667]: two rows at 0.65 confidence, one right -> |0.5 - 0.65| * 2/4.
    # Bin (0.933, 1]: two rows at 0.95, both right -> |1 - 0.95| * 2/4.
    probs = np.array([[0.65, 0.35], [0.35, 0.65], [0.95, 0.05], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.15 * 0.5 + 0.05 * 0.5)
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0


def test_temperature_scaling_lowers_ece_on_over_confident_logits():
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 2, n)
    # Well-separated classes 70% of the time, then logits blown up 6x: far too sure of itself.
    signal = np.where(rng.random(n) < 0.7, labels, 1 - labels) * 2 - 1.0
    logits = 6 * np.stack([-signal, signal], axis=1) + rng.normal(0, 1, (n, 2))
    val, test = slice(0, n // 2), slice(n // 2, n)
    t = fit_temperature(logits[val], labels[val])
    assert t > 3
    before = expected_calibration_error(labels[test], softmax(logits[test]))
    after = expected_calibration_error(labels[test], softmax(logits[test] / t))
    assert before > 0.2 and after < 0.05
    # The argmax (and so accuracy) does not move.
    assert (softmax(logits[test]).argmax(1) == softmax(logits[test] / t).argmax(1)).all()


def test_temperature_fit_with_chunks_pools_per_input():
    logits = np.array([[4.0, -4.0], [-4.0, 4.0], [3.0, -3.0], [-5.0, 5.0]])
    owner = np.array([0, 0, 1, 2])
    labels = np.array([0, 0, 1])
    t = fit_temperature(logits, labels, owner=owner)
    assert 0.05 <= t <= 20
    assert fit_temperature(logits, labels, owner=owner) == t  # deterministic


def test_pool_chunks_averages_rows_of_one_input():
    scores = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])
    pooled = pool_chunks(scores, [0, 0, 1, 2])
    np.testing.assert_allclose(pooled, [[0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    np.testing.assert_allclose(pool_chunks(np.array([1.0, 3.0, 5.0]), [0, 0, 1]), [2.0, 5.0])
    with pytest.raises(ValueError, match="input 1 has no rows"):
        pool_chunks(scores, [0, 0, 2, 2])


def test_roc_auc_and_regression_scores():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])) == 1.0
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([[0.1, 0.9], [0.2, 0.8]])))
    s = regression_scores(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 3.5, 4.0]))
    assert s["mae"] == pytest.approx(0.25) and s["rmse"] == pytest.approx(np.sqrt(0.125))
    assert s["spearman"] == pytest.approx(1.0) and 0.9 < s["pearson"] < 1


# ---------------------------------------------------------------------------------------------
# Configs


TYPES = (sentiment.DataArguments, ModelArguments, TrainingArguments)
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("sentiment*.yaml"))


def parse(argv):
    return parse_args(TYPES, argv, defaults=sentiment.TRAINING_DEFAULTS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_sentiment_config_parses(config):
    data, model, train = parse(["--config", str(config)])
    assert data.dataset_name == "rotten-tomatoes" and data.task in ("classification", "regression")
    assert train.metric_for_best_model == ("rmse" if data.task == "regression" else "macro_f1")


def test_sentiment_yaml_equals_the_recipe_defaults():
    assert len(CONFIGS) >= 2
    assert parse(["--config", str(ROOT / "recipes" / "configs" / "sentiment.yaml")]) == parse([])


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
