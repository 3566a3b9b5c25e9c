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


def chunk_tokens(ids: list[int], budget: int, stride: int) -> list[list[int]]:
    """Overlapping windows of `budget` tokens that cover every token; consecutive windows share `stride`."""
    if len(ids) <= budget:
        return [ids]
    step = max(1, budget - stride)
    starts = list(range(0, len(ids) - budget, step)) + [len(ids) - budget]
    return [ids[s : s + budget] for s in starts]


def special_tokens_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one sequence (BERT: [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot find the special-token template of {type(tokenizer).__name__}")


def encode_texts(
    tokenizer, texts: list[str], max_length: int, policy: str = "head", stride: int = 64
) -> dict[str, list]:
    """Tokenize a batch of texts without padding (the collator pads per batch).

    Returns `input_ids`, `attention_mask`, `length` (tokens incl. specials), `truncated` (1 when the
    text did not fit) and `chunk_of` (index of the source text in the batch; with `chunks` a text
    yields several rows). Use it under `datasets.map(batched=True)`.
    """
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
            chunk_tokens(ids, budget, stride) if policy == "chunks" else [keep_tokens(ids, budget, policy)]
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
