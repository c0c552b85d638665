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

Per cell: `normalize_log1p`, `quantile_edges`, `bin_nonzero` (plain numpy, the references). Per batch (the collators):
`normalize_log1p_batch` and `bin_batch`, numba kernels in ``binning_kernels.py``, bit for bit the per-cell results;
`bin_batch_numpy` is the vectorised numpy version the kernels are also tested against.
"""
from __future__ import annotations

import numpy as np

from .binning_kernels import TIE_TABLE_SIZE, bin_rows, row_scales

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


def _segment_sums_exact(data: np.ndarray, indptr: np.ndarray) -> np.ndarray | None:
    """Per-row ``data[a:b].sum()`` (float32), vectorised, or None when it cannot be guaranteed bit-identical.

    numpy sums a float32 row pairwise; any order gives the same float32 result when every value is an integer and
    every partial sum stays below 2**24 (all exactly representable), which holds for raw counts. Otherwise None."""
    if len(data) == 0:
        return np.zeros(len(indptr) - 1, dtype=np.float32)
    if not (np.all(data >= 0) and np.array_equal(data, np.floor(data))):
        return None
    lens = np.diff(indptr)
    sums = np.zeros(len(lens), dtype=np.float64)
    nz = lens > 0
    sums[nz] = np.add.reduceat(data.astype(np.float64), indptr[:-1][nz])
    if sums.max(initial=0.0) >= 2 ** 24:
        return None
    return sums.astype(np.float32)


def row_totals(indptr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``float(counts[a:b].sum())`` of every CSR row (numpy's float32 sum), as (B,) float64: vectorised when exact
    (raw counts, `_segment_sums_exact`), else per row."""
    sums = _segment_sums_exact(counts, indptr)
    if sums is not None:
        return sums.astype(np.float64)
    return np.array([float(counts[a:b].sum()) for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())],
                    dtype=np.float64)


def normalize_log1p_batch(indptr: np.ndarray, counts: np.ndarray,
                          target_sum: float = DEFAULT_TARGET_SUM) -> tuple[np.ndarray, float]:
    """`normalize_log1p` of every row of a CSR batch, bit for bit the per-row results.

    indptr: (B+1,) int64 starting at 0; counts: (nnz,) float32. Returns ((nnz,) float32 values, largest count or inf
    when the counts are not all positive integers). Raw counts take one kernel pass (exact row sums, see `row_scales`)
    and one batch-wide ``np.log1p`` (numpy's, the reference); other data the per-row numpy path.
    """
    counts = np.ascontiguousarray(counts, dtype=np.float32)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    values = np.empty(len(counts), dtype=np.float32)
    ok, largest = row_scales(indptr, counts, float(target_sum), values)
    if not ok:
        return np.concatenate([np.zeros(0, np.float32)] + [
            normalize_log1p(counts[a:b], target_sum=target_sum)
            for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())]), float("inf")
    np.log1p(values, out=values)
    return values, float(largest)


