"""The fused scatter/gather kernels equal their scipy reference on random blocks."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from grnformer_ds.store import kernels as K


def random_block(seed: int, n=300, g_in=700, dtype=np.float32):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, size=(n, g_in)) * (rng.random((n, g_in)) < 0.2)
    dense[5] = 0
    m = sp.csr_matrix(dense.astype(dtype))
    m.data[::11] = 0  # explicit zeros must be dropped
    return m


@pytest.mark.parametrize("monotone", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_emit_block_equals_scipy_reference(monotone, dtype):
    rng = np.random.default_rng(1)
    m = random_block(2, dtype=dtype)
    g_in = m.shape[1]
    store_cols = np.arange(g_in) if monotone else rng.permutation(g_in)
    cmap = np.where(rng.random(g_in) < 0.8, store_cols, -1).astype(np.int64)
    if monotone:  # keep it increasing over the mapped genes, with gaps
        cmap[cmap >= 0] = np.cumsum(rng.integers(1, 3, size=(cmap >= 0).sum())) - 1
    G = int(cmap.max()) + 1
    row_len, lib, flags, total = K.count_block(m, cmap)
    mapped = (cmap[m.indices] >= 0) & (m.data != 0)
    rows_of = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    np.testing.assert_array_equal(row_len, np.bincount(rows_of[mapped], minlength=m.shape[0]))
    np.testing.assert_allclose(lib, np.bincount(rows_of[mapped], weights=m.data[mapped], minlength=m.shape[0]))
    assert flags == 0 and total == pytest.approx(m.data.sum())
    rows = rng.permutation(np.nonzero(row_len)[0])
    got = K.emit_block(m, cmap, rows, row_len, G, monotone, np.int32, np.float32)
    ref = K.scipy_map_block(m, cmap, rows, G)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    # put_rows (gather's spilled rows): reorder again, widening uint16 spills, and compare with scipy row indexing
    order = rng.permutation(len(rows))
    ip = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(np.diff(got[0])[order], out=ip[1:])
    ind, dat = np.empty(ip[-1], np.int32), np.empty(ip[-1], np.float32)
    K.put_rows(got[0], got[1].astype(np.uint16), got[2].astype(np.uint16), order, ip[:-1], ind, dat)
    want = sp.csr_matrix((got[2], got[1], got[0]), shape=(len(rows), G))[order]
    np.testing.assert_array_equal(ip, want.indptr)
    np.testing.assert_array_equal(ind, want.indices)
    np.testing.assert_array_equal(dat, want.data)
    assert ind.dtype == np.int32 and dat.dtype == np.float32


@pytest.mark.parametrize("value,flag", [(np.nan, K.FLAG_NONFINITE), (np.inf, K.FLAG_NONFINITE),
                                        (-2.0, K.FLAG_NEGATIVE), (0.5, K.FLAG_NONINTEGER),
                                        (70000.0, K.FLAG_OVER_U16)])
def test_count_block_flags(value, flag):
    m = random_block(3)
    m.data[7] = value
    cmap = np.arange(m.shape[1], dtype=np.int64)
    assert K.count_block(m, cmap)[2] & flag
    assert K._count_block_numpy(m, cmap)[2] & flag
