"""scGPT value preprocessing for one cell: total-count normalisation, log1p and per-cell quantile binning.

scGPT (``scgpt.preprocess.Preprocessor`` with ``normalize_total=1e4, log1p=True, binning=n_bins``) bins every cell
separately: the nonzero values are cut at ``n_bins - 1`` quantiles (``np.quantile(nz, linspace(0, 1, n_bins - 1))``)
and digitised with ``_digitize(side="both")``, which draws a uniform number per value and places a value that sits on
one or more bin edges uniformly among those bins (so ties, common with integer counts, spread over bins). Zeros stay
bin 0; nonzero values get bins ``1 .. n_bins - 1``.

We re-implement it on the nonzero values of a CSR row instead of calling scGPT because scGPT's version works on dense
rows, logs a warning per all-zero row and draws from the global ``np.random`` state; here the uniforms come from the
caller's generator so batches are reproducible from (seed, epoch, batch index). ``tests/test_data_tokenization.py``
checks bin-for-bin equality with scGPT 0.2.4 when both get the same uniforms.
"""
from __future__ import annotations

import numpy as np

DEFAULT_TARGET_SUM = 1e4


def normalize_log1p(counts: np.ndarray, total: float | None = None,
                    target_sum: float = DEFAULT_TARGET_SUM) -> np.ndarray:
    """log1p(counts / total * target_sum) for the nonzero counts of one cell.

    counts: (n,) float32 raw counts of the cell's nonzero genes. total: the cell's total count (defaults to
    ``counts.sum()``; pass the store's ``library_size`` to normalise by all kept genes). Returns (n,) float32.
    """
    counts = np.asarray(counts, dtype=np.float32)
    if total is None:
        total = float(counts.sum())
    if total <= 0:
        return np.zeros_like(counts)
    return np.log1p(counts * np.float32(target_sum / total)).astype(np.float32, copy=False)


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """``np.quantile(values, np.linspace(0, 1, n_bins - 1))`` (method "linear"), bit for bit, without its per-call
    Python overhead (~4x faster on a cell's ~1,000 values; this runs once per cell). Returns (n_bins - 1,) float64.

    Same arithmetic as numpy's ``_quantile`` / ``_lerp``: virtual index ``(n - 1) * q``, float32 differences of the
    neighbouring order statistics, float64 interpolation from the nearer side.
    """
    n = values.size
    q = np.linspace(0, 1, n_bins - 1)
    x = np.sort(values)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= n - 1
    prev_idx = prev.astype(np.intp)
    next_idx = prev_idx + 1
    prev_idx[above] = n - 1
    next_idx[above] = n - 1
    gamma = virtual - np.where(above, -1.0, prev)  # numpy marks the last index as -1 before computing gamma
    a, b = x[prev_idx], x[next_idx]
    diff = b - a
    edges = a + diff * gamma
    upper = gamma >= 0.5
    edges[upper] = (b - diff * (1 - gamma))[upper]
    return edges


def bin_nonzero(values: np.ndarray, n_bins: int, uniforms: np.ndarray) -> np.ndarray:
    """scGPT's per-cell binning of a cell's nonzero values.

    values: (n,) positive values (order irrelevant). uniforms: (n,) numbers in [0, 1) used to place values that lie on
    bin edges (scGPT's ``np.random.rand(len(x))``). Returns (n,) int64 bins in ``[1, n_bins - 1]``.
    """
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = quantile_edges(values, n_bins)
    left = np.searchsorted(edges, values, side="right")  # = np.digitize(values, edges)
    right = np.searchsorted(edges, values, side="left")  # = np.digitize(values, edges, right=True)
    # ceil(u * (right - left) + left): right <= left; equal unless the value sits on an edge.
    return np.ceil(uniforms * (right - left) + left).astype(np.int64)
