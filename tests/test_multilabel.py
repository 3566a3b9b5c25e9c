"""Multi-label textcls on the tiny model: label lists from every format, per-label thresholds tuned on
validation only, and `ftkit predict` / ONNX applying the thresholds saved in ftkit_run.json."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import textcls  # noqa: E402

from ftkit import DataError  # noqa: E402
from ftkit.cli import main as cli  # noqa: E402
from ftkit.data import load_text_splits, read_table  # noqa: E402
from ftkit.losses import multi_label_loss, pos_weights, weighted_bce  # noqa: E402
from ftkit.metrics import exact_eval_loss  # noqa: E402
from ftkit.multilabel import FALLBACK, best_threshold, tune_thresholds  # noqa: E402
from ftkit.predict import load_run, predict_texts, prediction_rows  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "multilabel"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_table(rows: list[dict], path: Path, delimiter: str = "|") -> Path:
    """The rows as .jsonl (label lists) or .csv/.tsv (labels joined by `delimiter`)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(["text", "labels"])
        writer.writerows([r["text"], delimiter.join(r["labels"])] for r in rows)
    return path


# ---- Loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv"])
def test_label_lists_load_from_every_table_format(tmp_path, suffix):
    rows = json.loads((DATA / "train.json").read_text())
    path = DATA / "train.json" if suffix == ".json" else write_table(rows, tmp_path / f"train{suffix}")
    delimiter = None if suffix.startswith(".json") else "|"
    splits, stats = load_text_splits(train_file=str(path), multi_label="auto", label_delimiter=delimiter)
    assert stats.multi_label and stats.as_results()["data_multi_label"] is True
    loaded = {r["text"]: r["label"] for split in splits.values() for r in split}
    assert loaded == {r["text"]: r["labels"] for r in rows}  # empty lists (no label) included
    assert sum(len(s) for s in splits.values()) == len(rows) and any(not r["labels"] for r in rows)
    # Single labels as one-label lists only when asked for; auto leaves plain labels single-label.
    plain = write_table(
        [{"text": "a b", "labels": ["x"]}, {"text": "c d", "labels": ["y"]}], tmp_path / "p.csv"
    )
    assert read_table(plain)[0][0]["label"] == "x"
    splits, stats = load_text_splits(train_file=str(plain), validation_file=str(plain), test_file=str(plain))
    assert not stats.multi_label
    splits, stats = load_text_splits(
        train_file=str(plain), validation_file=str(plain), test_file=str(plain), multi_label="true"
    )
    assert stats.multi_label and splits["train"][0]["label"] == ["x"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "t", "labels": ["a", "a"]}', "'a' occurs twice"),
        ('{"text": "t", "labels": ["a", 1.5]}', "holds 1.5, which is not a label name"),
        ('{"text": "t", "labels": ["a", ["b"]]}', "holds \\['b'\\], which is not a label name"),
        ('{"text": "t", "labels": ["a", ""]}', "holds an empty label"),
        ('{"text": "t", "labels": null}', "empty or missing label"),
        ('{"text": "t", "labels": "b"}', "label 'b', while 2 of the 3 rows .* have label lists"),
    ],
)
def test_bad_label_lists_name_their_row(tmp_path, line, match):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "x", "labels": ["a"]}\n' + line + '\n{"text": "y", "labels": ["b"]}\n')
    with pytest.raises(DataError, match=rf"f\.jsonl:2: .*{match}"):
        load_text_splits(train_file=str(path), multi_label="auto")


