"""Demo store from scanpy's pbmc68k_reduced: counts recovered from raw.X, cell types from bulk_labels."""
from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc

from grnformer_ds.store import ensure_demo_store, open_store

# anndata/zarr warn on every open that consolidated metadata is not in the zarr v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


def test_demo_store_matches_pbmc68k_counts(tmp_path):
    path = ensure_demo_store(tmp_path / "demo")
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_store(path) == path and (path / "manifest.json").stat().st_mtime_ns == mtime  # built once
    st = open_store(path)
    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.to_adata()
    expected = np.rint(np.expm1(raw.X.toarray()) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    assert st.n_cells == 700 and st.n_genes == 765 and st.vocab_size == 768
    assert st.cell_types == sorted(src.obs["bulk_labels"].cat.categories)
    assert sorted(st.gene_names) == st.gene_names == sorted(raw.var_names)
    a = st.read_shard(0)
    assert a.X.dtype == np.uint16  # integer counts < 65,536: stored exactly in the narrowest dtype
    col = {g: j for j, g in enumerate(raw.var_names)}
    perm = [col[g] for g in a.var_names]
    row = {c: i for i, c in enumerate(src.obs_names)}
    rows = [row[c] for c in a.obs_names]
    np.testing.assert_array_equal(a.X.toarray(), expected[rows][:, perm])
    assert rows != sorted(rows)  # shuffled
    np.testing.assert_array_equal(a.obs["cell_type"].astype(str), src.obs["bulk_labels"].astype(str).to_numpy()[rows])
    np.testing.assert_allclose(a.obs["library_size"], expected[rows].sum(1))


def test_ensure_demo_store_never_overwrites_a_foreign_directory(tmp_path):
    from grnformer_ds.errors import UserInputError

    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep")
    with pytest.raises(UserInputError, match="neither a store"):
        ensure_demo_store(d)
    assert (d / "notes.txt").read_text() == "keep"
