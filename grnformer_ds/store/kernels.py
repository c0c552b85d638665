"""Fused per-block kernels of the scatter stage (numba; numba already comes with scanpy).

One pass over a row block replaces ~6 numpy/scipy passes (map columns, drop unmapped/zero entries, validate,
library sizes, sort each row by store column, reorder rows): the scatter stage was bound by those passes.
Each row is sorted with a bitmap over the store columns instead of a comparison sort: set one bit per entry,
then walk the bitmap's words in order (O(k + G/64) per row of k entries, all in L1/L2 cache).
`scipy_map_block` is the reference implementation (and the fallback when numba is missing).
"""
from __future__ import annotations

import threading

import numpy as np
import scipy.sparse as sp

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba ships with scanpy, a dependency
    HAVE_NUMBA = False

# flags returned by count_block
FLAG_NONFINITE, FLAG_NEGATIVE, FLAG_NONINTEGER, FLAG_OVER_U16 = 1, 2, 4, 8


def _count_block(indptr, indices, data, cmap):
    """Per row: number of mapped nonzero entries and their sum; block flags (bad values, > uint16 values)."""
    n = indptr.shape[0] - 1
    row_len = np.zeros(n, dtype=np.int64)
    lib = np.zeros(n, dtype=np.float64)
    flags = 0
    total = 0.0
    for r in range(n):
        cnt = 0
        s = 0.0
        for e in range(indptr[r], indptr[r + 1]):
            v = float(data[e])
            if not np.isfinite(v):
                flags |= FLAG_NONFINITE
                continue
            if v < 0:
                flags |= FLAG_NEGATIVE
            if v != np.floor(v):
                flags |= FLAG_NONINTEGER
            total += v
            if v != 0 and cmap[indices[e]] >= 0:
                cnt += 1
                s += v
                if v > 65535.0:
                    flags |= FLAG_OVER_U16
        row_len[r] = cnt
        lib[r] = s
    return row_len, lib, flags, total


def _emit_block(indptr, indices, data, cmap, rows, out_indptr, out_indices, out_data, n_cols, monotone):
    """Write input rows `rows` (in that order) with store columns, sorted within each row, into the out arrays."""
    n_words = (n_cols >> 6) + 1
    bits = np.zeros(n_words, dtype=np.uint64)
    vals = np.zeros(n_cols, dtype=out_data.dtype)
    one = np.uint64(1)
    for o in range(rows.shape[0]):
        r = rows[o]
        pos = out_indptr[o]
        if monotone:
            for e in range(indptr[r], indptr[r + 1]):
                c = cmap[indices[e]]
                if c >= 0 and data[e] != 0:
                    out_indices[pos] = c
                    out_data[pos] = data[e]
                    pos += 1
            continue
        lo_w = n_words
        hi_w = -1
        for e in range(indptr[r], indptr[r + 1]):
            c = cmap[indices[e]]
            if c >= 0 and data[e] != 0:
                w = c >> 6
                bits[w] |= one << np.uint64(c & 63)
                vals[c] = data[e]
                if w < lo_w:
                    lo_w = w
                if w > hi_w:
                    hi_w = w
        for w in range(lo_w, hi_w + 1):
            word = bits[w]
            if word == 0:
                continue
            bits[w] = 0
            while word != 0:
                c = (w << 6) + np.int64(_ctz(word))
                out_indices[pos] = c
                out_data[pos] = vals[c]
                pos += 1
                word &= word - one  # clear the lowest set bit


def _put_rows(indptr, indices, data, rows, out_start, out_indices, out_data):
    """Row rows[o] of a CSR matrix (by its arrays) to position out_start[o] of the out arrays, widening dtypes."""
    for o in range(rows.shape[0]):
        r = rows[o]
        a = indptr[r]
        b = out_start[o]
        for t in range(indptr[r + 1] - a):
            out_indices[b + t] = indices[a + t]
            out_data[b + t] = data[a + t]


if HAVE_NUMBA:
    from numba.cpython.unsafe.numbers import trailing_zeros as _ctz  # one tzcnt instruction

    _put_rows = numba.njit(cache=True, nogil=True)(_put_rows)
    _count_block = numba.njit(cache=True, nogil=True)(_count_block)
    _emit_block = numba.njit(cache=True, nogil=True)(_emit_block)


_POOL = None
_MIN_SPLIT_NNZ = 1 << 22  # split a kernel call across threads only above this many entries


_DEFAULT_THREADS: int | None = None  # set by the builder for pool processes (set_default_threads)


def set_default_threads(n: int | None) -> None:
    """Threads per kernel call in this process (None: up to 2, one per core); GRNFORMER_KERNEL_THREADS wins."""
    global _DEFAULT_THREADS
    _DEFAULT_THREADS = None if n is None else max(1, int(n))


def _threads() -> int:
    import os

    n = os.environ.get("GRNFORMER_KERNEL_THREADS")
    if n is not None:
        return max(1, int(n))
    if _DEFAULT_THREADS is not None:
        return _DEFAULT_THREADS
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, min(2, os.cpu_count() or 1))


