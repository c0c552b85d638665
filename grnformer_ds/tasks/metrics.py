"""Held-out metrics of the cell-level tasks, computed with scikit-learn on predictions gathered from every rank."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """labels (N,) int class, logits (N, C) -> loss (mean cross-entropy), accuracy, macro_f1 (over the C classes:
    a class never predicted nor present scores 0, as scGPT's annotation benchmark counts it), and for C == 2
    roc_auc (of class 1; NaN when the labels hold one class)."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    n_classes = logits.shape[1]
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(axis=1)
    out = {"loss": float(log_loss(labels, probs, labels=np.arange(n_classes))),
           "accuracy": float(accuracy_score(labels, pred)),
           "macro_f1": float(f1_score(labels, pred, labels=np.arange(n_classes), average="macro", zero_division=0))}
    if n_classes == 2:
        out["roc_auc"] = float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else float("nan")
    return out


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """targets, predictions (N,) -> loss (MSE), rmse, pearson and spearman correlation (scipy; NaN for a constant
    input), as DeepCDR reports them."""
    from scipy.stats import pearsonr, spearmanr

    y, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
    mse = float(np.mean((p - y) ** 2))
    constant = np.ptp(y) == 0 or np.ptp(p) == 0
    return {"loss": mse, "rmse": float(np.sqrt(mse)),
            "pearson": float("nan") if constant else float(pearsonr(y, p).statistic),
            "spearman": float("nan") if constant else float(spearmanr(y, p).statistic)}
