"""Direct reads (direct.py: pread of the inputs' CSR arrays, no X spill) give the same store as the h5py spill path,
for contiguous and chunked layouts, and fall back per unit (compressed arrays, unsorted/duplicate columns, values the
h5py path must report)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from store_fixtures import make_counts, store_rows_by_name, write_h5ad  # noqa: E402

from grnformer_ds.store import build_store, direct  # noqa: E402
from grnformer_ds.store.h5ad_reader import H5adSource  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part"),
              pytest.mark.skipif(not direct.AVAILABLE, reason="no pread kernel (numba / libc)")]

G1 = [f"G{i}" for i in range(60)]
G2 = [f"G{i}" for i in range(30, 90)][::-1]  # reversed: rows need sorting into store order


def build(files, out, **kw):
    return build_store([str(f) for f in files], out, cell_type_key="cell_type", shard_size=70, block_cells=40,
                       progress=False, **kw)


def assert_same(a, b):
    assert a.manifest["shards"] == b.manifest["shards"]
    assert a.manifest["inputs"] == b.manifest["inputs"]
    for i in range(len(a.shards)):
        x, y = a.read_shard(i), b.read_shard(i)
        assert x.X.dtype == y.X.dtype and x.X.indices.dtype == y.X.indices.dtype
        assert (x.X != y.X).nnz == 0
        assert x.obs.equals(y.obs) and list(x.obs.index) == list(y.obs.index) and x.var.equals(y.var)


def write_chunked(path: Path, X: np.ndarray, genes, compression=None, chunk=97, prefix="k"):
    """CSR h5ad whose data/indices are chunked (optionally compressed) h5py datasets."""
    write_h5ad(path, X, genes, "csr", prefix, seed=5)
    m = sp.csr_matrix(X)
    with h5py.File(path, "r+") as f:
        for key, arr in (("data", m.data), ("indices", m.indices)):
            del f["X"][key]
            f["X"].create_dataset(key, data=arr, chunks=(chunk,), compression=compression)
    return path


@pytest.fixture
def unit_modes(monkeypatch):
    """Records each scatter unit's mode ("direct" / "spill") as the builds below run."""
    from grnformer_ds.store import scatter

    seen = []
    real = scatter.run_scatter_unit

    def spy(store, plan, unit):
        st = real(store, plan, unit)
        seen.append(st["mode"])
        return st

    monkeypatch.setattr("grnformer_ds.store.builder.run_scatter_unit", spy)
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "gzip"])
def test_direct_equals_spill(tmp_path, monkeypatch, unit_modes, layout):
    X1 = make_counts(230, 60, 11, zero_rows=(3, 50))
    X2 = make_counts(170, 60, 12)
    X2[7, 5] = 70000  # one count above uint16: the whole store keeps float32 values
    f1 = write_h5ad(tmp_path / "a.h5ad", X1, G1, "csr", "a", seed=1)
    f2 = tmp_path / "b.h5ad"
    if layout == "contiguous":
        write_h5ad(f2, X2, G2, "csr", "b", seed=2)
    else:
        write_chunked(f2, X2, G2, compression="gzip" if layout == "gzip" else None, prefix="b")
    got = build([f1, f2], tmp_path / "direct", workers=1)
    direct_modes = list(unit_modes)
    assert "direct" in direct_modes
    if layout == "gzip":
        assert "spill" in direct_modes  # compressed arrays: read with h5py
    monkeypatch.setenv("GRNFORMER_STORE_DIRECT", "0")
    unit_modes.clear()
    ref = build([f1, f2], tmp_path / "spill", workers=1)
    assert set(unit_modes) == {"spill"}
    assert_same(got, ref)
    assert got.read_shard(0).X.dtype == np.float32


def test_chunk_layout_offsets(tmp_path):
    X = make_counts(50, 60, 3)
    f = write_chunked(tmp_path / "c.h5ad", X, G1, chunk=13)
    with H5adSource(f, read_genes=False) as src:
        ds = direct.direct_source(src)
        assert ds is not None and ds.data.chunk == 13 and len(ds.data.offsets) == -(-src._data.shape[0] // 13)
    g = write_chunked(tmp_path / "g.h5ad", X, G1, compression="gzip")
    with H5adSource(g, read_genes=False) as src:
        assert direct.direct_source(src) is None


def test_non_canonical_rows_fall_back(tmp_path, unit_modes, monkeypatch):
    """Unsorted and duplicate column indices in a CSR input: those units use the h5py path (which sums duplicates)."""
    X = make_counts(120, 60, 7)
    f = write_h5ad(tmp_path / "n.h5ad", X, G1, "csr", "n", seed=3)
    with h5py.File(f, "r+") as h:
        ind = h["X/indices"][:]
        ip = h["X/indptr"][:]
        a, b = int(ip[100]), int(ip[101])
        assert b - a >= 3
        ind[a:b] = ind[a:b][::-1]          # row 100 unsorted
        ind[int(ip[5]) + 1] = ind[int(ip[5])]  # row 5: a duplicate column (summed by the h5py path)
        h["X/indices"][:] = ind
    got = build([f], tmp_path / "d")
    assert set(unit_modes) == {"direct", "spill"}
    monkeypatch.setenv("GRNFORMER_STORE_DIRECT", "0")
    ref = build([f], tmp_path / "s")
    assert_same(got, ref)
    rows = store_rows_by_name(got)
    assert all(np.all(np.diff(c) > 0) for c, _ in rows.values())


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_workers_two_equal_one(tmp_path):
    X1 = make_counts(230, 60, 21)
    X2 = make_counts(170, 60, 22)
    files = [write_h5ad(tmp_path / "a.h5ad", X1, G1, "csr", "a", seed=1),
             write_chunked(tmp_path / "b.h5ad", X2, G2, prefix="b")]
    assert_same(build(files, tmp_path / "w1", workers=1), build(files, tmp_path / "w2", workers=2))
    m = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert m["n_cells"] == 400
