"""Hostile input through the loaders: a DataError naming the file, or rows; never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftkit import DataError
from ftkit.conll import read_conll, read_json_tags
from ftkit.data import load_text_splits, read_table
from ftkit.predict import read_inputs

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_or_error(path: Path, reader) -> None:
    try:
        rows = reader(path)
    except DataError as err:
        assert str(path) in str(err), f"error must name the file: {err}"
        return
    # Whatever loads is complete: every row has a non-empty text and an origin inside the file.
    for row in rows:
        assert row["text"].strip() and row["origin"].startswith(str(path))


@SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]))
def test_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(data)
    _load_or_error(path, lambda p: read_table(p)[0])


@SETTINGS
@given(
    texts=st.lists(st.text(max_size=60), min_size=0, max_size=8),
    labels=st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=5), st.none()), min_size=0, max_size=8),
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
)
def test_mixed_encodings_and_missing_values_in_jsonl_and_csv(tmp_path, texts, labels, encoding):
    records = [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=False)]
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_bytes(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(encoding, errors="replace")
    )
    _load_or_error(jsonl, lambda p: read_table(p)[0])
    csv_path = tmp_path / "f.csv"
    body = "text,label\n" + "".join(
        f'"{r["text"].replace(chr(34), "")}",{r["label"] if r["label"] is not None else ""}\n'
        for r in records
    )
    csv_path.write_bytes(body.encode(encoding, errors="replace"))
    _load_or_error(csv_path, lambda p: read_table(p)[0])


@SETTINGS
@given(lines=st.lists(st.text(max_size=40), max_size=6), long_factor=st.integers(0, 10))
def test_prediction_inputs_including_very_long_lines(tmp_path, lines, long_factor):
    path = tmp_path / "in.txt"
    lines = [line.replace("\r", " ").replace("\n", " ") for line in lines]
    if long_factor:
        lines.append("word " * (128 * long_factor))  # up to ten times a typical max_length
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        texts, origins = read_inputs(path)
    except DataError as err:
        assert str(path) in str(err)
        return
    # Blank lines are the only thing skipped, and every kept text keeps its line number (lines end at
    # \n only: U+2028, U+0085 or a form feed inside a line do not split it). A leading BOM is dropped.
    written = [lines[0].removeprefix("\ufeff"), *lines[1:]] if lines else []
    kept = [(n, line) for n, line in enumerate(written, start=1) if line.strip()]
    assert texts == [line for _, line in kept]
    assert origins == [f"{path}:{n}" for n, _ in kept]


# ---- edge cases that once changed the input silently ---------------------------------------------------


def test_lines_end_at_newline_only(tmp_path):
    txt = tmp_path / "in.txt"
    txt.write_text("one\u2028still one\ntwo\x0cstill two\r\nthree\x85\nfour\n", encoding="utf-8")
    texts, origins = read_inputs(txt)
    assert texts == ["one\u2028still one", "two\x0cstill two", "three\x85", "four"]
    assert origins == [f"{txt}:{n}" for n in (1, 2, 3, 4)]
    jsonl = tmp_path / "f.jsonl"  # what ftkit writes itself (ensure_ascii=False keeps U+2028 raw)
    jsonl.write_text(
        json.dumps({"text": "a\u2028b", "label": "x"}, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    assert read_table(jsonl)[0][0]["text"] == "a\u2028b"


def test_conll_with_cr_only_line_ends_and_a_bom(tmp_path):
    path = tmp_path / "mac.conll"
    words = [f"w{i} O" for i in range(1000)]
    path.write_bytes(("\ufeff-DOCSTART- O\r\r" + "\r".join(words) + "\r").encode("utf-8"))
    sentences = read_conll(path)
    assert len(sentences) == 1 and len(sentences[0].tokens) == 1000 and sentences[0].tokens[0] == "w0"
    assert sentences[0].lines[0] == 3


def test_csv_with_a_bom_and_a_huge_cell(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nshort,a\n".encode() + b'"' + b"x" * 5_000_000 + b'",b\n')
    rows, text_col, _ = read_table(path)
    assert text_col == "text" and len(rows[1]["text"]) == 5_000_000 and rows[1]["origin"] == f"{path}:3"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "t", "label": true}', "is a boolean"),
        ('{"text": "t", "label": NaN}', "empty or missing label"),
        ('{"text": "t", "label": [1]}', "is a list, and this data is read as single-label"),
        ('{"text": "t", "label": "[\'sport\']"}', "looks like a list written as text"),
        ('{"text": "t", "label": "nan"}', "empty or missing label"),
    ],
)
def test_labels_that_are_not_class_names_name_the_row(tmp_path, line, match):
    path = tmp_path / "f.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"f\.jsonl:2: .*{match}"):
        read_table(path)


def test_nul_bytes_are_refused_with_their_line(tmp_path):
    for name, body in (("f.csv", b"text,label\nok,a\nbad\x00,b\n"), ("f.txt", b"ok\nbad\x00\n")):
        (tmp_path / name).write_bytes(body)
        with pytest.raises(DataError, match=rf"{name}:3: NUL" if name == "f.csv" else rf"{name}:2: NUL"):
            (read_table if name == "f.csv" else read_inputs)(tmp_path / name)
    (tmp_path / "f.conll").write_bytes(b"a O\nb\x00 O\n")
    with pytest.raises(DataError, match=r"f\.conll:2: NUL"):
        read_conll(tmp_path / "f.conll")


def test_ner_tokens_with_whitespace_are_refused_when_loading(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"tokens": ["ok"], "tags": ["O"]}\n{"tokens": ["New York"], "tags": ["B-LOC"]}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:2: token 'New York' is empty or contains whitespace"):
        read_json_tags(path)


def test_conflicting_duplicate_labels_in_given_splits_are_counted(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nsame,a\nsame,b\nother,a\nmore,b\n")
    (tmp_path / "test.csv").write_text("text,label\nother,b\nmore,b\n")
    files = {"train_file": str(tmp_path / "train.csv"), "validation_file": str(tmp_path / "test.csv")}
    _, stats = load_text_splits(**files, test_file=str(tmp_path / "test.csv"))
    assert stats.duplicate_label_conflicts == 2  # "same" within train, "other" across splits
