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


def _pearson0(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, 0 where it is undefined (a constant input), as GEARS counts it."""
    from scipy.stats import pearsonr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    value = float(pearsonr(a, b).statistic)
    return 0.0 if np.isnan(value) else value


def perturbation_metrics(conditions: np.ndarray, predictions: np.ndarray, truth: np.ndarray,
                         control_mean: np.ndarray, de_genes: dict[str, np.ndarray]) -> dict[str, float]:
    """GEARS' evaluation (gears.inference.compute_metrics and the delta correlations of its deeper_analysis):
    per perturbation, the mean predicted and the mean true expression over its cells are compared over all genes
    and over its top DE genes (`de_genes[condition]`, column indices): Pearson (`pearson`, `pearson_de`), MSE (`mse`,
    `mse_de`) and Pearson of the change against the control mean (`pearson_delta`, `pearson_delta_de`); each
    averaged over the perturbations. `loss`: the per-cell, per-gene MSE (the training loss). conditions (N,) str,
    predictions / truth (N, G), control_mean (G,)."""
    out: dict[str, list[float]] = {k: [] for k in ("pearson", "pearson_de", "mse", "mse_de", "pearson_delta",
                                                   "pearson_delta_de")}
    conditions = np.asarray(conditions)
    for cond in np.unique(conditions):
        rows = conditions == cond
        p, t, de = predictions[rows].mean(0), truth[rows].mean(0), np.asarray(de_genes[cond])
        out["pearson"].append(_pearson0(p, t))
        out["pearson_de"].append(_pearson0(p[de], t[de]))
        out["mse"].append(float(np.mean((p - t) ** 2)))
        out["mse_de"].append(float(np.mean((p[de] - t[de]) ** 2)))
        out["pearson_delta"].append(_pearson0(p - control_mean, t - control_mean))
        out["pearson_delta_de"].append(_pearson0(p[de] - control_mean[de], t[de] - control_mean[de]))
    metrics = {k: float(np.mean(v)) for k, v in out.items()}
    metrics["loss"] = float(np.mean((np.asarray(predictions, np.float64) - truth) ** 2))
    return metrics