def bin_batch(indptr: np.ndarray, counts: np.ndarray, n_bins: int, uniforms: np.ndarray,
              target_sum: float = DEFAULT_TARGET_SUM, edges_out: np.ndarray | None = None) -> np.ndarray:
    """`normalize_log1p` + `bin_nonzero` of every row of a CSR batch at once, bit for bit the per-row results.

    indptr: (B+1,) int64 starting at 0; counts: (nnz,) float32 nonzero raw counts; uniforms: (nnz,) as the per-row calls
    would get them (row after row). edges_out: optional (B, n_bins - 1) float64 that receives each row's quantile edges
    (tests). Normalisation in `normalize_log1p_batch`, binning in the `binning_kernels.bin_rows` kernel (per-count tie
    path for raw counts). Returns (nnz,) int64 bins.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    # the kernels index without bounds checks
    if indptr[0] != 0 or len(counts) != indptr[-1] or len(uniforms) != len(counts):
        raise ValueError(f"bin_batch: indptr [{indptr[0]}, {indptr[-1]}], {len(counts)} counts, "
                         f"{len(uniforms)} uniforms")
    values, largest = normalize_log1p_batch(indptr, counts, target_sum)
    out = np.zeros(len(values), dtype=np.int64)
    q = np.linspace(0, 1, n_bins - 1)
    if edges_out is None:
        edges_out = np.zeros((0, n_bins - 1), dtype=np.float64)
    bin_rows(indptr, values, np.ascontiguousarray(counts, dtype=np.float32),
             np.ascontiguousarray(uniforms, dtype=np.float64), q, largest < TIE_TABLE_SIZE, out, edges_out)
    return out


def bin_batch_numpy(indptr: np.ndarray, counts: np.ndarray, n_bins: int, uniforms: np.ndarray,
                    target_sum: float = DEFAULT_TARGET_SUM) -> np.ndarray:
    """Plain-numpy `bin_batch` (the reference the kernel is tested against; the previous implementation).

    Normalisation, log1p, `quantile_edges` and the tie-breaking are vectorised over the batch; the per-row sort and
    the two ``searchsorted`` per row stay in a loop. Returns (nnz,) int64 bins.
    """
    counts = np.asarray(counts, dtype=np.float32)
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows, nnz = len(indptr) - 1, len(counts)
    lens = np.diff(indptr)
    totals = _segment_sums_exact(counts, indptr)
    if totals is None or (nnz and counts.min() <= 0):
        # not raw positive counts: the per-row path (same result, slower)
        return np.concatenate([np.zeros(0, np.int64)] + [
            bin_nonzero(normalize_log1p(counts[a:b], target_sum=target_sum), n_bins, uniforms[a:b])
            for a, b in zip(indptr[:-1].tolist(), indptr[1:].tolist())])
    if nnz == 0:
        return np.zeros(0, dtype=np.int64)
    # np.float32(target_sum / total) per row, total as the Python float of the float32 sum
    nz_rows = lens > 0
    scale = np.zeros(n_rows, dtype=np.float32)
    scale[nz_rows] = (np.float64(target_sum) / totals[nz_rows].astype(np.float64)).astype(np.float32)
    values = np.log1p(counts * np.repeat(scale, lens)).astype(np.float32, copy=False)
    # each row's values sorted (row by row: a 1,000-value sort stays in cache), concatenated
    ne = np.flatnonzero(nz_rows)
    x = np.concatenate([np.sort(values[lo:hi]) for lo, hi in zip(indptr[ne].tolist(), indptr[ne + 1].tolist())])
    # quantile_edges of every nonempty row at once: (R, n_bins - 1)
    n = lens[ne][:, None]
    q = np.linspace(0, 1, n_bins - 1)
    virtual = (n - 1) * q[None, :]
    prev = np.floor(virtual)
    above = virtual >= n - 1
    prev_idx = prev.astype(np.intp)
    next_idx = prev_idx + 1
    last = np.broadcast_to(n - 1, prev_idx.shape)
    prev_idx[above] = last[above]
    next_idx[above] = last[above]
    gamma = virtual - np.where(above, -1.0, prev)
    base = (np.cumsum(lens[ne]) - lens[ne])[:, None]  # row starts in x
    a, b = x[base + prev_idx], x[base + next_idx]
    diff = b - a
    edges = a + diff * gamma
    upper = gamma >= 0.5
    edges[upper] = (b - diff * (1 - gamma))[upper]
    return _searchsorted_bins(indptr, values, ne, edges, uniforms)


def _searchsorted_bins(indptr, values, rows, edges, uniforms):
    """scGPT's digitize of each row's values with its row of ``edges`` (the float32 values widened to float64 once,
    exactly: numpy's mixed-dtype searchsorted is several times slower than the same-dtype one)."""
    left, right = np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=np.int64)
    v64 = values.astype(np.float64)
    edges = np.ascontiguousarray(edges, dtype=np.float64)
    for k, (lo, hi) in enumerate(zip(indptr[rows].tolist(), indptr[rows + 1].tolist())):
        e, v = edges[k], v64[lo:hi]
        left[lo:hi] = e.searchsorted(v, side="right")
        right[lo:hi] = e.searchsorted(v, side="left")
    return np.ceil(uniforms * (right - left) + left).astype(np.int64)
