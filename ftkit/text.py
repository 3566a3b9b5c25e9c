"""Tokenizing classification inputs, with an explicit policy for texts longer than `max_length`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ftkit import DataError

logger = logging.getLogger(__name__)

LONG_TEXT_POLICIES = ("head", "head_tail", "chunks")


def keep_tokens(ids: list[int], budget: int, policy: str) -> list[int]:
    """Cut a token list (no special tokens) to `budget` tokens.

    `head` keeps the start; `head_tail` keeps the first quarter and the last three quarters of the
    budget (Sun et al. 2019, "How to fine-tune BERT for text classification": head 128 + tail 382
    beat head-only on long documents).
    """
    if len(ids) <= budget:
        return ids
    if policy == "head":
        return ids[:budget]
    if policy == "head_tail":
        head = budget // 4
        return ids[:head] + ids[len(ids) - (budget - head) :]
    raise DataError(f"unknown long-text policy {policy!r}; choose from {LONG_TEXT_POLICIES}")


def chunk_tokens(ids: list[int], budget: int, stride: int, max_chunks: int = 0) -> list[list[int]]:
    """Overlapping windows of `budget` tokens that cover every token; consecutive windows share `stride`.

    With `max_chunks` > 0 a text with more windows keeps that many, spread evenly over it (the first
    and the last always among them), so one very long text cannot dominate the run's cost."""
    if len(ids) <= budget:
        return [ids]
    step = max(1, budget - stride)
    starts = list(range(0, len(ids) - budget, step)) + [len(ids) - budget]
    if 0 < max_chunks < len(starts):
        starts = [starts[round(i)] for i in np.linspace(0, len(starts) - 1, max_chunks)]
    return [ids[s : s + budget] for s in starts]


def n_chunks(n_tokens: int, budget: int, stride: int) -> int:
    """How many windows `chunk_tokens` makes of a text of `n_tokens` tokens (no cap)."""
    if n_tokens <= budget:
        return 1
    step = max(1, budget - stride)
    return len(range(0, n_tokens - budget, step)) + 1


# --long_text auto: a text share cut off at or below CUT_HEAD keeps `head`; up to CUT_HEAD_TAIL (most
# of each text fits) `head_tail`; beyond it `chunks`, whose windows per text are capped so that one
# epoch stays within TOKEN_BUDGET training tokens. AUTO_MAX_LENGTH is the length auto may raise
# max_length to (BBC News: head_tail at 256 gave test accuracy 0.986, head at 128 0.967).
CUT_HEAD, CUT_HEAD_TAIL = 0.10, 0.50
AUTO_MAX_LENGTH = 256
TOKEN_BUDGET = 1_500_000
# For the cost estimate in the log: training tokens per second of MiniLM-L6 on 2 CPU cores (an estimate
# from the recipes' runs, not a measurement of this machine).
TOKENS_PER_SECOND = 2_500


def cut_share(lengths: Sequence[int], budget: int) -> float:
    """The share of all tokens that lies beyond `budget` tokens of their text."""
    total = sum(lengths)
    return sum(max(0, n - budget) for n in lengths) / total if total else 0.0


def choose_long_text(
    lengths: Sequence[int],
    max_length: int,
    specials: int = 2,
    stride: int = 32,
    may_grow: bool = True,
    token_budget: int = TOKEN_BUDGET,
) -> dict:
    """The long-text policy for training texts of `lengths` tokens (no special tokens).

    Returns `long_text`, `max_length`, `max_chunks` and `why`: `head` when at most CUT_HEAD of the
    tokens lie beyond `max_length`; otherwise (at AUTO_MAX_LENGTH when `may_grow` and that is longer)
    `head_tail` when at most CUT_HEAD_TAIL is cut, else `chunks` with as many windows per text as keep
    an epoch within `token_budget` tokens (at least 2; 0 = no cap needed).
    """
    share = cut_share(lengths, max_length - specials)
    why = f"{share:.0%} of the training tokens lie beyond max_length={max_length}"
    if share <= CUT_HEAD:
        return {"long_text": "head", "max_length": max_length, "max_chunks": 0, "why": why + ": head"}
    if may_grow and max_length < AUTO_MAX_LENGTH:
        max_length = AUTO_MAX_LENGTH
        share = cut_share(lengths, max_length - specials)
        why += f", {share:.0%} beyond {max_length}"
    budget = max_length - specials
    if share <= CUT_HEAD_TAIL:
        tokens = sum(min(n, budget) for n in lengths)
        return {
            "long_text": "head_tail",
            "max_length": max_length,
            "max_chunks": 0,
            "why": f"{why}: head_tail (start + end of each text), {tokens:,} tokens per epoch",
        }
    windows = [n_chunks(n, budget, stride) for n in lengths]
    cap = 0
    if sum(windows) * max_length > token_budget:
        cap = max(
            [2]
            + [
                c
                for c in range(2, max(windows) + 1)
                if sum(min(w, c) for w in windows) * max_length <= token_budget
            ]
        )
    rows = sum(min(w, cap) if cap else w for w in windows)
    minutes = rows * max_length / TOKENS_PER_SECOND / 60
    capped = f", at most {cap} windows per text (time budget)" if cap else ""
    return {
        "long_text": "chunks",
        "max_length": max_length,
        "max_chunks": cap,
        "why": f"{why}: chunks{capped}, {rows:,} windows of {len(lengths):,} texts, about {minutes:.0f} min "
        f"per epoch at ~{TOKENS_PER_SECOND:,} tokens/s (2 CPU cores)",
    }


