"""numba kernels of the batched scGPT binning (`binning.bin_batch`): per-row normalisation factors and per-row
quantile binning with scGPT's tie-breaking, bit for bit `binning.bin_nonzero` (the plain-numpy reference).

Why a tie path: raw counts are small integers with heavy ties (a ~1,000-gene cell has ~10-100 distinct counts), and
a row's normalised values are a function of its counts. So instead of sorting ~1,000 values per row we count each
distinct count once (a dense table indexed by count), sort the few distinct counts, and read the quantile edges and
the digitize result (``left``/``right``) per distinct value; each entry then only looks its pair up. Every assumption
is checked per row (all entries of a count carry the same value; values non-decreasing in the count) and a row that
fails any check, or has counts beyond the table, takes the sort path (numba sort + binary searches), which is the
reference algorithm itself.

Arithmetic mirrors numpy exactly: the edges are ``np.quantile(x, linspace(0, 1, n_bins - 1))`` (method "linear":
float64 virtual index ``(n - 1) * q``, float32 difference of neighbouring order statistics, float64 lerp from the
nearer side, as numpy's ``_lerp``), digitize compares the float32 value widened to float64, and the bin is
``ceil(u * (right - left) + left)``. No fastmath, so LLVM does not contract ``a + d * g`` into an FMA.
``log1p`` is NOT computed here: numpy's (possibly SIMD) float32 log1p is the reference, so the caller applies it.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# counts below this go through the per-count table (int32 slot per count value: 256 KiB, reused across rows)
TIE_TABLE_SIZE = 1 << 16


@numba.njit(cache=True, nogil=True)
def row_scales(indptr, counts, target_sum, out):
    """out[e] = counts[e] * float32(target_sum / row total) for every entry (float32), when every count is a positive
    integer and every row total is below 2**24 (then the float32 row sum numpy would compute is exact in any order).

    indptr: (B+1,) int64; counts: (nnz,) float32; out: (nnz,) float32. Returns (ok, largest count); on ok=False out
    is incomplete and the caller uses numpy's per-row sums instead.
    """
    big = 0.0
    for r in range(indptr.shape[0] - 1):
        total = 0.0
        for e in range(indptr[r], indptr[r + 1]):
            c = np.float64(counts[e])
            if not (c > 0.0 and c == math.floor(c)):
                return False, 0.0
            total += c
            if c > big:
                big = c
        if total >= 16777216.0:
            return False, 0.0
        if indptr[r + 1] > indptr[r]:
            scale = np.float32(target_sum / total)
            for e in range(indptr[r], indptr[r + 1]):
                out[e] = counts[e] * scale
    return True, big


@numba.njit(cache=True, nogil=True)
def _lerp_edge(a, b, gamma):
    """numpy ``_lerp(a, b, gamma)`` for float32 a, b and float64 gamma: float32 difference, float64 result."""
    diff = b - a  # float32 - float32 -> float32, as numpy
    if gamma >= 0.5:
        return np.float64(b) - np.float64(diff) * (1.0 - gamma)
    return np.float64(a) + np.float64(diff) * gamma


@numba.njit(cache=True, nogil=True)
def _virtual(n, qi):
    """(prev index, next index, gamma) of numpy's linear quantile at q = qi for n values."""
    virtual = (n - 1) * qi
    prev = math.floor(virtual)
    if virtual >= n - 1:  # numpy clips both neighbours to the last index and marks prev as -1 for gamma
        return n - 1, n - 1, virtual + 1.0
    p = np.int64(prev)
    return p, p + 1, virtual - prev


@numba.njit(cache=True, nogil=True)
def _bin_row_sorted(values, uniforms, lo, hi, q, edges, out):
    """Reference algorithm on one row: sort, quantile edges, digitize both sides, tie-break."""
    n = hi - lo
    x = np.sort(values[lo:hi])
    for i in range(q.shape[0]):
        p, nx, gamma = _virtual(n, q[i])
        edges[i] = _lerp_edge(x[p], x[nx], gamma)
    m = q.shape[0]
    for e in range(lo, hi):
        v = np.float64(values[e])
        # left = #edges <= v (searchsorted side="right"), right = #edges < v (side="left")
        a, b = 0, m
        while a < b:
            c = (a + b) >> 1
            if edges[c] <= v:
                a = c + 1
            else:
                b = c
        left = a
        a, b = 0, left
        while a < b:
            c = (a + b) >> 1
            if edges[c] < v:
                a = c + 1
            else:
                b = c
        out[e] = np.int64(math.ceil(uniforms[e] * np.float64(a - left) + np.float64(left)))


