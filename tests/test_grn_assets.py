"""GRN asset layout (docs/design.md section 2): write/read round trip, union of active regulons, bitsets, coexpr."""
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from grnformer_ds.errors import UserInputError
from grnformer_ds.grn import (
    GRNAssets,
    pack_active,
    read_grn_assets,
    read_shard_active_regulons,
    unpack_active,
    write_grn_assets,
    write_shard_regulon_activity,
)
from grnformer_ds.grn.coexpr import topk_correlations, union_symmetric_max


def _assets(n_genes=12):
    rng = np.random.default_rng(0)
    a = GRNAssets.empty([f"g{i}" for i in range(n_genes)], ["T1", "T2"])
    regs = [(0, [1, 2, 3]), (0, [4]), (5, [1, 6, 7]), (8, [2, 9])]
    a.regulon_names = np.array(["g0(+)", "g0(-)", "g5(+)", "g8(+)"])
    a.regulon_tf = np.array([t for t, _ in regs], np.int32)
    a.regulon_indptr = np.r_[0, np.cumsum([len(x) for _, x in regs])].astype(np.int64)
    a.regulon_target = np.concatenate([x for _, x in regs]).astype(np.int32)
    a.regulon_weight = rng.uniform(0.1, 1, len(a.regulon_target)).astype(np.float32)
    a.regulon_sign = np.array([1, 1, 1, -1, 1, 1, 1, 1, 1], np.int8)
    a.regulon_threshold = np.array([0.1, 0.2, 0.3, np.nan], np.float32)
    a.celltype_indptr = np.array([0, 2, 3])
    a.celltype_src, a.celltype_dst = np.array([0, 5, 8], np.int32), np.array([1, 6, 9], np.int32)
    a.celltype_weight, a.celltype_sign = np.ones(3, np.float32), np.array([1, -1, 1], np.int8)
    a.tf_mask[[0, 5, 8]] = True
    g = sp.random(n_genes, n_genes, density=0.2, random_state=1, format="csr", dtype=np.float32)
    a.coexpr_indptr, a.coexpr_indices, a.coexpr_data = g.indptr.astype(np.int64), g.indices, g.data
    return a


def test_round_trip_plain_zarr(tmp_path):
    a = _assets()
    write_grn_assets(tmp_path, a, update_manifest=False)
    b = read_grn_assets(tmp_path)
    for field in ("genes", "tf_mask", "regulon_names", "regulon_tf", "regulon_indptr", "regulon_target",
                  "regulon_weight", "regulon_sign", "celltype_names", "celltype_indptr", "celltype_src",
                  "celltype_dst", "celltype_sign", "coexpr_indptr", "coexpr_indices", "coexpr_data"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_array_equal(a.regulon_threshold, b.regulon_threshold)
    # Readable with plain zarr, dtypes as documented.
    g = zarr.open_group(str(tmp_path / "grn"), mode="r")
    assert g["regulons/indptr"].dtype == np.int64 and g["regulons/sign"].dtype == np.int8
    assert g["celltype/src"].dtype == np.int32 and g["coexpr/data"].dtype == np.float32
    assert g.attrs["schema_version"] == 1
    write_grn_assets(tmp_path, b, update_manifest=False)  # rewriting replaces atomically
    assert read_grn_assets(tmp_path).n_regulons == 4


def test_missing_assets_and_invalid_arrays(tmp_path):
    with pytest.raises(UserInputError, match="no GRN assets"):
        read_grn_assets(tmp_path)
    a = _assets()
    a.regulon_target = a.regulon_target.copy()
    a.regulon_target[0] = 99
    with pytest.raises(ValueError, match="outside"):
        write_grn_assets(tmp_path, a, update_manifest=False)


def test_cell_edges_is_union_of_active_regulons():
    a = _assets()
    rng = np.random.default_rng(3)
    for _ in range(20):
        active = rng.random(a.n_regulons) < 0.5
        expected = set()
        for r in np.flatnonzero(active):
            src, dst, _, _ = a.regulon_edges(r)
            expected |= set(zip(src.tolist(), dst.tolist()))
        src, dst, w, s = a.cell_edges(active)
        assert list(zip(src.tolist(), dst.tolist())) == sorted(expected)
        assert set(np.unique(s)) <= {-1, 1} and len(w) == len(src)
    assert len(a.cell_edges(np.zeros(a.n_regulons, bool))[0]) == 0
    # g0(+) and g0(-) share no target here; ids work like masks
    np.testing.assert_array_equal(a.cell_edges(np.array([0, 2]))[1], a.cell_edges(np.array([1, 0, 1, 0], bool))[1])


def test_bitset_and_shard_obsm(tmp_path):
    active = np.random.default_rng(0).random((9, 13)) < 0.3
    bits = pack_active(active)
    assert bits.shape == (9, 2) and bits.dtype == np.uint8
    assert bits[0, 0] == sum(1 << i for i in range(8) if active[0, i])  # little bit order
    np.testing.assert_array_equal(unpack_active(bits, 13), active)

    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        adata = ad.AnnData(sp.random(9, 5, density=0.5, format="csr", dtype=np.float32, random_state=0))
        adata.obs_names = [f"c{i}" for i in range(9)]
        adata.write_zarr(tmp_path / "s.zarr")
        zarr.consolidate_metadata(str(tmp_path / "s.zarr"))  # as the store writer does
    names = [f"R{i}(+)" for i in range(13)]
    auc = np.random.default_rng(1).random((9, 13)).astype(np.float32)
    write_shard_regulon_activity(tmp_path / "s.zarr", auc, None, names)
    write_shard_regulon_activity(tmp_path / "s.zarr", None, active, names)
    back = ad.read_zarr(tmp_path / "s.zarr")
    assert back.obsm["aucell"].columns.tolist() == names
    np.testing.assert_array_equal(back.obsm["aucell"].to_numpy(), auc)
    np.testing.assert_array_equal(unpack_active(back.obsm["active_regulons"], 13), active)
    rows = np.array([7, 2])
    np.testing.assert_array_equal(unpack_active(read_shard_active_regulons(tmp_path / "s.zarr", rows), 13),
                                  active[rows])


def test_coexpression_topk_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    base = rng.poisson(1.0, size=(300, 1))
    X = rng.poisson(0.5, size=(300, 30)).astype(float)
    X[:, :5] += base  # five co-expressed genes
    X[:, 29] = 0  # constant gene: no partner
    rows, cols, r = topk_correlations(sp.csr_matrix(X), top_k=3, min_corr=0.0, gene_block=7)
    ref = np.corrcoef(X[:, :29].T)
    np.fill_diagonal(ref, -np.inf)
    for i in range(29):
        mine = cols[rows == i]
        expected = np.argsort(-ref[i])[:3]
        expected = expected[ref[i, expected] >= 0]
        assert set(mine) == set(expected)
        np.testing.assert_allclose(np.sort(r[rows == i]), np.sort(ref[i, expected]), atol=1e-9)
    assert 29 not in rows and 29 not in cols
    g = union_symmetric_max([(rows, cols, r), (np.array([0]), np.array([1]), np.array([0.99]))], 30)
    assert (g != g.T).nnz == 0 and g[0, 1] == pytest.approx(0.99) and g[1, 0] == pytest.approx(0.99)