def _run_split(kernel, rows: np.ndarray, out_indptr: np.ndarray, args_before: tuple, args_after: tuple) -> None:
    """kernel(*args_before, rows[a:b], ..., args_after) on disjoint output-row ranges, in threads.

    The kernels are numba ``nogil``: each part writes its own slice of the outputs (positions from out_indptr),
    so the parts run truly in parallel and the result is identical to one call. Used by the row copies of both
    stages, whose other work (h5py reads, tensorstore writes) leaves a core idle with one worker process.
    """
    n_thr = _threads()
    nnz = int(out_indptr[-1])
    if n_thr <= 1 or nnz < _MIN_SPLIT_NNZ or len(rows) < 2 * n_thr:
        kernel(*args_before, rows, out_indptr, *args_after)
        return
    # split at equal nnz
    cuts = np.searchsorted(out_indptr, np.linspace(0, nnz, n_thr + 1)[1:-1]).tolist()
    bounds = [0, *cuts, len(rows)]
    futs = [_pool().submit(kernel, *args_before, rows[a:b], out_indptr[a:b + 1], *args_after)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for f in futs:
        f.result()


_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="store-kernel")
    return _POOL


def run_tasks(tasks: list) -> list:
    """Results of fn(*args) for (fn, args) in `tasks`, on the kernel threads (numba nogil kernels writing disjoint
    parts of their outputs) or in this thread when there is one core or one task."""
    if _threads() <= 1 or len(tasks) <= 1:
        return [fn(*args) for fn, args in tasks]
    futs = [_pool().submit(fn, *args) for fn, args in tasks]
    return [f.result() for f in futs]


def put_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, out_start: np.ndarray,
             out_indices: np.ndarray, out_data: np.ndarray) -> int:
    """Copy CSR rows `rows` to their positions `out_start` in preallocated out arrays (gather's spilled rows)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_start = np.ascontiguousarray(out_start, dtype=np.int64)
    if HAVE_NUMBA:
        _put_rows(indptr, indices, data, rows, out_start, out_indices, out_data)
        return 0
    for r, b in zip(rows.tolist(), out_start.tolist()):  # pragma: no cover - numba ships with scanpy
        a, z = int(indptr[r]), int(indptr[r + 1])
        out_indices[b:b + z - a] = indices[a:z]
        out_data[b:b + z - a] = data[a:z]
    return 0


def count_block(m: sp.csr_matrix, cmap: np.ndarray):
    """(row_len (n,) int64, lib (n,) float64, flags int, total counts float) of a CSR block under column map cmap."""
    if HAVE_NUMBA:
        return _count_block(m.indptr, m.indices, m.data, cmap)
    return _count_block_numpy(m, cmap)


def emit_block(m: sp.csr_matrix, cmap: np.ndarray, rows: np.ndarray, row_len: np.ndarray, n_cols: int,
               monotone: bool, index_dtype, value_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows `rows` of block m mapped to store columns, sorted in each row: (indptr int64, indices, data)."""
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(row_len[rows], out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    out_indices = np.empty(nnz, dtype=index_dtype)
    out_data = np.empty(nnz, dtype=value_dtype)
    if HAVE_NUMBA:
        _run_split(_emit_block, np.ascontiguousarray(rows, dtype=np.int64), out_indptr,
                   (m.indptr, m.indices, m.data, cmap), (out_indices, out_data, n_cols, monotone))
        return out_indptr, out_indices, out_data
    ip, ind, dat = scipy_map_block(m, cmap, rows, n_cols)
    return ip, ind.astype(index_dtype), dat.astype(value_dtype)


def _count_block_numpy(m: sp.csr_matrix, cmap: np.ndarray):
    d = m.data.astype(np.float64)
    n = m.shape[0]
    flags = 0
    finite = np.isfinite(d)
    if not finite.all():
        flags |= FLAG_NONFINITE
    if (d[finite] < 0).any():
        flags |= FLAG_NEGATIVE
    if (d[finite] != np.floor(d[finite])).any():
        flags |= FLAG_NONINTEGER
    keep = finite & (d != 0) & (cmap[m.indices] >= 0)
    if (d[keep] > 65535).any():
        flags |= FLAG_OVER_U16
    row = np.repeat(np.arange(n), np.diff(m.indptr))
    row_len = np.bincount(row[keep], minlength=n).astype(np.int64)
    lib = np.bincount(row[keep], weights=d[keep], minlength=n)
    return row_len, lib, flags, float(d[finite].sum())


def scipy_map_block(m: sp.csr_matrix, cmap: np.ndarray, rows: np.ndarray, n_cols: int):
    """Reference: the same result as emit_block with scipy (map, drop, CSR→CSC→CSR sort, row reorder)."""
    cols = cmap[m.indices]
    keep = (cols >= 0) & (m.data != 0)
    n = m.shape[0]
    row = np.repeat(np.arange(n), np.diff(m.indptr))
    row_len = np.bincount(row[keep], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_len, out=indptr[1:])
    mapped = sp.csr_matrix((m.data[keep], cols[keep], indptr), shape=(n, n_cols)).tocsc().tocsr()
    out = mapped[np.asarray(rows, dtype=np.int64)]
    return out.indptr.astype(np.int64), out.indices, out.data
