"""Weighted losses passed to `Trainer(compute_loss_func=...)`: class-weighted cross-entropy for imbalanced
classes, BCE with per-label positive weights for rare labels of multi-label data."""

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


# --pos_weight auto: a label's positives weigh negatives/positives of its training rows, at most this
# much (a label with 2 positives in 5,000 rows would otherwise weigh 2,500 and swamp the batch).
POS_WEIGHT_CAP = 10.0


def pos_weights(spec: str | None, targets: np.ndarray, names: list[str]) -> list[float] | None:
    """Per-label weights of the positive rows in the multi-label loss, in the order of `names`.

    `auto`: negatives / positives of each label in the training targets (N, L), capped at
    POS_WEIGHT_CAP (a label with no positive gets 1). Otherwise a comma list of one positive number
    per label. No `spec`: None (plain BCE)."""
    if not spec:
        return None
    if spec == "auto":
        pos = targets.sum(axis=0)
        weights = [min(POS_WEIGHT_CAP, float((len(targets) - p) / p)) if p else 1.0 for p in pos]
    else:
        try:
            weights = [float(x) for x in spec.split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(names) or any(not np.isfinite(w) or w <= 0 for w in weights):
            raise DataError(
                f"--pos_weight {spec!r}: expected 'auto' or one positive number per label in label order "
                f"({', '.join(names)})"
            )
    logger.info(
        "positive weights per label: %s", {n: round(w, 3) for n, w in zip(names, weights, strict=True)}
    )
    return weights


def weighted_bce(pos_weight: Sequence[float]) -> Callable:
    """A `compute_loss_func` for `transformers.Trainer`: BCE with logits, positives of label j weighted
    by `pos_weight[j]`, summed and divided by the label decisions of the (accumulated) batch that
    Trainer counts (`num_items_in_batch`: rows x labels), i.e. the model's own mean BCE when all are 1."""
    weight = torch.tensor(list(pos_weight), dtype=torch.float32)

    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), pos_weight=weight.to(logits.device), reduction="sum"
        )
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    return loss


def multi_label_loss(
    spec: str | None, train_targets: list, names: list[str], training_args
) -> Callable | None:
    """The `compute_loss_func` of a textcls run: `weighted_bce` for multi-label targets (rows of 0/1)
    with `--pos_weight`, else None (the model's own loss: BCE for multi-label, cross-entropy otherwise).

    Refused: --pos_weight on single-label data, and label smoothing on multi-label data (transformers
    would drop it with a warning, or ignore it beside a `compute_loss_func`)."""
    targets = np.asarray(train_targets, dtype=np.float32)
    if targets.ndim != 2:
        if spec:
            raise DataError(
                "--pos_weight weights the positives of multi-label data; these rows have one label"
            )
        return None
    if training_args.label_smoothing_factor:
        raise DataError(
            "--label_smoothing_factor applies to single-label cross-entropy; multi-label data trains with "
            "BCE, where transformers would drop it: leave it at 0"
        )
    weights = pos_weights(spec, targets, names)
    return weighted_bce(weights) if weights else None
