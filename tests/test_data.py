"""Data loading: formats, layouts, splits, labels, and a clear error for each kind of bad input."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest

from ftkit import DataError
from ftkit.data import (
    check_labels,
    label_maps,
    load_bbc_news,
    load_text_splits,
    read_class_folders,
    read_table,
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


ROWS = [{"text": f"doc {i} about {c}", "label": c} for i in range(6) for c in ("a", "b")]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_table_format_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        write(path, "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    elif suffix == ".tsv":
        write(path, "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
    elif suffix == ".json":
        write(path, json.dumps(ROWS))
    elif suffix == ".jsonl":
        write(path, "".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    rows, text_col, label_col = read_table(path)
    assert (text_col, label_col) == ("text", "label")
    assert [(r["text"], r["label"]) for r in rows] == [(r["text"], r["label"]) for r in ROWS]


def test_columns_are_detected_or_named(tmp_path):
    path = write(tmp_path / "t.csv", "id,words,topic\n1,hello world,x\n2,bye world,y\n")
    with pytest.raises(DataError, match=r"t\.csv: cannot tell which column holds the text.*--text_column"):
        read_table(path)
    with pytest.raises(DataError, match=r"t\.csv: cannot tell which column holds the label.*--label_column"):
        read_table(path, text_column="words")
    rows, _, label_col = read_table(path, text_column="words", label_column="topic")
    assert label_col == "topic" and rows[1]["text"] == "bye world" and rows[1]["label"] == "y"
    with pytest.raises(DataError, match=r"t\.csv: no label column 'stars'"):
        read_table(path, text_column="words", label_column="stars")
    rows, text_col, label_col = read_table(write(tmp_path / "u.csv", "id,body,category\n1,hi,x\n"))
    assert (text_col, label_col) == ("body", "category")


def test_int_labels_sort_numerically_and_strings_alphabetically():
    assert list(label_maps([10, 2, 1, 2])[0]) == ["1", "2", "10"]
    assert list(label_maps(["neg", "pos", "neg"])[0]) == ["neg", "pos"]
    assert list(label_maps([1.0, 0.0])[0]) == ["0", "1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\nhello,a\n,b\n", r"bad\.csv:3: empty or missing text"),
        ("text,label\nhello,a\nworld,\n", r"bad\.csv:3: empty or missing label"),
        ("text,label\n", r"bad\.csv: only a header, no data rows"),
        ("", r"bad\.csv: file is empty"),
        ("text,label\nhello,a,extra\n", r"bad\.csv:2: more fields than the header"),
        (
            b"text,label\nok,a\ncaf\xe9 au lait,b\n",
            r"bad\.csv:3: not valid utf-8 \(byte 0xe9 at column 4\).*--encoding_errors replace",
        ),
    ],
)
def test_bad_table_input_names_file_and_line(tmp_path, content, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=message):
        read_table(path)


def test_bad_jsonl_names_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_table(path)


def test_replacement_decoding_only_when_asked(tmp_path):
    path = write(tmp_path / "latin.csv", b"text,label\ncaf\xe9,a\ntea,b\n")
    rows, _, _ = read_table(path, encoding_errors="replace")
    assert rows[0]["text"] == "caf\ufffd"
    rows, _, _ = read_table(path, encoding="latin-1")
    assert rows[0]["text"] == "café"


def test_fewer_than_two_classes_is_an_error(tmp_path):
    path = write(tmp_path / "one.csv", "text,label\n" + "".join(f"{w},x\n" for w in "abcdefgh"))
    with pytest.raises(DataError, match="1 class"):
        load_text_splits(train_file=str(path))


def test_unseen_eval_label_fails_or_is_added():
    splits = {
        "train": [{"text": "a", "label": "x", "origin": "t:2"}],
        "test": [{"text": "b", "label": "z", "origin": "test.csv:7"}],
    }
    label2id, _ = label_maps(["x", "y"])
    with pytest.raises(
        DataError,
        match=r"test\.csv:7: label 'z' in the test split never occurs in training.*--add_unseen_labels",
    ):
        check_labels(splits, dict(label2id), add_unseen=False)
    assert check_labels(splits, label2id, add_unseen=True) == ["z"] and label2id["z"] == 2


def _news_tree(root: Path, per_class: int = 5) -> None:
    for split in ("20news-bydate-train", "20news-bydate-test"):
        for group in ("comp.graphics", "rec.autos", "sci.space"):
            for i in range(per_class):
                write(
                    root / split / group / f"{1000 + i}",
                    f"From: someone\nSubject: {group} {i}\n\nbody {group} {split} {i}\n",
                )


def test_20news_bydate_folder_and_tarball(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "20news-bydate"
    _news_tree(root)
    splits = read_class_folders(root)
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 15
    assert {r["label"] for r in splits["test"]} == {"comp.graphics", "rec.autos", "sci.space"}

    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "20news-bydate-train", arcname="20news-bydate-train")
        tar.add(root / "20news-bydate-test", arcname="20news-bydate-test")
    splits2, stats = load_text_splits(data_dir=str(archive), validation_fraction=0.2, split_seed=1)
    # train + test given; validation carved from train, stratified: one per class.
    assert stats.rows == {"train": 12, "test": 15, "validation": 3}
    assert Counter(r["label"] for r in splits2["validation"]) == {
        "comp.graphics": 1,
        "rec.autos": 1,
        "sci.space": 1,
    }


def test_class_folder_non_utf8_document_names_the_file(tmp_path):
    write(tmp_path / "d" / "pos" / "1.txt", "good")
    write(tmp_path / "d" / "neg" / "2.txt", b"bad \xff byte")
    with pytest.raises(DataError, match=r"neg/2\.txt:1: not valid utf-8"):
        read_class_folders(tmp_path / "d")


def test_splits_are_stratified_seeded_and_deduplicated(tmp_path):
    lines = (
        ["text,label"] + [f"text {i} of {c},{c}" for c in "abc" for i in range(20)] + ["text 0 of a,a"] * 3
    )
    path = write(tmp_path / "all.csv", "\n".join(lines) + "\n")
    s1, stats = load_text_splits(train_file=str(path), split_seed=7)
    s2, _ = load_text_splits(train_file=str(path), split_seed=7)
    s3, _ = load_text_splits(train_file=str(path), split_seed=8)
    assert stats.duplicates_removed == 3 and stats.rows == {"train": 48, "test": 6, "validation": 6}
    assert Counter(r["label"] for r in s1["test"]) == {"a": 2, "b": 2, "c": 2}
    assert [r["text"] for r in s1["test"]] == [r["text"] for r in s2["test"]]
    assert [r["text"] for r in s1["test"]] != [r["text"] for r in s3["test"]]
    seen = {r["text"] for r in s1["train"]}
    assert not any(r["text"] in seen for r in s1["test"] + s1["validation"])


@pytest.mark.parametrize("rows, ok", [(2, False), (6, False), (7, True)])
def test_too_few_rows_to_carve_splits_is_a_clear_error(tmp_path, rows, ok):
    path = write(
        tmp_path / "few.csv", "text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(rows))
    )
    if ok:  # one validation row, one test row, five to train on
        assert load_text_splits(train_file=str(path))[1].rows == {"train": 5, "test": 1, "validation": 1}
        return
    with pytest.raises(DataError, match=rf"few.csv: {rows} distinct training rows are too few to carve"):
        load_text_splits(train_file=str(path))  # was a scikit-learn ValueError from inside the split


def test_hub_dataset_path_maps_class_label_names(monkeypatch):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    fake = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features
            ),
            "test": datasets.Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}, features=features),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: fake)
    splits, stats = load_text_splits(dataset_name="someone/reviews", validation_fraction=0.5)
    assert stats.source == "someone/reviews" and splits["test"][0]["label"] == "pos"


def test_builtin_bbc_news_has_its_documented_shape():
    rows, fallback = load_bbc_news()
    assert len(rows) == 2225 and fallback == 1
    assert Counter(r["label"] for r in rows)["sports"] == 511
    splits, stats = load_text_splits(dataset_name="bbc-news", split_seed=42)
    assert stats.duplicates_removed == 98
    assert sum(stats.rows.values()) == 2225 - 98
    assert abs(stats.rows["test"] - 0.1 * 2127) <= 1 and stats.train_test_overlap == 0


def test_archive_extraction_is_atomic_and_a_lost_race_uses_the_winner(tmp_path, monkeypatch):
    import os

    import ftkit.data

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _news_tree(tmp_path / "tree")
    archive = tmp_path / "news.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "20news-bydate-train", arcname="20news-bydate-train")
    extracted = Path(tmp_path / "home" / ".cache" / "ftkit" / "extracted")
    extractall, rename, seen = tarfile.TarFile.extractall, os.rename, []

    def other_rank_meanwhile(self, target, **kwargs):
        seen.append(list(extracted.glob("news.tar.gz-*")))  # nothing half-extracted under the final name
        extractall(self, target, **kwargs)

    def lose_race(src, dst):
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(ftkit.data.os, "getpid", lambda: 1)  # another rank extracts and renames first
        ftkit.data.extract_archive(archive)
        rename(src, dst)  # fails: dst exists now

    monkeypatch.setattr(tarfile.TarFile, "extractall", other_rank_meanwhile)
    monkeypatch.setattr(os, "rename", lose_race)
    root = ftkit.data.extract_archive(archive)
    assert seen == [[], []] and (root / "20news-bydate-train").is_dir()
    assert [p.name for p in extracted.iterdir()] == [root.name]  # no temp folders left
