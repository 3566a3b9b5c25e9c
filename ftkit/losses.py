"""Class-weighted cross-entropy for imbalanced classes, passed to `Trainer(compute_loss_func=...)`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ftkit import DataError

logger = logging.getLogger(__name__)


def class_weights(spec: str | None, labels: Sequence[int], names: list[str]) -> list[float] | None:
    """Per-class loss weights, in the order of `names` (the label ids).

    `auto` gives "balanced" weights n / (k * n_c) from the training labels, so a rare class counts
    as much in total as a common one and the weights average 1 over the training rows. Otherwise
    `spec` is a comma list of one non-negative number per class, in label order. A class with no
    training rows gets weight 1 under `auto` (it never enters the loss). No `spec`: None (no weights).
    """
    if not spec:
        return None
    if spec == "auto":
        counts = np.bincount(np.asarray(labels), minlength=len(names))
        weights = [float(len(labels) / (len(names) * c)) if c else 1.0 for c in counts]
        logger.info("class weights: %s", dict(zip(names, weights, strict=True)))
        return weights
    try:
        weights = [float(x) for x in spec.split(",")]
    except ValueError:
        raise DataError(
            f"--class_weights {spec!r}: expected 'auto' or one number per class in label order "
            f"({', '.join(names)}), e.g. {','.join(['1'] * len(names))}"
        ) from None
    if len(weights) != len(names):
        raise DataError(
            f"--class_weights {spec!r} gives {len(weights)} weight(s) for {len(names)} classes; "
            f"give one per class in label order: {', '.join(names)}"
        )
    if any(not np.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise DataError(f"--class_weights {spec!r}: weights must be finite, >= 0, and not all 0")
    logger.info("class weights: %s", dict(zip(names, weights, strict=True)))
    return weights


def weighted_cross_entropy(weights: Sequence[float]) -> Callable:
    """A `compute_loss_func` for `transformers.Trainer`: cross-entropy with a weight per class.

    The loss is sum(w[y_i] * CE_i) / N, with N the number of labelled rows in the (accumulated)
    batch that Trainer passes as `num_items_in_batch`, or the rows of this batch when it does not.
    Dividing by the row count rather than by the sum of weights keeps each row's pull proportional
    to its class weight across batches; with all weights 1 it is the usual mean cross-entropy.
    """
    weight = torch.tensor(list(weights), dtype=torch.float32)

    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = F.cross_entropy(
            logits.float(), labels, weight=weight.to(logits.device), ignore_index=-100, reduction="sum"
        )
        n = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
        return total / n

    return loss