def decide_long_text(options, data_args, tokenizer, texts: list[str], pairs: list[str] | None = None):
    """`--long_text auto`: measure the training texts and set `long_text`, `max_length` (when the user
    did not set it) and `max_chunks` through `options.decide` (`choose_long_text`). Any other policy,
    and every value the user set, stays as it is. Returns the new data arguments.

    Sentence pairs (`pairs`, the second texts) are cut `longest_first` (`encode_texts`): auto decides
    `head`, the name pairs run under, raises `max_length` to AUTO_MAX_LENGTH on the same rule as one
    text (more than CUT_HEAD of the tokens cut, length not set by the user), and logs how many pairs
    it cuts; `head_tail` and `chunks` do not apply to two texts and are an error."""
    if pairs is None and options.user_set("text_pair_column"):
        # A recipe that calls this without pairs reads one text per row: refuse before training on half.
        raise DataError(
            "--text_pair_column: this recipe reads one text per row; sentence pairs train with the "
            "textcls (classes) and ratings (scores) recipes"
        )
    if pairs is not None:
        if data_args.long_text in ("head_tail", "chunks"):
            raise DataError(
                f"--long_text {data_args.long_text} does not apply to sentence pairs (--text_pair_column): "
                "a pair is one input, cut longest_first to --max_length; use --long_text auto or head"
            )
        if data_args.long_text == "auto":
            lengths, max_length = pair_lengths(tokenizer, texts, pairs), data_args.max_length
            share = cut_share(lengths, max_length)
            grow = share > CUT_HEAD and max_length < AUTO_MAX_LENGTH and not options.user_set("max_length")
            if grow:  # as for one text: more than CUT_HEAD of the tokens cut, and the length is ftkit's
                max_length = AUTO_MAX_LENGTH
            cut = sum(n > max_length for n in lengths)
            why = (
                f"--long_text auto: sentence pairs are cut longest_first (the longer text loses tokens "
                f"first), not by a long-text policy; {share:.0%} of the training tokens lie beyond "
                f"max_length={data_args.max_length}"
                + (f", so max_length {max_length}" if grow else "")
                + f"; {cut} of {len(lengths)} training pairs exceed {max_length}"
            )
            data_args = options.decide(data_args, why, override_user=True, long_text="head")
            data_args = options.decide(data_args, why, max_length=max_length)
        return data_args
    if data_args.long_text != "auto":
        return data_args
    raw = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    prefix, suffix = special_tokens_template(tokenizer)
    choice = choose_long_text(
        [len(x) for x in raw],
        data_args.max_length,
        specials=len(prefix) + len(suffix),
        stride=data_args.stride,
        may_grow=not options.user_set("max_length"),
    )
    why = "--long_text auto: " + choice.pop("why")
    data_args = options.decide(data_args, why, override_user=True, long_text=choice.pop("long_text"))
    return options.decide(data_args, why, **choice)


