"""Multi-label classification: per-label decision thresholds tuned on validation, and the scores.

A multi-label model gives each label a probability (a sigmoid per label); a text gets every label whose
probability reaches that label's threshold. One threshold of 0.5 for all labels suits few of them: a
rare label's probabilities rarely reach it, and its recall is lost. So each label gets the threshold
that maximises its F1 on the validation rows (`tune_thresholds`); a label with fewer than
MIN_POSITIVES positive validation rows keeps FALLBACK, since an F1-optimal cut on two or three
positives says more about those rows than about the label. The thresholds go into ftkit_run.json
(`thresholds`, label -> float), and `ftkit predict`, the ONNX and compressed paths apply them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ftkit import DataError

# The task name of multi-label runs (ftkit_run.json): a sigmoid per label, BCE, per-label thresholds.
MULTI_LABEL = "multi-label-classification"
MIN_POSITIVES = 5
FALLBACK = 0.5


def best_threshold(probs: np.ndarray, gold: np.ndarray) -> float:
    """The threshold on `probs` (one label, all rows) with the highest F1 against 0/1 `gold`.

    Every cut between two distinct probabilities is a candidate; the threshold returned is the middle
    of the best gap (not a probability seen on validation), and of equal F1 the cut nearest 0.5 wins.
    """
    order = np.argsort(-probs, kind="stable")
    p, y = probs[order], gold[order].astype(float)
    tp = np.cumsum(y)  # predicting the top k rows as positive, k = 1..n
    f1 = 2 * tp / (np.arange(1, len(p) + 1) + y.sum())
    # A cut can only fall where the probability changes (tied rows go to the same side).
    cut = np.flatnonzero(np.append(p[:-1] > p[1:], True))
    below = np.append(p[1:], 0.0)[cut]
    thresholds = (p[cut] + below) / 2
    best = f1[cut].max()
    candidates = thresholds[np.isclose(f1[cut], best)]
    return float(candidates[np.argmin(np.abs(candidates - FALLBACK))])


def tune_thresholds(probs: np.ndarray, gold: np.ndarray, min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Per-label F1-optimal thresholds for probabilities `probs` (N, L) against 0/1 `gold` (N, L);
    labels with fewer than `min_positives` positive rows keep FALLBACK. Tune on validation rows only."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold) > 0.5
    return np.array(
        [
            best_threshold(probs[:, j], gold[:, j]) if gold[:, j].sum() >= min_positives else FALLBACK
            for j in range(probs.shape[1])
        ]
    )


def run_thresholds(info: Mapping, where: str = "ftkit_run.json") -> np.ndarray:
    """A multi-label run's thresholds (`info["thresholds"]`, label -> float) in the order of
    `info["labels"]`, or a `DataError` when a label has none or one outside [0, 1]."""
    given = info.get("thresholds")
    if not isinstance(given, Mapping):
        raise DataError(f"{where}: a multi-label run needs `thresholds` (label -> number)")
    out = []
    for name in info["labels"]:
        value = given.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise DataError(f"{where}: thresholds[{name!r}] is {value!r}; give a number from 0 to 1")
        out.append(float(value))
    return np.array(out)


def label_names(gold: np.ndarray, names: Sequence[str]) -> list:
    """The name of each row's label id, or for 0/1 rows (multi-label) the list of its label names."""
    gold = np.asarray(gold)
    if gold.ndim == 1:
        return [names[int(g)] for g in gold]
    return [[names[j] for j in np.flatnonzero(row > 0.5)] for row in gold]
