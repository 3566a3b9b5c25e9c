"""Token classification on words: sub-token alignment, windows with stride, merging back, entities, metrics.

The model sees sub-tokens; everything a user sees is per word. A word's label sits on its first
sub-token (-100 on the others). A word sequence (a sentence, or the sentences of one document with
`context="document"`) longer than the model's window is split into overlapping windows; each word is
scored in exactly one window (the one where it has the most context), so merging gives every input
word exactly one prediction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ftkit import DataError
from ftkit.conll import Sentence, invalid_transition, split_tag
from ftkit.metrics import softmax
from ftkit.text import pad_batch, special_tokens_template

logger = logging.getLogger(__name__)

CONTEXTS = ("sentence", "document")


@dataclass(frozen=True)
class Window:
    """One model row: words [start, end) of word sequence `seq`; words [score_start, score_end) are scored here."""

    seq: int
    start: int
    end: int
    score_start: int
    score_end: int


@dataclass
class Features:
    """Encoded rows plus what is needed to map row predictions back to words.

    `rows` has `input_ids`, `word_index` (per sub-token: the word's index in its sequence at the first
    sub-token of a word scored in this row, else -1), `length`, and `labels` when labels were given.
    `windows[i]` describes row i. `groups[g]` lists the sentences that make word sequence g.
    """

    rows: dict[str, list]
    windows: list[Window]
    groups: list[list[int]]
    sentence_lengths: list[int]
    n_long: int = 0  # sentences with more sub-tokens than fit in one window

    def sorted_by_length(self) -> Features:
        """The same features with rows ordered by length (less padding per batch); merging is unaffected."""
        order = sorted(range(len(self.windows)), key=lambda i: self.rows["length"][i])
        rows = {k: [v[i] for i in order] for k, v in self.rows.items()}
        return Features(
            rows, [self.windows[i] for i in order], self.groups, self.sentence_lengths, self.n_long
        )


def label_list(sentences: Sequence[Sentence]) -> list[str]:
    """Label names: O, then B- and I- of every entity type seen, types sorted."""
    types = sorted({split_tag(t)[1] for s in sentences for t in s.tags} - {""})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def word_pieces(tokenizer, word_lists: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Sub-token ids of every word of every word list, from one batched fast-tokenizer call.

    A word the tokenizer drops entirely (empty, control or zero-width characters) becomes the unknown
    token, so that every word keeps a first sub-token to carry its label and prediction.
    """
    if not word_lists:
        return []
    enc = tokenizer([list(w) for w in word_lists], is_split_into_words=True, add_special_tokens=False)
    unk = tokenizer.unk_token_id
    out = []
    for i, words in enumerate(word_lists):
        pieces: list[list[int]] = [[] for _ in words]
        for token_id, w in zip(enc["input_ids"][i], enc.word_ids(i), strict=True):
            pieces[w].append(token_id)
        out.append([p or [unk] for p in pieces])
    return out


# Word shapes for uncased models, which lowercase "Paris" into "paris" and lose NER's strongest cue.
# Type 0 is what the pretrained model saw for every token; the others are new token-type embeddings.
CASE_TYPES = ("no capital", "Capitalized", "ALL CAPS", "miXed")


def word_shape(word: str) -> int:
    """Index into CASE_TYPES: 0 no uppercase letter, 1 first letter upper only, 2 all letters upper
    (two or more), 3 any other mix."""
    letters = [c for c in word if c.isalpha()]
    upper = [c.isupper() for c in letters]
    if not any(upper):
        return 0
    if all(upper) and len(letters) > 1:
        return 2
    return 1 if upper[0] and not any(upper[1:]) else 3


def lowercases(tokenizer) -> bool:
    """True if the tokenizer maps "Paris" and "paris" to the same ids (an uncased model)."""
    return (
        tokenizer("Paris NATO", add_special_tokens=False)["input_ids"]
        == tokenizer("paris nato", add_special_tokens=False)["input_ids"]
    )


def has_token_types(model) -> bool:
    """True if the model's embeddings have a token-type table (BERT, MiniLM, ELECTRA; not DistilBERT)."""
    return hasattr(getattr(model.base_model, "embeddings", None), "token_type_embeddings")


def use_case_feature(choice: str, tokenizer, model) -> bool:
    """Resolve `--case_feature`: on, off, or auto (on for an uncased tokenizer and a model with token
    types). YAML's booleans arrive as "True"/"False" and count as on/off. "on" for a model without token
    types, or any other value, is a `DataError`."""
    value = str(choice).lower()
    if value not in ("auto", "on", "off", "true", "false"):
        raise DataError(f"--case_feature must be auto, on or off, not {choice!r}")
    if value in ("on", "true"):
        if not has_token_types(model):
            name = type(model.base_model).__name__
            raise DataError(f"--case_feature on: {name} has no token-type embeddings to carry it")
        return True
    return value == "auto" and has_token_types(model) and lowercases(tokenizer)


