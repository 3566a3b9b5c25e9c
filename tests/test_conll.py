import json
import logging
import re

import pytest

from ftkit import DataError
from ftkit.conll import (
    Sentence,
    detect_scheme,
    hold_out,
    load_tagged_splits,
    read_conll,
    read_json_tags,
    read_tagged_file,
    to_iob2,
    write_conll,
)


def write(tmp_path, text, name="data.conll"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_fixture_with_documents_and_last_column(fixtures):
    sentences = read_conll(fixtures / "ner" / "train.conll")
    assert len(sentences) == 39
    assert sorted({s.doc_id for s in sentences}) == [0, 1, 2, 3]
    first = sentences[0]
    assert first.tokens[:4] == ["New", "York", "beat", "Paris"]
    assert first.tags[:4] == ["B-LOC", "I-LOC", "O", "B-LOC"]
    assert first.lines[:2] == [3, 4]  # line 1 is -DOCSTART-, line 2 blank
    assert max(len(s.tokens) for s in sentences) == 67


def test_tag_column_is_selectable_and_iob1_is_converted(tmp_path):
    path = write(tmp_path, "EU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\ncall NN I-NP O\n")
    assert read_conll(path, tag_column=2)[0].tags == ["B-NP", "B-VP", "B-NP", "I-NP"]
    assert read_conll(path)[0].tags == ["B-ORG", "O", "B-MISC", "O"]


def test_iob2_with_stray_i_chunk_starts_reads_as_iob1(tmp_path):
    path = write(tmp_path, "a B-PER\nb I-PER\nc O\nd I-LOC\ne I-LOC\n")
    assert read_conll(path)[0].tags == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    with pytest.raises(DataError, match="data.conll:4: invalid IOB2 sequence: I-LOC follows O"):
        read_conll(path, scheme="IOB2")


def test_tabs_and_whitespace_only_lines_and_docstart(tmp_path):
    text = "-DOCSTART-\tO\n\nYork\tB-LOC\nis\tO\n \t \nBerlin\tB-LOC\n-DOCSTART-\tO\nParis\tB-LOC\n"
    sentences = read_conll(write(tmp_path, text))
    assert [s.tokens for s in sentences] == [["York", "is"], ["Berlin"], ["Paris"]]
    assert [s.doc_id for s in sentences] == [0, 0, 1]
    # A word is one field of the CoNLL output (test_predictions.conll): a space inside one is refused
    # when loading, not after training.
    with pytest.raises(DataError, match=r"data.conll:3: token 'New York' is empty or contains whitespace"):
        read_conll(write(tmp_path, text.replace("York", "New York")))


def test_schemes_convert_to_the_same_iob2(tmp_path):
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"]
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "O", "I-ORG", "I-ORG", "I-ORG"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "S-LOC", "O", "B-ORG", "I-ORG", "E-ORG"]
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
    for scheme, tags in [("IOB2", iob2), ("IOB1", iob1), ("BIOES", bioes)]:
        assert detect_scheme([tags]) == scheme
        assert to_iob2(tags, scheme) == iob2
        path = write(tmp_path, "".join(f"{w} {t}\n" for w, t in zip(words, tags, strict=True)))
        assert read_conll(path)[0].tags == iob2
        assert read_conll(path, scheme=scheme)[0].tags == iob2


@pytest.mark.parametrize(
    ("text", "scheme", "message"),
    [
        ("a X B-PER\nb I-PER\n", "auto", "data.conll:2: found 2 columns, expected 3 as on line 1"),
        ("a B-PER\nb X I-PER\n", "auto", "data.conll:2: found 3 columns, expected 2 as on line 1"),
        ("a B-PER\n\nb PER\n", "auto", "data.conll:3: tag 'PER' is not O or <prefix>-<TYPE>"),
        ("a B-PER\nb E-PER\n", "IOB2", "data.conll:2: tag 'E-PER' is outside the IOB2 scheme"),
        ("a O\nb I-PER\n", "IOB2", "data.conll:2: invalid IOB2 sequence: I-PER follows O (is the file IOB1?"),
        ("a B-PER\nb I-LOC\n", "IOB2", "data.conll:2: invalid IOB2 sequence: I-LOC follows B-PER"),
        ("a B-PER\nb O\n", "BIOES", "data.conll:2: invalid BIOES sequence: B-PER is not closed"),
        ("a\n", "auto", "data.conll:1: need a word column and a tag column"),
        ("", "auto", "data.conll: no sentences found"),
        ("\n  \n\t\n", "auto", "data.conll: no sentences found"),
        ("-DOCSTART- O\n\n", "auto", "data.conll: no sentences found"),
        ("a O\n", "IOB3", "unknown tag scheme 'IOB3'"),
    ],
)
def test_bad_conll_names_file_and_line(tmp_path, text, scheme, message):
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read_conll(write(tmp_path, text), scheme=scheme)
    assert str(tmp_path / "data.conll") in str(e.value) or "scheme" in message


def test_bad_tag_column_and_encoding(tmp_path):
    with pytest.raises(DataError, match=r"data.conll:1: tag column 0 is not one of columns 1..2"):
        read_conll(write(tmp_path, "a X O\n"), tag_column=0)
    path = tmp_path / "latin1.conll"
    path.write_bytes("a O\n\nb\xe9 O\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.conll:3: not valid UTF-8"):
        read_conll(path)


