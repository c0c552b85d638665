"""Copy cells out of cached blocks into one batch's CSR arrays, widening the store's narrow dtypes on the way.

The store keeps X/indices and X/data in the narrowest exact dtypes (uint16 for up to 65,536 genes and for integer
counts below 65,536; schema.py). The batch gather is the one pass over a batch's nonzeros that every path makes
anyway, so the widening to the batch contract (int32 gene columns, float32 counts) happens here instead of in an
extra ``astype`` pass per block. numba (a dependency, via scanpy) compiles one loop per dtype pair; numpy slicing
with one ``concatenate`` is the fallback (~5x slower at 64 cells).
"""
from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba ships with scanpy, a dependency
    numba = None


def _copy_spans(src_indices, src_data, starts, lengths, out_pos, out_indices, out_data):
    """out[out_pos[i] : out_pos[i] + lengths[i]] = src[starts[i] : starts[i] + lengths[i]] for every span i."""
    for i in range(starts.shape[0]):
        a = starts[i]
        o = out_pos[i]
        for t in range(lengths[i]):
            out_indices[o + t] = src_indices[a + t]
            out_data[o + t] = src_data[a + t]


if numba is not None:
    _copy_spans = numba.njit(cache=True, nogil=True)(_copy_spans)


def gather_spans(sources: list[tuple[np.ndarray, np.ndarray]], src_of: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate spans of several CSR sources into one CSR batch.

    sources: per source block, its (indices (nnz_k,), data (nnz_k,)) in any int / numeric dtypes;
    src_of, starts, ends: (n,) per output row, the source block and the ``[start, end)`` range of its nonzeros.
    Returns (indptr (n+1,) int64, indices (nnz,) int32, data (nnz,) float32).
    """
    n = len(starts)
    lengths = (ends - starts).astype(np.int64, copy=False)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nnz = int(indptr[-1])
    indices, data = np.empty(nnz, np.int32), np.empty(nnz, np.float32)
    if numba is None:
        if n:
            indices[:] = np.concatenate([sources[k][0][a:e] for k, a, e in zip(src_of, starts, ends)])
            data[:] = np.concatenate([sources[k][1][a:e] for k, a, e in zip(src_of, starts, ends)])
        return indptr, indices, data
    for k, (src_indices, src_data) in enumerate(sources):
        sel = np.flatnonzero(src_of == k)
        if len(sel):
            _copy_spans(src_indices, src_data, starts[sel], lengths[sel], indptr[sel], indices, data)
    return indptr, indices, data