def special_tokens_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one sequence (BERT: [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find the special-token template of {type(tokenizer).__name__}")


def pair_lengths(tokenizer, texts: Sequence[str], pairs: Sequence[str]) -> list[int]:
    """Tokens of each (text, pair) input uncut, special tokens included."""
    first = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    second = tokenizer(list(pairs), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    return [len(a) + len(b) + specials for a, b in zip(first, second, strict=True)]


def match_token_types(tokenizer, config) -> None:
    """Drop `token_type_ids` from what `tokenizer` returns when the model has no second segment type
    (`type_vocab_size` below 2: RoBERTa-style; a segment id of 1 would index past its table). Tokenizers
    of such models usually return none already (their `model_input_names` lack it)."""
    if getattr(config, "type_vocab_size", 2) < 2 and "token_type_ids" in tokenizer.model_input_names:
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]


def encode_pairs(tokenizer, texts: list[str], pairs: list[str], max_length: int) -> dict[str, list]:
    """Tokenize (text, pair) inputs as the tokenizer joins two segments ([CLS] a [SEP] b [SEP] for BERT),
    cut `longest_first` to `max_length` (the longer side loses a token at a time). `token_type_ids`
    (0 on the first segment, 1 on the second) come along when the tokenizer's model takes them
    (`match_token_types`). Same columns as `encode_texts` otherwise, one row per pair."""
    if len(texts) != len(pairs):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} second texts")
    types = "token_type_ids" in tokenizer.model_input_names
    enc = tokenizer(
        list(texts), list(pairs), truncation="longest_first", max_length=max_length,
        return_token_type_ids=types, return_attention_mask=True, verbose=False,
    )  # fmt: skip
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if types:
        out["token_type_ids"] = enc["token_type_ids"]
    out["length"] = [len(x) for x in enc["input_ids"]]
    out["truncated"] = [int(n > max_length) for n in pair_lengths(tokenizer, texts, pairs)]
    out["chunk_of"] = list(range(len(texts)))
    return out


def encode_texts(
    tokenizer,
    texts: list[str],
    max_length: int,
    policy: str = "head",
    stride: int = 64,
    max_chunks: int = 0,
    pairs: list[str] | None = None,
) -> dict[str, list]:
    """Tokenize a batch of texts without padding (the collator pads per batch).

    Returns `input_ids`, `attention_mask`, `length` (tokens incl. specials), `truncated` (1 when the
    text did not fit) and `chunk_of` (index of the source text in the batch; with `chunks` a text
    yields several rows, at most `max_chunks` when > 0). Use it under `datasets.map(batched=True)`.
    With `pairs` (the second texts of sentence pairs) the inputs are pairs (`encode_pairs`); the
    policy must then be `head` (pairs are cut longest_first).
    """
    if pairs is not None:
        if policy != "head":
            raise DataError(
                f"--long_text {policy} does not apply to sentence pairs; they are cut longest_first"
            )
        return encode_pairs(tokenizer, texts, pairs, max_length)
    if policy not in LONG_TEXT_POLICIES:
        raise DataError(f"unknown long-text policy {policy!r}; choose from {LONG_TEXT_POLICIES}")
    if policy == "chunks" and not 0 <= stride < max_length // 2:
        raise DataError(f"--stride must be >= 0 and below half of --max_length ({max_length // 2})")
    prefix, suffix = special_tokens_template(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    raw = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out: dict[str, list] = {
        "input_ids": [],
        "attention_mask": [],
        "length": [],
        "truncated": [],
        "chunk_of": [],
    }
    for i, ids in enumerate(raw):
        pieces = (
            chunk_tokens(ids, budget, stride, max_chunks)
            if policy == "chunks"
            else [keep_tokens(ids, budget, policy)]
        )
        for piece in pieces:
            full = prefix + piece + suffix
            out["input_ids"].append(full)
            out["attention_mask"].append([1] * len(full))
            out["length"].append(len(full))
            out["truncated"].append(int(len(ids) > budget))
            out["chunk_of"].append(i)
    return out


def count_truncated(ds, max_length: int, policy: str) -> dict[str, int]:
    """Inputs longer than `max_length` per split of a tokenized DatasetDict (from `encode_texts`), logged.

    Counts inputs, not rows: with `chunks` a long text has several rows (`text_index` says whose) and
    counts once."""
    counts = {}
    for split in ds:
        owners = ds[split]["text_index"] if "text_index" in ds[split].column_names else range(len(ds[split]))
        counts[split] = len({i for i, cut in zip(owners, ds[split]["truncated"], strict=True) if cut})
    logger.info("inputs longer than max_length=%d (cut by %s): %s", max_length, policy, counts)
    return counts


def pool_chunks(scores: np.ndarray, owner: Sequence[int]) -> np.ndarray:
    """Average rows that belong to the same input (the chunks of one long text) into one row per input.

    `owner[i]` is the input index of row `i` (0..n-1, every input present, as `encode_texts` with
    `chunks` produces them); the result has n rows in input order. Works for class probabilities
    (N, C) and for scores (N,).
    """
    owner = np.asarray(owner)
    counts = np.bincount(owner)
    if (counts == 0).any():
        raise ValueError(f"input {int(np.argmin(counts))} has no rows to pool")
    sums = np.zeros((len(counts), *scores.shape[1:]), dtype=np.float64)
    np.add.at(sums, owner, scores)
    return sums / counts.reshape(-1, *([1] * (scores.ndim - 1)))


def pool_probabilities(logits: np.ndarray, owner: Sequence[int], multi_label: bool = False) -> np.ndarray:
    """One row of class probabilities per input from the logits of its rows (`owner`, see `pool_chunks`).

    Single-label: a softmax per row, then the mean over an input's rows. Multi-label: the mean logit of
    each label over an input's rows, then a sigmoid per label (the average evidence of its windows)."""
    from ftkit.metrics import sigmoid, softmax

    if multi_label:
        return sigmoid(pool_chunks(logits, owner))
    return pool_chunks(softmax(logits), owner)


def pad_batch(columns: dict[str, Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of token rows to its longest row: `input_ids` with `pad_id`, every other column
    (e.g. `token_type_ids`) with 0, plus an `attention_mask` of 1 on real tokens."""
    ids = columns["input_ids"]
    width = max(len(x) for x in ids)
    out = {"input_ids": torch.tensor([list(x) + [pad_id] * (width - len(x)) for x in ids])}
    out["attention_mask"] = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    for key, rows in columns.items():
        if key != "input_ids":
            out[key] = torch.tensor([list(x) + [0] * (width - len(x)) for x in rows])
    return out