def test_json_and_jsonl(tmp_path):
    records = [
        {"tokens": ["Anna", "Berg", "left"], "tags": ["B-PER", "E-PER", "O"], "doc_id": "d1"},
        {"tokens": [], "tags": []},
        {"tokens": ["Paris"], "tags": ["S-LOC"], "doc_id": "d2"},
    ]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in records) + "\n\n", "data.jsonl")
    sentences = read_tagged_file(path)
    assert [s.tags for s in sentences] == [["B-PER", "I-PER", "O"], ["B-LOC"]]  # BIOES detected
    with pytest.raises(DataError, match=r"data.jsonl:1: invalid BIOES sequence: I-PER is not closed"):
        read_tagged_file(write(tmp_path, path.read_text().replace("E-PER", "I-PER"), "data.jsonl"))
    assert [s.doc_id for s in sentences] == [0, 1]
    assert sentences[1].lines == [3]
    array = read_tagged_file(write(tmp_path, json.dumps(records), "data.json"))
    assert [s.tokens for s in array] == [s.tokens for s in sentences]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"tokens": ["a", "b"], "tags": ["O"]}], r"data.jsonl:1: 2 tokens but 1 tags"),
        (
            [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a"]}],
            r"data.jsonl:2: expected an object with 'tokens'",
        ),
        ([{"tokens": ["a"], "tags": [3]}], r"data.jsonl:1: tokens and tags must be strings"),
        (
            [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["B_PER"]}],
            r"data.jsonl:2: tag 'B_PER'",
        ),
        ([], r"data.jsonl: no sentences found"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, records, message):
    path = write(tmp_path, "".join(json.dumps(r) + "\n" for r in records), "data.jsonl")
    with pytest.raises(DataError, match=message):
        read_json_tags(path)


def test_bad_json_array_and_syntax(tmp_path):
    with pytest.raises(DataError, match=r"data.json: record 2: 1 tokens but 2 tags"):
        read_json_tags(
            write(
                tmp_path,
                json.dumps([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["O", "O"]}]),
                "data.json",
            )
        )
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        read_json_tags(write(tmp_path, '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": \n', "data.jsonl"))


def test_write_then_read_round_trips(tmp_path, fixtures):
    sentences = read_conll(fixtures / "ner" / "valid.conll")
    path = tmp_path / "out.conll"
    write_conll(path, sentences)
    again = read_conll(path)
    assert [(s.tokens, s.tags, s.doc_id) for s in again] == [(s.tokens, s.tags, s.doc_id) for s in sentences]
    predictions = [["O"] * len(s.tokens) for s in sentences]
    write_conll(path, sentences, predictions)
    assert [s.tags for s in read_conll(path)] == predictions
    assert [s.tags for s in read_conll(path, tag_column=1)] == [s.tags for s in sentences]
    with pytest.raises(ValueError, match="whitespace"):
        write_conll(path, [Sentence(["New York"], ["B-LOC"])])


def test_hub_dataset_with_class_ids_and_docstart_rows(monkeypatch):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(
                datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
            ),
        }
    )
    rows = {
        "tokens": [["-DOCSTART-"], ["Anna", "Berg", "left"], ["-DOCSTART-"], ["Paris"], []],
        "ner_tags": [[0], [1, 2, 0], [0], [3], []],
    }
    fake = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(rows, features=features)
            for name in ("train", "validation", "test")
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: fake)
    splits, source = load_tagged_splits(dataset_name="someone/ner-data")
    assert source == "someone/ner-data"
    assert [(s.tokens, s.tags, s.doc_id) for s in splits["test"]] == [
        (["Anna", "Berg", "left"], ["B-PER", "I-PER", "O"], 0),
        (["Paris"], ["B-LOC"], 1),
    ]
    assert splits["validation"][1].origin == "someone/ner-data[validation]:3"


def test_missing_splits_are_held_out_by_whole_documents(fixtures):
    splits, _ = load_tagged_splits(train_file=str(fixtures / "ner" / "train.conll"), holdout_fraction=0.25)
    docs = {split: {s.doc_id for s in sentences} for split, sentences in splits.items()}
    assert len(docs["test"]) == 1 and len(docs["validation"]) == 1 and len(docs["train"]) == 2
    assert not docs["train"] & (docs["test"] | docs["validation"]) and docs["test"] != docs["validation"]
    assert sum(map(len, splits.values())) == 39
    # One document only: single sentences are held out instead.
    keep, held = hold_out([Sentence(["a"], ["O"], 0, [i]) for i in range(20)], 0.1, seed=1)
    assert len(held) == 2 and len(keep) == 18
    assert [s.lines for s in keep] == sorted(s.lines for s in keep)


def test_builtin_conll2003_is_complete():
    splits, source = load_tagged_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 14041, "validation": 3250, "test": 3453}
    assert "CoNLL-2003" in source and splits["train"][0].tags[:3] == ["B-ORG", "O", "B-MISC"]


def test_entity_types_only_in_test_are_warned_about(tmp_path, caplog):
    train = write(tmp_path, "Ann B-PER\nsaw O\n\nBob B-PER\n", "train.conll")
    test = write(tmp_path, "Rome B-LOC\nand O\nAnn B-PER\n", "test.conll")
    with caplog.at_level(logging.WARNING):
        load_tagged_splits(train_file=str(train), validation_file=str(train), test_file=str(test))
    assert "entity type(s) LOC occur in test but never in train" in caplog.text
    assert "validation but never" not in caplog.text
