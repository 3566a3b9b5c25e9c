"""Sentence pairs (--text_pair_column) on the tiny model: segments and truncation, loaders and bad rows,
textcls and ratings end to end with `ftkit predict` on a pair table, ONNX, a RoBERTa-style model without
token types, and the pair baseline."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, BertTokenizerFast, RobertaConfig, RobertaModel

from ftkit import DataError
from ftkit.baseline import text_baseline
from ftkit.cli import main as ftkit_main
from ftkit.config import Options
from ftkit.data import load_text_splits, read_table
from ftkit.predict import load_run, predict_texts
from ftkit.text import decide_long_text, encode_texts, match_token_types

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import ratings  # noqa: E402
import textcls  # noqa: E402

COLUMNS = ["sentence1", "sentence2", "label", "score"]


def pair_rows(fixtures: Path, split: str, seed: int) -> list[dict]:
    """Pairs of the textcls fixture texts: `same` (score 5) when both are on one topic, else `different`
    (score 1). Built from the fixture texts so the tiny tokenizer knows the words."""
    with open(fixtures / "textcls" / f"{split}.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        same = i % 2 == 0
        others = [r for r in rows if (r["label"] == row["label"]) == same and r is not row]
        other = rng.choice(others)
        out.append(
            {
                "sentence1": row["text"],
                "sentence2": other["text"],
                "label": "same" if same else "different",
                "score": 5.0 if same else 1.0,
            }
        )
    return out


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    fixtures = Path(__file__).parent / "fixtures"
    return {s: write(root / f"{s}.csv", pair_rows(fixtures, s, n)) for n, s in enumerate(SPLITS)}


SPLITS = ("train", "validation", "test")


def recipe_args(model: str, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model,
        "--train_file", str(files["train"]),
        "--validation_file", str(files["validation"]),
        "--test_file", str(files["test"]),
        "--text_column", "sentence1",
        "--text_pair_column", "sentence2",
        "--output_dir", str(out),
        "--num_train_epochs", "1",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "8",
        "--max_length", "48",
        "--logging_steps", "2",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def textcls_run(tiny_model, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs-textcls") / "run"
    seen = []

    def recording(*args, **kwargs):  # the features the recipe gives the Trainer
        enc = encode_texts(*args, **kwargs)
        seen.append(enc)
        return enc

    mp = pytest.MonkeyPatch()
    mp.setattr(textcls, "encode_texts", recording)
    try:
        results = textcls.main(recipe_args(tiny_model, pair_files, out, "--label_column", "label"))
    finally:
        mp.undo()
    return out, results, seen


# ---- Encoding ---------------------------------------------------------------------------------------


def test_pairs_are_two_segments_cut_longest_first(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode_texts(tok, ["team score goal"], 32, pairs=["new food"])
    ids, types = enc["input_ids"][0], enc["token_type_ids"][0]
    first = tok("team score goal", add_special_tokens=False)["input_ids"]
    second = tok("new food", add_special_tokens=False)["input_ids"]
    assert ids == [tok.cls_token_id, *first, tok.sep_token_id, *second, tok.sep_token_id]
    assert types == [0] * (len(first) + 2) + [1] * (len(second) + 1)
    assert enc["truncated"] == [0] and enc["length"] == [len(ids)] and enc["chunk_of"] == [0]

    # longest_first: a long first text loses tokens until both fit; the short second stays whole.
    long = " ".join(["team score goal"] * 20)
    cut = encode_texts(tok, [long, "food"], 16, pairs=["new food", long])
    assert [len(x) for x in cut["input_ids"]] == [16, 16] and cut["truncated"] == [1, 1]
    n_second = len(second)
    assert cut["token_type_ids"][0].count(1) == n_second + 1  # [SEP] included
    assert cut["input_ids"][0][-(n_second + 1) :] == [*second, tok.sep_token_id]
    expected = tok([long, "food"], ["new food", long], truncation="longest_first", max_length=16)
    assert cut["input_ids"] == expected["input_ids"]


def test_long_text_policy_for_pairs(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    options = Options(origins={"long_text": "default", "max_length": "default", "text_pair_column": "cli"})
    args = textcls.DataArguments(max_length=8)
    texts, pairs = ["team score goal today match"] * 3, ["food"] * 3
    decided = decide_long_text(options, args, tok, texts, pairs=pairs)
    assert (
        decided.long_text == "head" and decided.max_length == 256
    )  # pairs: never chunked; grown as one text
    why = options.decided["long_text"]["why"]
    assert "longest_first" in why and "so max_length 256; 0 of 3 training pairs exceed 256" in why
    options.origins["max_length"] = "cli"  # a length the user set stays
    decided = decide_long_text(options, args, tok, texts, pairs=pairs)
    assert decided.long_text == "head" and decided.max_length == 8
    assert "3 of 3 training pairs exceed 8" in options.decided["long_text"]["why"]
    for policy in ("chunks", "head_tail"):
        with pytest.raises(DataError, match=f"--long_text {policy} does not apply to sentence pairs"):
            decide_long_text(options, textcls.DataArguments(long_text=policy), tok, ["a"], pairs=["b"])
    with pytest.raises(DataError, match="reads one text per row"):  # e.g. sentiment: one text per row
        decide_long_text(options, args, tok, ["a"])
    with pytest.raises(DataError, match="does not apply to sentence pairs"):
        encode_texts(tok, ["a"], 16, "chunks", pairs=["b"])


# ---- Loading and bad rows --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_pairs_load_from_every_table_format(tmp_path, suffix):
    rows = [
        {"sentence1": "a cat sat", "sentence2": "a cat was sitting", "label": "yes", "score": 4.5},
        {"sentence1": "a cat sat", "sentence2": "dogs bark", "label": "no", "score": 0.5},  # same premise
    ]
    path = write(tmp_path / f"pairs{suffix}", rows)
    got, text_col, label_col = read_table(path, "sentence1", "label", text_pair_column="sentence2")
    assert (text_col, label_col) == ("sentence1", "label")
    assert [(r["text"], r["text_pair"], r["label"]) for r in got] == [
        ("a cat sat", "a cat was sitting", "yes"),
        ("a cat sat", "dogs bark", "no"),
    ]
    # One premise with two hypotheses is two inputs: dedupe keeps both when ftkit splits.
    path = write(
        tmp_path / f"many{suffix}", rows * 10 + [{**rows[0], "sentence2": f"x {i}"} for i in range(8)]
    )
    splits, stats = load_text_splits(
        train_file=str(path), text_column="sentence1", text_pair_column="sentence2", label_column="label"
    )
    assert stats.duplicates_removed == 18 and sum(stats.rows.values()) == 10
    assert stats.columns == {"text_column": "sentence1", "text_pair_column": "sentence2"}


def test_pairs_from_a_hub_dataset(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "contradiction"]),
        }
    )
    rows = {"premise": ["a cat sat", "a cat sat"], "hypothesis": ["a cat", "no cat"], "label": [0, 1]}
    fake = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(rows, features=features)
            for split in ("train", "validation", "test")
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: fake)
    splits, stats = load_text_splits(
        dataset_name="someone/nli", text_column="premise", text_pair_column="hypothesis"
    )
    assert [(r["text"], r["text_pair"], r["label"]) for r in splits["test"]] == [
        ("a cat sat", "a cat", "entailment"),
        ("a cat sat", "no cat", "contradiction"),
    ]
    rows["hypothesis"][1] = " "
    fake["train"] = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(DataError, match=r"someone/nli\[train\]:1: empty or missing second text"):
        load_text_splits(dataset_name="someone/nli", text_column="premise", text_pair_column="hypothesis")


def test_bad_pair_rows_name_file_and_line(tmp_path):
    good = {"sentence1": "a cat sat", "sentence2": "a cat", "label": "yes", "score": 1.0}
    path = write(tmp_path / "bad.csv", [good, {**good, "sentence2": ""}])
    with pytest.raises(DataError, match=r"bad\.csv:3: empty or missing second text in column 'sentence2'"):
        read_table(path, "sentence1", "label", text_pair_column="sentence2")
    path = write(tmp_path / "bad.jsonl", [good, good, {k: v for k, v in good.items() if k != "sentence2"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: empty or missing second text"):
        read_table(path, "sentence1", "label", text_pair_column="sentence2")
    with pytest.raises(DataError, match="no text_pair column 'hypothesis'"):
        read_table(path, "sentence1", "label", text_pair_column="hypothesis")
    (tmp_path / "tree" / "sports").mkdir(parents=True)
    (tmp_path / "tree" / "sports" / "1.txt").write_text("a match")
    with pytest.raises(DataError, match="--text_pair_column needs table files"):
        load_text_splits(data_dir=str(tmp_path / "tree"), text_pair_column="sentence2")


# ---- Recipes and ftkit predict --------------------------------------------------------------------


def predict_table(run_dir: Path, table: Path, tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / f"pred-{run_dir.name}.jsonl"
    assert ftkit_main(["predict", str(run_dir), "--input", str(table), "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_textcls_pairs_reach_the_model_as_segments_and_predict_matches(textcls_run, pair_files, tmp_path):
    out, results, seen = textcls_run
    # Every split was encoded as pairs: segment 0 then segment 1, with both present in every row.
    assert seen and all("token_type_ids" in enc for enc in seen)
    for types in (t for enc in seen for t in enc["token_type_ids"]):
        assert types[0] == 0 and types[-1] == 1 and types == sorted(types)
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["text_column"] == "sentence1" and info["text_pair_column"] == "sentence2"
    assert info["long_text"] == "head"
    manifest = json.loads((out / "manifest.json").read_text())
    assert "longest_first" in manifest["options"]["decided"]["long_text"]["why"]
    for key in ("baseline_test_accuracy", "baseline_test_macro_f1", "baseline_beaten"):
        assert key in results
    recipe = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(recipe) == 12 and all(r["text_pair"] for r in recipe)

    predicted = predict_table(out, pair_files["test"], tmp_path)
    assert [p["label"] for p in predicted] == [r["label"] for r in recipe]
    assert [(p["text"], p["text_pair"]) for p in predicted] == [(r["text"], r["text_pair"]) for r in recipe]
    for p, r in zip(predicted, recipe, strict=True):
        assert p["p_same"] == pytest.approx(r["p_same"], abs=1e-5)

    # The model card's plain-transformers usage: pipeline with text + text_pair gives the same label.
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out), device="cpu")
    first = classify({"text": recipe[0]["text"], "text_pair": recipe[0]["text_pair"]})
    first = first[0] if isinstance(first, list) else first
    assert first["label"] == recipe[0]["label"]
    assert "text_pair" in (out / "README.md").read_text()

    txt = tmp_path / "texts.txt"
    txt.write_text("a match today\n")
    assert ftkit_main(["predict", str(out), "--input", str(txt)]) == 2  # refused, with a message
    with pytest.raises(DataError, match="trained on sentence pairs; a .txt has one text per line"):
        from ftkit.predict import read_pair_inputs

        read_pair_inputs(txt, info)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(pair_files["test"].read_text().replace("sentence1,sentence2", "premise,hypothesis", 1))
    again = predict_table(
        out, renamed, tmp_path, "--text_column", "premise", "--text_pair_column", "hypothesis"
    )
    assert [p["label"] for p in again] == [r["label"] for r in recipe]


def test_serve_takes_pairs_and_answers_as_ftkit_predict(textcls_run, pair_files, tmp_path):
    from ftkit.serve import Limits, RequestError, load_predictor, parse_texts

    out, _, _ = textcls_run
    expected = predict_table(out, pair_files["test"], tmp_path)
    body = {"texts": [r["text"] for r in expected], "text_pairs": [r["text_pair"] for r in expected]}
    texts, origins = parse_texts(json.dumps(body).encode(), Limits(), pairs=True)
    got = load_predictor(out, linear_backend="torch").predict(texts, origins)
    assert [(g["text"], g["text_pair"], g["label"]) for g in got] == [
        (e["text"], e["text_pair"], e["label"]) for e in expected
    ]
    assert all(
        g["p_same"] == pytest.approx(e["p_same"], abs=1e-5) for g, e in zip(got, expected, strict=True)
    )
    one = parse_texts(b'{"text": "a", "text_pair": "b"}', Limits(), pairs=True)
    assert one == ([("a", "b")], ["text"])
    for bad, message in (
        ({"texts": ["a"]}, "this run reads sentence pairs"),
        ({"texts": ["a", "b"], "text_pairs": ["c"]}, '"texts" has 2 texts and "text_pairs" 1'),
        ({"text": "a", "text_pair": " "}, "text_pair is empty"),
    ):
        with pytest.raises(RequestError, match=message) as err:
            parse_texts(json.dumps(bad).encode(), Limits(), pairs=True)
        assert err.value.status == 422
    with pytest.raises(RequestError, match="unknown field"):  # a one-text run takes no second texts
        parse_texts(json.dumps(body).encode(), Limits())


def test_compress_batches_of_pairs_carry_segments(textcls_run):
    from ftkit.compress import _batches

    tok = load_run(textcls_run[0])[1]
    (batch,) = _batches(tok, [("team score goal", "new food"), ("a match", "cooking")], 8, 48)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}  # what the ONNX graph is traced on
    assert (
        batch["token_type_ids"][0].tolist().count(1)
        == len(tok("new food", add_special_tokens=False)["input_ids"]) + 1
    )


@pytest.mark.slow  # one ONNX export: 20-30 s on 2 shared cores (test_compress covers the exporter itself)
def test_onnx_export_takes_pairs(textcls_run, tmp_path):
    from ftkit.compress import compress_run, load_compressed

    out = textcls_run[0]
    model, tok, info = load_run(out)
    texts, pairs = ["team score goal today", "new food"], ["a match", "cooking pasta with tomatoes today"]
    onnx_dir = compress_run(out, tmp_path / "onnx", onnx=True, texts=list(zip(texts, pairs, strict=True)))
    onnx_model = load_compressed(onnx_dir)
    assert "token_type_ids" in {i.name for i in onnx_model.session.get_inputs()}
    expected = predict_texts(model, tok, texts, info, pairs=pairs, progress=False)
    got = predict_texts(onnx_model, tok, texts, info, pairs=pairs, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(DataError, match="give the second texts too"):
        predict_texts(model, tok, texts, info, progress=False)


def test_ratings_similarity_scores_on_pairs(tiny_model, pair_files, tmp_path):
    out = tmp_path / "sim"
    results = ratings.main(recipe_args(tiny_model, pair_files, out, "--label_column", "score"))
    assert {"test_rmse", "test_pearson", "baseline_test_rmse", "baseline_beaten"} <= set(results)
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "regression" and info["text_pair_column"] == "sentence2"
    recipe = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    predicted = predict_table(out, pair_files["test"], tmp_path)
    assert [p["score"] for p in predicted] == pytest.approx([r["score"] for r in recipe], abs=1e-5)
    assert [r["gold"] for r in recipe] == [
        float(r["score"]) for r in csv.DictReader(pair_files["test"].open())
    ]


# ---- Models without token types --------------------------------------------------------------------


@pytest.fixture(scope="module")
def roberta_style(tiny_model, tmp_path_factory) -> str:
    """A 2-layer RoBERTa (type_vocab_size 1) whose tokenizer returns no token_type_ids."""
    out = tmp_path_factory.mktemp("tiny-roberta")
    tok = BertTokenizerFast.from_pretrained(tiny_model, model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out)
    config = RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=140, type_vocab_size=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    RobertaModel(config).save_pretrained(out)
    return str(out)


def test_roberta_style_model_trains_and_predicts_pairs(roberta_style, pair_files, tmp_path):
    out = tmp_path / "roberta"
    results = textcls.main(recipe_args(roberta_style, pair_files, out, "--label_column", "label"))
    assert 0 <= results["test_accuracy"] <= 1
    model, tok, info = load_run(out)
    enc = encode_texts(tok, ["team score"], 32, pairs=["new food"])
    assert "token_type_ids" not in enc  # the two texts are told apart by the separator alone
    recipe = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    predicted = predict_table(out, pair_files["test"], tmp_path)
    assert [p["label"] for p in predicted] == [r["label"] for r in recipe]


def test_token_types_dropped_for_a_model_with_one_segment_type(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    match_token_types(tok, RobertaConfig(type_vocab_size=2))
    assert "token_type_ids" in encode_texts(tok, ["a"], 16, pairs=["b"])
    match_token_types(tok, RobertaConfig(type_vocab_size=1))
    assert "token_type_ids" not in encode_texts(tok, ["a"], 16, pairs=["b"])


# ---- Baseline ---------------------------------------------------------------------------------------


def test_pair_baseline_uses_both_sides():
    # The label says whether the second text repeats the first: neither text alone tells.
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]

    def rows(n: int) -> list[dict]:
        out = []
        for i in range(n):
            first = rng.sample(words, 6)
            same = i % 2 == 0
            second = rng.sample(first, 4) if same else rng.sample([w for w in words if w not in first], 4)
            out.append(
                {"text": " ".join(first), "text_pair": " ".join(second), "label": "yes" if same else "no"}
            )
        return out

    splits = {"train": rows(400), "validation": rows(100), "test": rows(100)}
    pairs = text_baseline(splits, "text-classification")
    firsts = text_baseline(
        {s: [{k: v for k, v in r.items() if k != "text_pair"} for r in rs] for s, rs in splits.items()},
        "text-classification",
    )
    assert set(pairs) == set(firsts)  # the same keys as a one-text run
    assert pairs["baseline_test_accuracy"] >= 0.9 > 0.7 >= firsts["baseline_test_accuracy"]
    scores = {
        s: [{**r, "label": 5.0 if r["label"] == "yes" else 1.0} for r in rs] for s, rs in splits.items()
    }
    assert text_baseline(scores, "regression")["baseline_test_pearson"] >= 0.9