def test_csv_cells_errors_and_single_label_mode(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("text,labels\nx,a|b\ny,a||b\n")
    with pytest.raises(DataError, match=r"f\.csv:3: .*holds an empty label"):
        load_text_splits(train_file=str(path), multi_label="auto", label_delimiter="|")
    with pytest.raises(DataError, match="needs --multi_label auto or true"):
        load_text_splits(train_file=str(path), multi_label="false", label_delimiter="|")
    # Single-label recipes (and --multi_label false) keep issue 16's error for lists, with the row.
    jsonl = write_table([{"text": "x", "labels": ["a"]}], tmp_path / "g.jsonl")
    with pytest.raises(DataError, match=r"g\.jsonl:1: .*is a list, and this data is read as single-label"):
        load_text_splits(train_file=str(jsonl))
    with pytest.raises(DataError, match=r"g\.jsonl:1: .*read as single-label: .*--multi_label auto or true"):
        load_text_splits(train_file=str(jsonl), multi_label="false")
    with pytest.raises(DataError, match="needs table files"):
        load_text_splits(data_dir=str(tmp_path), multi_label="true")


def test_carved_splits_stratify_by_each_rows_rarest_label(tmp_path):
    # 200 rows: "rare" on 10, "b" on 100, "c" on the rest (none on every 10th): an unstratified 10% split
    # of a 5% label often gets 0 or 3+ of its rows.
    rows = [
        {"text": f"text {i}", "labels": ["rare", "b"] if i % 20 == 0 else ["b"] if i % 2 else [] if i % 10 == 4 else ["c"]}
        for i in range(200)
    ]  # fmt: skip
    path = write_table(rows, tmp_path / "pool.jsonl")
    for seed in range(3):
        splits, stats = load_text_splits(train_file=str(path), multi_label="auto", split_seed=seed)
        rare = {s: sum("rare" in r["label"] for r in rows) for s, rows in splits.items()}
        assert rare == {"train": 8, "validation": 1, "test": 1}, (seed, rare)
        assert "stratified" in stats.split_made


# ---- Thresholds, losses ---------------------------------------------------------------------------------


def test_thresholds_are_f1_optimal_cuts_with_a_fallback_for_rare_labels():
    probs = np.array([0.9, 0.8, 0.35, 0.3, 0.2, 0.1])
    assert best_threshold(probs, np.array([1, 1, 1, 0, 0, 0])) == pytest.approx(
        0.325
    )  # F1 1 between 0.35/0.3
    assert best_threshold(probs, np.array([1, 0, 0, 0, 0, 0])) == pytest.approx(0.85)
    gold = np.array([[1, 1], [1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [0, 0]])  # label 2: 1 positive
    probs = np.array([[0.9, 0.9], [0.8, 0.1], [0.7, 0.1], [0.6, 0.1], [0.45, 0.1], [0.2, 0.1], [0.1, 0.1]])
    assert tune_thresholds(probs, gold).tolist() == [pytest.approx(0.325), FALLBACK]


def test_bce_loss_pos_weights_and_refusals():
    logits, labels = torch.randn(4, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert weighted_bce([1.0, 1.0, 1.0])({"logits": logits}, labels).item() == pytest.approx(plain.item())
    assert exact_eval_loss(logits.numpy(), labels.numpy()) == pytest.approx(plain.item())
    # auto: negatives / positives per label, capped at 10; a label without positives gets 1.
    targets = np.array([[1, 0, 0]] + [[0, 1, 0]] * 5 + [[0, 0, 0]] * 38, dtype=np.float32)
    assert pos_weights("auto", targets, ["a", "b", "c"]) == [10.0, pytest.approx(39 / 5), 1.0]
    with pytest.raises(DataError, match="one positive number per label"):
        pos_weights("1,2", targets, ["a", "b", "c"])

    class Args:
        label_smoothing_factor = 0.1

    with pytest.raises(DataError, match="label_smoothing_factor"):
        multi_label_loss(None, targets.tolist(), ["a", "b", "c"], Args())
    with pytest.raises(DataError, match="--pos_weight weights the positives of multi-label data"):
        multi_label_loss("auto", [0, 1, 2], ["a", "b", "c"], Args())


# ---- The recipe, predict and ONNX --------------------------------------------------------------------------


def recipe_args(tiny_model: str, out: Path, *extra: str) -> list[str]:
    # 8 epochs at a constant rate: fewer leave the tiny model's probabilities flat (all rows alike to
    # 1e-5), and a threshold test on flat probabilities would test float noise.
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(DATA / "train.json"),
        "--validation_file", str(DATA / "validation.json"),
        "--test_file", str(DATA / "test.json"),
        "--output_dir", str(out),
        "--num_train_epochs", "8", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--per_device_train_batch_size", "8",
        "--disable_tqdm", "true",
        # Windows of 16 tokens: chunk pooling (mean logit, then sigmoid) is exercised end to end.
        "--long_text", "chunks", "--max_length", "16", "--stride", "4",
        *extra,
    ]  # fmt: skip


def clear(row: dict, info: dict, margin: float = 1e-4) -> list[str]:
    """The labels of a prediction row whose probability is not within `margin` of its threshold."""
    return [n for n in info["labels"] if abs(row[f"p_{n}"] - info["thresholds"][n]) > margin]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "run"
    return out, textcls.main(recipe_args(tiny_model, out))


def test_run_saves_thresholds_scores_and_a_per_label_report(run):
    out, results = run
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "multi-label-classification" and info["labels"] == [
        "food",
        "news",
        "sports",
        "tech",
    ]
    assert set(info["thresholds"]) == set(info["labels"])
    assert info["thresholds"]["news"] == FALLBACK  # 4 positives in validation: too few to tune
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    for key in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert 0 <= results[f"test_{key}"] <= 1 and f"eval_{key}" in results
    assert results["test_chunk_rows"] > results["data_test_rows"] == 20
    assert {"baseline_test_micro_f1", "baseline_test_macro_f1"} <= set(results)
    assert ("baseline_warning" in results) == (results["test_micro_f1"] <= results["baseline_test_micro_f1"])
    report = json.loads((out / "test_report.json").read_text())
    assert set(info["labels"]) <= set(report) and "micro avg" in report
    preds = read_jsonl(out / "test_predictions.jsonl")
    gold = [[n in p["gold"] for n in info["labels"]] for p in preds]
    got = [[n in p["labels"] for n in info["labels"]] for p in preds]
    assert results["test_subset_accuracy"] == pytest.approx(
        np.mean([g == p for g, p in zip(gold, got, strict=True)])
    )
    for p in preds:  # each predicted list holds the labels at or above their saved thresholds
        sure = clear(p, info)
        assert [n for n in p["labels"] if n in sure] == [
            n for n in sure if p[f"p_{n}"] >= info["thresholds"][n]
        ]
    assert sum(len(clear(p, info)) for p in preds) > 0.8 * len(preds) * len(info["labels"])  # not vacuous


def test_thresholds_come_from_validation_only(run):
    out, _ = run
    model, tok, info = load_run(out)
    names, saved = info["labels"], np.array([info["thresholds"][n] for n in info["labels"]])
    tuned = {}
    for split in ("validation", "test"):
        rows = json.loads((DATA / f"{split}.json").read_text())
        probs = predict_texts(model, tok, [r["text"] for r in rows], info, progress=False)
        tuned[split] = tune_thresholds(probs, np.array([[n in r["labels"] for n in names] for r in rows]))
    # The saved thresholds are the validation rows' F1-best cuts; the test rows would have given others.
    np.testing.assert_allclose(saved, tuned["validation"], atol=1e-4)
    assert not np.allclose(saved, tuned["test"], atol=1e-3)


def test_predict_follows_the_saved_thresholds_and_matches_the_recipe(run, tmp_path):
    out, _ = run
    expected = read_jsonl(out / "test_predictions.jsonl")
    assert (
        cli(["predict", str(out), "--input", str(DATA / "test.json"), "--output", str(tmp_path / "a.jsonl")])
        == 0
    )
    got = read_jsonl(tmp_path / "a.jsonl")
    info = json.loads((out / "ftkit_run.json").read_text())
    names = info["labels"]
    for g, e in zip(got, expected, strict=True):
        assert [n for n in g["labels"] if n in clear(e, info)] == [
            n for n in e["labels"] if n in clear(e, info)
        ]
    np.testing.assert_allclose([[g[f"p_{n}"] for n in names] for g in got], [[e[f"p_{n}"] for n in names] for e in expected], atol=2e-5)  # fmt: skip
    # Move one threshold above or below every test probability of its label: predict follows the file.
    name = max(names, key=lambda n: sum(n in g["labels"] for g in got))
    edited = dict(info, thresholds={**info["thresholds"], name: 1.0})
    (out / "ftkit_run.json").write_text(json.dumps(edited))
    try:
        assert (
            cli(
                [
                    "predict",
                    str(out),
                    "--input",
                    str(DATA / "test.json"),
                    "--output",
                    str(tmp_path / "b.jsonl"),
                ]
            )
            == 0
        )
        high = read_jsonl(tmp_path / "b.jsonl")
        assert all(name not in h["labels"] for h in high)
        assert [[n for n in h["labels"]] for h in high] == [
            [n for n in g["labels"] if n != name] for g in got
        ]
        (out / "ftkit_run.json").write_text(
            json.dumps(dict(info, thresholds={**info["thresholds"], name: "x"}))
        )
        assert (
            cli(["predict", str(out), "--input", str(DATA / "test.json")]) == 2
        )  # a clear error, no traceback
    finally:
        (out / "ftkit_run.json").write_text(json.dumps(info))


def test_compress_choose_scores_micro_f1_and_its_run_applies_the_thresholds(run, tmp_path):
    from ftkit import choose

    out, results = run
    expected = read_jsonl(out / "test_predictions.jsonl")
    chosen = tmp_path / "chosen"
    assert cli(["compress", str(out), "--out", str(chosen), "--choose", "--candidates", "fp32"]) == 0
    record = json.loads((chosen / "compress.json").read_text())["choice"]
    # Scored on the run's test predictions (gold label lists) at the saved thresholds: the run's micro-F1.
    assert record["candidates"]["fp32"]["micro_f1"] == pytest.approx(results["test_micro_f1"], abs=1e-4)
    assert "micro_f1" in record["rule"]
    assert choose.choose({"fp32": {"texts_per_s": 1, "micro_f1": 0.5}}, metric="micro_f1") == "fp32"
    info = json.loads((chosen / "ftkit_run.json").read_text())
    assert info["thresholds"] == json.loads((out / "ftkit_run.json").read_text())["thresholds"]
    assert (
        cli(
            [
                "predict",
                str(chosen),
                "--input",
                str(DATA / "test.json"),
                "--output",
                str(tmp_path / "c.jsonl"),
            ]
        )
        == 0
    )
    for g, e in zip(read_jsonl(tmp_path / "c.jsonl"), expected, strict=True):
        assert [n for n in g["labels"] if n in clear(e, info)] == [
            n for n in e["labels"] if n in clear(e, info)
        ]


@pytest.mark.slow  # the ONNX export alone takes 30-40 s on 2 shared cores
def test_onnx_export_applies_the_thresholds(run, tmp_path):
    from ftkit import compress

    out, _ = run
    expected = read_jsonl(out / "test_predictions.jsonl")
    texts = [e["text"] for e in expected]
    onnx_dir = compress.export_onnx(out, tmp_path / "onnx", texts=texts[:4])
    info = json.loads((onnx_dir / "ftkit_run.json").read_text())
    assert info["thresholds"] == json.loads((out / "ftkit_run.json").read_text())["thresholds"]
    probs = predict_texts(compress.load_compressed(onnx_dir), load_run(out)[1], texts, info, progress=False)
    np.testing.assert_allclose(probs, [[e[f"p_{n}"] for n in info["labels"]] for e in expected], atol=1e-4)
    rows = prediction_rows([e["origin"] for e in expected], texts, probs, info)
    for row, e in zip(rows, expected, strict=True):  # equal labels where no probability sits at a threshold
        sure = clear(e, info, margin=1e-3)
        assert [n for n in row["labels"] if n in sure] == [n for n in e["labels"] if n in sure]


def test_pruning_losses_of_a_multi_label_model_are_per_label():
    from types import SimpleNamespace

    from ftkit.compress import _distillation_loss, _task_loss

    model = SimpleNamespace(config=SimpleNamespace(num_labels=3, problem_type="multi_label_classification"))
    logits, mask = torch.tensor([[2.0, -1.0, 0.5]]), torch.ones(1, 4)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0, 1.0]]))
    assert _task_loss(model, logits, mask).item() == pytest.approx(expected.item())
    # Distillation is smallest (the teacher's own entropy) when the student equals the teacher.
    teacher = torch.tensor([[1.0, -2.0, 0.0]])
    assert _distillation_loss(model, teacher, teacher, mask) < _distillation_loss(
        model, logits, teacher, mask
    )
