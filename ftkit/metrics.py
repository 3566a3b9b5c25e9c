"""Metrics computed locally (scikit-learn, scipy, torch), no metric scripts from the hub."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, hamming_loss


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function (multi-label: one independent probability per label), stable."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def exact_eval_loss(predictions, label_ids) -> float:
    """Mean evaluation loss with each sample counted once, computed from the gathered predictions.

    Trainer's own `eval_loss` averages per-batch means. With several processes accelerate pads a rank's
    last batch with repeated samples (`even_batches`); predictions and labels are deduplicated before
    `compute_metrics`, but the repeats stay in `eval_loss` (measured with transformers 5.23, 2 ranks: 10.22
    instead of 12.96 on 7 samples). Return this value as "loss" from `compute_metrics`: Trainer prefixes it
    and reports it as `eval_loss` in place of its own.

    Float labels: mean squared error (regression, `num_labels=1`), or for 0/1 label rows of the logits'
    shape (multi-label) binary cross-entropy with logits, the mean over labels and rows. Integer labels:
    cross-entropy over the last axis ignoring -100, i.e. the mean over labelled tokens for token
    classification.
    """
    logits = torch.as_tensor(predictions[0] if isinstance(predictions, tuple) else predictions).float()
    labels = torch.as_tensor(label_ids)
    if labels.is_floating_point() and labels.ndim == 2 and labels.shape == logits.shape:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float()).item()
    if labels.is_floating_point():
        return torch.nn.functional.mse_loss(logits.reshape(labels.shape), labels.float()).item()
    flat = logits.reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, labels.reshape(-1).long(), ignore_index=-100).item()


def classification_scores(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 (every class counts the same: the model-selection metric) and weighted F1."""
    classes = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, preds, labels=classes, average="weighted", zero_division=0)),
    }


def multi_label_scores(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Micro-F1 (every label decision counts the same), macro-F1 (every label counts the same; a label
    with no gold and no predicted rows scores 0), weighted F1, subset accuracy
    (the whole label set right) and Hamming loss (the share of wrong label decisions)."""
    gold, pred = np.asarray(gold) > 0.5, np.asarray(pred).astype(bool)
    scores = {
        avg_name: float(f1_score(gold, pred, average=avg, zero_division=0))
        for avg_name, avg in (("micro_f1", "micro"), ("macro_f1", "macro"), ("weighted_f1", "weighted"))
    }
    scores["subset_accuracy"] = float((gold == pred).all(axis=1).mean())
    scores["hamming_loss"] = float(hamming_loss(gold, pred))
    return scores


def decision_scores(
    gold: np.ndarray, probs: np.ndarray, num_labels: int, thresholds: np.ndarray | None = None
) -> dict[str, float]:
    """Scores of class probabilities: `classification_scores` of the most probable class, or with
    per-label `thresholds` (multi-label) `multi_label_scores` of every label that reaches its threshold."""
    if thresholds is None:
        return classification_scores(gold, np.asarray(probs).argmax(-1), num_labels)
    return multi_label_scores(gold, np.asarray(probs) >= thresholds)


def per_class_report(labels: np.ndarray, preds: np.ndarray, names: list[str]) -> tuple[dict, str]:
    """Per-class precision/recall/F1/support as a dict (JSON) and as aligned text."""
    classes = list(range(len(names)))
    as_dict = classification_report(
        labels, preds, labels=classes, target_names=names, output_dict=True, zero_division=0
    )
    as_text = classification_report(
        labels, preds, labels=classes, target_names=names, digits=4, zero_division=0
    )
    return as_dict, as_text


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class."""
    return confusion_matrix(labels, preds, labels=list(range(num_labels)))


# ---------------------------------------------------------------------------------------------
# Probabilities, calibration and ratings (sentiment recipe)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class probability (Guo et al. 2017), equal-width bins.

    Each prediction falls in the bin `(k/n_bins, (k+1)/n_bins]` of its confidence; ECE is the
    mean over bins of |accuracy - mean confidence|, weighted by the share of predictions in the bin.
    0 means "70% sure" is right 70% of the time.
    """
    labels = np.asarray(labels)
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.digitize(conf, edges[1:-1], right=True)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC from class probabilities, one-vs-rest averaged over the classes present in `labels`.

    With two classes this is the usual binary AUC. NaN when `labels` hold fewer than two classes
    (AUC is undefined there).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def probability_scores(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """What the probabilities are worth beyond the argmax: ROC-AUC, ECE (`n_bins` bins) and log loss (NLL)."""
    labels = np.asarray(labels)
    picked = probs[np.arange(len(labels)), labels]
    return {
        "roc_auc": roc_auc(labels, probs),
        "ece": expected_calibration_error(labels, probs, n_bins),
        "nll": float(-np.mean(np.log(np.clip(picked, 1e-12, None)))),
    }


def regression_scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson and Spearman correlation of predicted against true ratings.

    Correlations are NaN when either side is constant (they are undefined there).
    """
    from scipy.stats import pearsonr, spearmanr

    labels, preds = np.asarray(labels, dtype=float), np.asarray(preds, dtype=float)
    err = preds - labels
    constant = np.ptp(labels) == 0 or np.ptp(preds) == 0
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "pearson": float("nan") if constant else float(pearsonr(labels, preds).statistic),
        "spearman": float("nan") if constant else float(spearmanr(labels, preds).statistic),
    }


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, owner: np.ndarray | None = None, bounds=(0.05, 20.0)
) -> float:
    """The temperature T that minimises the log loss of `softmax(logits / T)` (temperature scaling,
    Guo et al. 2017). Fit it on validation data; it never changes the argmax of a single row.

    `owner` maps rows to inputs when one input has several rows (chunks of a long text): the
    probabilities are then averaged per input, as at prediction time, before the loss is taken,
    and `labels` hold one label per input.
    """
    from scipy.optimize import minimize_scalar

    from ftkit.text import pool_chunks

    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        probs = softmax(logits / np.exp(log_t))
        if owner is not None:
            probs = pool_chunks(probs, owner)
        return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))

    # One parameter, a smooth and (for single rows) convex loss: a bounded search on log T is enough.
    best = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(best.x))
