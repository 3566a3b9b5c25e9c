"""Classification metrics computed locally (scikit-learn), no metric scripts from the hub."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classification_scores(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 (every class counts the same: the model-selection metric) and weighted F1."""
    classes = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, preds, labels=classes, average="weighted", zero_division=0)),
    }


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
