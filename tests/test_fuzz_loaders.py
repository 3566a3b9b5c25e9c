"""Hostile input through the loaders: a DataError naming the file, or rows; never another exception."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftkit import DataError
from ftkit.data import read_table
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
    # Blank lines are the only thing skipped, and every kept text keeps its line number.
    kept = [
        (n, line)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip()
    ]
    assert texts == [line for _, line in kept]
    assert origins == [f"{path}:{n}" for n, _ in kept]