def add_case_types(model) -> None:
    """Give `model` one token-type embedding per CASE_TYPES entry, each a copy of type 0.

    At the start the model computes exactly what it did before (every token is type 0 to it); fine-tuning
    then learns what capitalization adds. Saved with the model (`type_vocab_size` in config.json).
    """
    import torch

    embeddings = model.base_model.embeddings
    old = embeddings.token_type_embeddings
    new = torch.nn.Embedding(len(CASE_TYPES), old.embedding_dim)
    new.weight.data.copy_(old.weight.data[0].expand_as(new.weight))
    embeddings.token_type_embeddings = new
    model.config.type_vocab_size = len(CASE_TYPES)


def plan_windows(counts: Sequence[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Cover words with `counts` sub-tokens each by windows [start, end) of at most `budget` sub-tokens.

    Consecutive windows share whole words worth at most `stride` sub-tokens, except the last one,
    which reaches back to fill the budget: that costs what padding would and gives its words more
    context. Every word must fit alone (count <= budget); both start and end move forward with
    every window, so this ends.
    """
    windows: list[tuple[int, int]] = []
    start, n = 0, len(counts)
    while start < n:
        end, total = start, 0
        while end < n and total + counts[end] <= budget:
            total += counts[end]
            end += 1
        if end == n:
            # It cannot reach back past the previous window's start: that window plus one word is over budget.
            while start > 0 and total + counts[start - 1] <= budget:
                start -= 1
                total += counts[start]
            windows.append((start, end))
            break
        windows.append((start, end))
        # Overlap leaves room for at least the next word, so the next window reaches further.
        limit, overlap, s = min(stride, budget - counts[end]), 0, end
        while s - 1 > start and overlap + counts[s - 1] <= limit:
            overlap += counts[s - 1]
            s -= 1
        start = s
    return windows


def score_spans(windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split each overlap of consecutive windows at its middle: every word is scored in exactly one window,
    the one where its context on the narrower side is largest."""
    cuts = [(a2 + b1) // 2 for (_, b1), (a2, _) in pairwise(windows)]
    starts = [windows[0][0], *cuts] if windows else []
    ends = [*cuts, windows[-1][1]] if windows else []
    return list(zip(starts, ends, strict=True))


def group_sentences(doc_ids: Sequence[int], context: str) -> list[list[int]]:
    """Sentence indices forming each word sequence: one per sentence, or consecutive sentences of a document."""
    if context not in CONTEXTS:
        raise DataError(f"context must be one of {CONTEXTS}, got {context!r}")
    groups: list[list[int]] = []
    for i, doc in enumerate(doc_ids):
        if context == "document" and groups and doc_ids[groups[-1][-1]] == doc:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def encode_pieces(
    pieces: Sequence[Sequence[Sequence[int]]],
    groups: Sequence[Sequence[int]],
    specials: tuple[list[int], list[int]],
    max_length: int,
    stride: int,
    labels: Sequence[Sequence[int]] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> Features:
    """Build model rows from per-sentence word pieces: window every word sequence, label first sub-tokens.

    `labels[i][w]` is the label id of word w of sentence i; it goes on the word's first sub-token in
    every window that holds the word (training sees all windows), -100 elsewhere. A label may also be
    a tuple of ids, one per tagging head (`ftkit.multitask`): the other sub-tokens then get -100 in each. `shapes[i][w]`
    (see `word_shape`) goes on every sub-token of the word as `token_type_ids` (0 on special tokens).
    """
    prefix, suffix = specials
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise DataError(f"max_length {max_length} leaves no room for words")
    rows: dict[str, list] = {"input_ids": [], "word_index": [], "length": []}
    if labels is not None:
        rows["labels"] = []
    if shapes is not None:
        rows["token_type_ids"] = []
    windows = []
    first = next((x for sent in labels or [] for x in sent), -100)
    blank = [-100] * len(first) if isinstance(first, (list, tuple)) else -100
    n_long = sum(sum(min(len(p), budget) for p in sent) > budget for sent in pieces)
    for g, group in enumerate(groups):
        # A word longer than a whole window keeps its first sub-tokens: its label sits on the first.
        seq = [p[:budget] for i in group for p in pieces[i]]
        seq_labels = [x for i in group for x in labels[i]] if labels is not None else None
        seq_shapes = [x for i in group for x in shapes[i]] if shapes is not None else None
        spans = plan_windows([len(p) for p in seq], budget, stride)
        for (a, b), (sa, sb) in zip(spans, score_spans(spans), strict=True):
            windows.append(Window(g, a, b, sa, sb))
            ids, word_index, row_labels = list(prefix), [-1] * len(prefix), [blank] * len(prefix)
            row_shapes = [0] * len(prefix)
            for w in range(a, b):
                ids += seq[w]
                word_index += [w if sa <= w < sb else -1] + [-1] * (len(seq[w]) - 1)
                if seq_labels is not None:
                    row_labels += [list(seq_labels[w]) if blank != -100 else seq_labels[w]]
                    row_labels += [blank] * (len(seq[w]) - 1)
                if seq_shapes is not None:
                    row_shapes += [seq_shapes[w]] * len(seq[w])
            ids += suffix
            rows["input_ids"].append(ids)
            rows["word_index"].append(word_index + [-1] * len(suffix))
            rows["length"].append(len(ids))
            if seq_labels is not None:
                rows["labels"].append(row_labels + [blank] * len(suffix))
            if seq_shapes is not None:
                rows["token_type_ids"].append(row_shapes + [0] * len(suffix))
    lengths = [len(p) for p in pieces]
    return Features(rows, windows, [list(g) for g in groups], lengths, n_long)


def encode_sentences(
    tokenizer,
    sentences: Sequence[Sentence],
    max_length: int,
    stride: int,
    context: str = "sentence",
    label2id: dict[str, int] | None = None,
    case_feature: bool = False,
) -> Features:
    """Tokenize sentences with a fast tokenizer and build windowed rows (see `encode_pieces`).

    With `context="document"`, consecutive sentences of one document share windows so that each
    sentence sees its neighbours; each word is still scored once. `case_feature` adds each word's
    shape as `token_type_ids` (for a model prepared with `add_case_types`).
    """
    pieces = word_pieces(tokenizer, [s.tokens for s in sentences])
    labels = [[label2id[t] for t in s.tags] for s in sentences] if label2id is not None else None
    shapes = [[word_shape(w) for w in s.tokens] for s in sentences] if case_feature else None
    groups = group_sentences([s.doc_id for s in sentences], context)
    specials = special_tokens_template(tokenizer)
    return encode_pieces(pieces, groups, specials, max_length, stride, labels, shapes)


def encode_splits(
    tokenizer,
    splits: dict[str, Sequence[Sentence]],
    max_length: int,
    stride: int,
    context: str,
    label2id: dict[str, int],
    case_feature: bool,
) -> dict[str, Features]:
    """`encode_sentences` for every split, with one log line on how many sentences needed windows."""
    features = {
        split: encode_sentences(tokenizer, sentences, max_length, stride, context, label2id, case_feature)
        for split, sentences in splits.items()
    }
    logger.info(
        "sentences longer than one window of %d (split into windows, stride %d): %s; windows %s; case feature %s",
        max_length, stride, {s: f.n_long for s, f in features.items()},
        {s: len(f.windows) for s, f in features.items()}, case_feature,
    )  # fmt: skip
    return features


def merge_windows(
    features: Features, row_values: Sequence[Sequence], row_labels: Sequence | None = None
) -> list[list]:
    """Map per-sub-token values of each row (tag ids, logit vectors) back to words: one value per word.

    Returns one list per sentence, in input order. Raises RuntimeError if any word got no value or
    more than one, which would be a bug in windowing, not a data problem. Pass the `row_labels` that
    came back with the values (e.g. Trainer's label_ids) to check that rows kept their order.
    """
    if row_labels is not None:
        for i, expected in enumerate(features.rows["labels"]):
            if list(row_labels[i][: len(expected)]) != expected:
                raise RuntimeError(
                    f"row {i} came back with other labels than encoded: rows were reordered (Trainer's "
                    "group_by_length sampler reorders evaluation; so does a multi-process CPU launch "
                    "that accelerate does not set up as distributed, see use_cpu)"
                )
    seq_lengths = [sum(features.sentence_lengths[i] for i in g) for g in features.groups]
    values: list[list] = [[None] * n for n in seq_lengths]
    counts = [np.zeros(n, dtype=int) for n in seq_lengths]
    for window, word_index, row in zip(
        features.windows, features.rows["word_index"], row_values, strict=True
    ):
        for pos, w in enumerate(word_index):
            if w >= 0:
                values[window.seq][w] = row[pos]
                counts[window.seq][w] += 1
    for g, c in enumerate(counts):
        if c.size and (c.min() != 1 or c.max() != 1):
            raise RuntimeError(f"word sequence {g}: words scored {c.tolist()} times, expected once each")
    out: list[list] = [[] for _ in features.sentence_lengths]
    for g, group in enumerate(features.groups):
        offset = 0
        for i in group:
            out[i] = values[g][offset : offset + features.sentence_lengths[i]]
            offset += features.sentence_lengths[i]
    return out


def split_of(features: dict[str, Features], label_ids: Sequence[Sequence[int]]) -> str:
    """The split whose encoded rows came back as `label_ids` (Trainer's `compute_metrics` is not told
    which dataset it scores): the one with the same rows of labels, in the same order."""
    for split, f in features.items():
        rows = f.rows.get("labels")
        same_size = rows is not None and len(rows) == len(label_ids)
        if same_size and all(list(got[: len(r)]) == r for got, r in zip(label_ids, rows, strict=True)):
            return split
    raise RuntimeError("the predictions match the rows of no split: rows were reordered or dropped")


def decode_tags(word_logits: np.ndarray, names: Sequence[str], method: str = "viterbi") -> list[str]:
    """Tags of one sentence from its word logits (words x labels).

    `argmax` takes each word's best tag; `viterbi` takes the best sequence with no invalid IOB2
    transition (no I-X after O or after another type), so strict scoring drops no predicted chunk.
    """
    if method == "argmax" or len(word_logits) == 0:
        return [names[i] for i in np.asarray(word_logits).argmax(-1)]
    if method != "viterbi":
        raise DataError(f"decode must be viterbi or argmax, got {method!r}")
    z = np.asarray(word_logits, dtype=np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    barred = np.array([[invalid_transition(p, c) is not None for c in names] for p in [*names, "O"]])
    penalty = np.where(barred, -np.inf, 0.0)  # row len(names): the sentence start, like after O
    score = log_probs[0] + penalty[-1]
    back = []
    for row in log_probs[1:]:
        cand = score[:, None] + penalty[:-1]
        back.append(cand.argmax(0))
        score = cand.max(0) + row
    best = [int(score.argmax())]
    for pointers in reversed(back):
        best.append(int(pointers[best[-1]]))
    return [names[i] for i in reversed(best)]


def count_invalid(tag_sequences: Sequence[Sequence[str]]) -> int:
    """Number of sequences with an invalid IOB2 transition (I-X after O, at the start, or after another type)."""
    n = 0
    for tags in tag_sequences:
        prevs = ["O", *tags][: len(tags)]
        n += any(invalid_transition(p, t) for p, t in zip(prevs, tags, strict=True))
    return n


def entity_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity precision/recall/F1 (seqeval, strict IOB2) over words, overall and per type, plus word
    accuracy and the number of predicted sequences with an invalid transition (which strict mode does
    not count as entities)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    if [len(g) for g in gold] != [len(p) for p in pred]:
        raise ValueError("gold and predicted tags differ in length: every word needs exactly one prediction")
    report = classification_report(
        [list(g) for g in gold],
        [list(p) for p in pred],
        mode="strict",
        scheme=IOB2,
        output_dict=True,
        zero_division=0,
    )
    micro = report.pop("micro avg")
    out = {"precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1-score"]}
    for name, r in report.items():
        if not name.endswith(" avg"):
            out |= {
                f"{name}_precision": r["precision"],
                f"{name}_recall": r["recall"],
                f"{name}_f1": r["f1-score"],
            }
            out[f"{name}_support"] = r["support"]
    n_words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    out["accuracy"] = correct / max(n_words, 1)
    out["invalid_sequences"] = count_invalid(pred)
    out["words"] = n_words
    return {k: float(v) for k, v in out.items()}


def entity_report(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> str:
    """Per-type precision/recall/F1 table (seqeval, strict IOB2) as text."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    return classification_report(
        [list(g) for g in gold],
        [list(p) for p in pred],
        mode="strict",
        scheme=IOB2,
        digits=4,
        zero_division=0,
    )


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities (type, first word, end word exclusive) from IOB2 tags; an I-X that does not continue an
    X chunk starts a new one, so a prediction is never dropped."""
    spans: list[tuple[str, int, int]] = []
    prev = "O"
    for i, tag in enumerate(tags):
        prefix, typ = split_tag(tag)
        if prefix == "I" and not invalid_transition(prev, tag):
            spans[-1] = (typ, spans[-1][1], i + 1)
        elif prefix in ("B", "I"):
            spans.append((typ, i, i + 1))
        prev = tag
    return spans


# Words as CoNLL tokenizes them: abbreviations (U.S.), numbers (3.5, 1,000), words with inner hyphens or
# apostrophes (New-York, O'Neill), the possessive 's on its own, any other symbol alone.
_WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\d+(?:[.,:]\d+)+|\w+(?:-\w+)*(?:'(?!s\b)\w+)*|'s\b|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Split raw text into words with character offsets: (word, start, end), text[start:end] == word."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def prediction_windows(
    tokenizer,
    word_lists: Sequence[Sequence[str]],
    max_length: int,
    stride: int,
    groups: Sequence[Sequence[int]] | None = None,
    case_feature: bool = False,
) -> Features:
    """Model rows for unlabelled word lists, length-sorted: windows as in training (`encode_pieces`),
    `groups` of word lists sharing windows (default: one each), word shapes as token types if asked."""
    return encode_pieces(
        word_pieces(tokenizer, word_lists),
        groups if groups is not None else [[i] for i in range(len(word_lists))],
        special_tokens_template(tokenizer),
        max_length,
        stride,
        shapes=[[word_shape(w) for w in words] for words in word_lists] if case_feature else None,
    ).sorted_by_length()


def predict_word_logits(
    model,
    tokenizer,
    word_lists: Sequence[Sequence[str]],
    max_length: int,
    stride: int,
    batch_size: int = 32,
    groups: Sequence[Sequence[int]] | None = None,
    case_feature: bool = False,
) -> list[np.ndarray]:
    """Logits (words x labels) of every word of every word list, from batches of length-sorted windows.

    `groups` (see `group_sentences`) lets consecutive word lists of one document share windows;
    `case_feature` passes word shapes as `token_type_ids`, as the run was trained (see `add_case_types`).
    """
    import torch

    features = prediction_windows(tokenizer, word_lists, max_length, stride, groups, case_feature)
    keys = ["input_ids", "token_type_ids"] if case_feature else ["input_ids"]
    device = getattr(model, "device", "cpu")  # ONNX Runtime sessions take CPU tensors
    row_logits = []
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(features.windows), batch_size):
            rows = {k: features.rows[k][b : b + batch_size] for k in keys}
            inputs = pad_batch(rows, tokenizer.pad_token_id)
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            row_logits += list(logits.float().cpu().numpy())
    return [
        np.stack(v) if v else np.zeros((0, model.config.num_labels))
        for v in merge_windows(features, row_logits)
    ]


def find_entities(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    stride: int,
    batch_size: int = 32,
    decode: str = "viterbi",
    case_feature: bool = False,
) -> list[list[dict]]:
    """Entities in raw texts: per text a list of {"type", "text", "start", "end", "score"}.

    `start`/`end` are character offsets into the text (text[start:end] == entity text); `score` is
    the mean probability of the predicted tags over the entity's words; `decode` as in `decode_tags`;
    `case_feature` as in `predict_word_logits`.
    """
    words = [split_words(t) for t in texts]
    word_lists = [[w for w, _, _ in ws] for ws in words]
    logits = predict_word_logits(
        model, tokenizer, word_lists, max_length, stride, batch_size, case_feature=case_feature
    )
    id2label = model.config.id2label
    out = []
    for text, ws, lg in zip(texts, words, logits, strict=True):
        probs = softmax(lg)
        tags = decode_tags(lg, [id2label[i] for i in range(len(id2label))], decode)
        ids = np.array([model.config.label2id[t] for t in tags], dtype=int)
        entities = []
        for typ, a, b in entity_spans(tags):
            start, end = ws[a][1], ws[b - 1][2]
            score = round(float(probs[np.arange(a, b), ids[a:b]].mean()), 4)
            entities.append(
                {"type": typ, "text": text[start:end], "start": start, "end": end, "score": score}
            )
        out.append(entities)
    return out


def predict_entities(
    model, tokenizer, texts: Sequence[str], origins: Sequence[str], info: dict, batch_size: int = 32
) -> list[dict]:
    """`ftkit predict` rows for a token-classification run: {"origin", "text", "entities"} per text,
    windowed and decoded as in the run (`max_length`, `stride`, `decode`, `case_feature`; see
    `find_entities`)."""
    found = find_entities(
        model,
        tokenizer,
        texts,
        info["max_length"],
        info["stride"],
        batch_size,
        info.get("decode", "viterbi"),
        info.get("case_feature", False),
    )
    return [{"origin": o, "text": t, "entities": e} for o, t, e in zip(origins, texts, found, strict=True)]