@numba.njit(cache=True, nogil=True)
def _bin_row_ties(values, counts, uniforms, lo, hi, q, edges, slot, dcount, dval, dleft, dright, cum, out):
    """The tie path on one row (see module docstring). Returns False (nothing written to out) when a check fails.
    slot must be all -1 on entry and is all -1 again on return."""
    n = hi - lo
    u = 0
    ok = True
    for e in range(lo, hi):
        c = np.int64(counts[e])
        s = slot[c]
        if s < 0:
            slot[c] = u
            dcount[u] = c
            dval[u] = values[e]
            cum[u] = 1  # multiplicity for now
            u += 1
        else:
            cum[s] += 1
            if values[e] != dval[s]:
                ok = False
    order = np.sort(dcount[:u])  # distinct counts ascending
    # sorted distinct values sv[k] = value of order[k]; end[k] = entries with value rank <= k (cumulative)
    sv = np.empty(u, dtype=np.float32)
    end = np.empty(u, dtype=np.int64)
    acc = 0
    for k in range(u):
        s = slot[order[k]]
        sv[k] = dval[s]
        acc += cum[s]
        end[k] = acc
        if k > 0 and sv[k] < sv[k - 1]:
            ok = False
    if ok:
        kp = 0
        kn = 0
        for i in range(q.shape[0]):
            p, nx, gamma = _virtual(n, q[i])
            while end[kp] <= p:  # order statistic p is the value whose cumulative count first exceeds p
                kp += 1
            while end[kn] <= nx:
                kn += 1
            edges[i] = _lerp_edge(sv[kp], sv[kn], gamma)
        # digitize each distinct value by merging with the sorted edges
        m = q.shape[0]
        a = 0
        b = 0
        for k in range(u):
            v = np.float64(sv[k])
            while a < m and edges[a] <= v:
                a += 1
            while b < m and edges[b] < v:
                b += 1
            s = slot[order[k]]
            dleft[s] = a
            dright[s] = b
        for e in range(lo, hi):
            s = slot[np.int64(counts[e])]
            left = dleft[s]
            out[e] = np.int64(math.ceil(uniforms[e] * np.float64(dright[s] - left) + np.float64(left)))
    for k in range(u):
        slot[dcount[k]] = -1
    return ok


@numba.njit(cache=True, nogil=True)
def bin_rows(indptr, values, counts, uniforms, q, use_ties, out, edges_out):
    """scGPT bins of every row: out[e] in [1, len(q)] for each entry (int64).

    indptr: (B+1,) int64; values: (nnz,) float32 normalised log1p values; counts: (nnz,) float32 raw counts (read only
    when use_ties, which the caller may set only when all are positive integers < TIE_TABLE_SIZE); uniforms: (nnz,)
    float64; q: (n_bins - 1,) float64 ``np.linspace(0, 1, n_bins - 1)``; edges_out: (B, n_bins - 1) float64 receives
    each row's edges (pass shape (0, n_bins - 1) to skip; tests read it).
    """
    n_rows = indptr.shape[0] - 1
    longest = 0
    for r in range(n_rows):
        longest = max(longest, indptr[r + 1] - indptr[r])
    edges = np.empty(q.shape[0], dtype=np.float64)
    slot = np.full(TIE_TABLE_SIZE if use_ties else 0, -1, dtype=np.int32)
    dcount = np.empty(longest, dtype=np.int64)
    dval = np.empty(longest, dtype=np.float32)
    dleft = np.empty(longest, dtype=np.int64)
    dright = np.empty(longest, dtype=np.int64)
    cum = np.empty(longest, dtype=np.int64)
    for r in range(n_rows):
        lo, hi = indptr[r], indptr[r + 1]
        if hi == lo:
            continue
        done = False
        if use_ties:
            done = _bin_row_ties(values, counts, uniforms, lo, hi, q, edges, slot, dcount, dval, dleft, dright, cum,
                                 out)
        if not done:
            _bin_row_sorted(values, uniforms, lo, hi, q, edges, out)
        if edges_out.shape[0] > 0:
            edges_out[r, :] = edges
