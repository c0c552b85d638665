"""End to end on the demo store (pbmc68k_reduced): build_grn / CLI / ensure_demo_grn write what docs/design.md says."""
import json
import shutil
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from grnformer_ds.grn import read_grn_assets, read_shard_active_regulons, unpack_active
from grnformer_ds.grn.build import GRNBuildOptions, build_grn
from grnformer_ds.grn.cli import main
from grnformer_ds.store import ensure_demo_store, open_store

TFS = {"SPI1": ["LYZ", "FCER1G", "TYROBP", "S100A8", "CST3", "FCGR3A"],
       "SPIB": ["CD79A", "CD79B", "MS4A1", "HLA-DRA"],
       "GATA3": ["CD3E", "IL7R", "CCR7", "CD2", "CD247"]}


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return ensure_demo_store(tmp_path_factory.mktemp("store") / "demo")


@pytest.fixture
def store(demo_store, tmp_path):
    """A private copy of the demo store (builds write into shards)."""
    return shutil.copytree(demo_store, tmp_path / "store")


def _table(tmp_path, genes, cell_type=None, extra=()):
    rows = [(tf, t) for tf, targets in TFS.items() for t in targets if tf in genes and t in genes]
    frame = pd.DataFrame(rows + list(extra), columns=["source", "target"])
    if cell_type is not None:
        frame["cell_type"] = cell_type
    path = tmp_path / "tf_targets.tsv"
    frame.to_csv(path, sep="\t", index=False)
    return path, frame


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_build_from_table_matches_pyscenic_and_design(store, tmp_path):
    st = open_store(store)
    genes = st.gene_names
    path, table = _table(tmp_path, set(genes), extra=[("SPI1", "SPI1"), ("SPI1", "NOT_A_GENE")])
    info = build_grn(store, GRNBuildOptions(tf_targets=[str(path)], min_regulon_size=3, n_workers=2, block_size=128),
                     log=lambda s: None)  # 2 workers reading their own 128-row blocks
    a = read_grn_assets(store)

    # Cell-type GRNs: every cell type gets the mapped table (no cell_type column), self-loop and unknown gene dropped.
    expected = sorted((genes.index(s), genes.index(t)) for s, t in table.values if s != t and t in genes)
    assert a.celltype_names.tolist() == st.cell_types
    for c in range(a.n_celltypes):
        src, dst, _, sign = a.celltype_edges(c)
        assert list(zip(src.tolist(), dst.tolist())) == expected and (sign == 1).all()
    assert sorted(a.regulon_names.tolist()) == sorted(f"{tf}(+)" for tf in TFS)
    assert a.tf_mask.sum() == 3 and a.tf_mask[genes.index("SPI1")]
    counts = info["report"]["counts"]
    assert counts["self_loops_dropped"] == 1 and counts["targets_not_in_store"] == 1

    # AUCell in the shard equals pySCENIC's aucell on the shard's counts with the same regulons and seed.
    warnings.filterwarnings("ignore")
    from ctxcore.genesig import GeneSignature
    from pyscenic.aucell import aucell as pyscenic_aucell

    shard = st.shard_paths[0]
    adata = ad.read_zarr(shard)
    sigs = [GeneSignature(name=str(n), gene2weight={genes[t]: 1.0 for t in a.regulon_edges(r)[1]})
            for r, n in enumerate(a.regulon_names)]
    dense = pd.DataFrame(adata.X.toarray(), columns=genes, index=adata.obs_names)
    ref = pyscenic_aucell(dense, sigs, seed=0, num_workers=1).loc[adata.obs_names, a.regulon_names.tolist()]
    assert adata.obsm["aucell"].columns.tolist() == a.regulon_names.tolist()
    np.testing.assert_allclose(adata.obsm["aucell"].to_numpy(), ref.to_numpy(), atol=1e-6)

    # Active regulons = AUC > threshold, stored as a little-endian bitset.
    active = unpack_active(read_shard_active_regulons(shard), a.n_regulons)
    np.testing.assert_array_equal(active, adata.obsm["aucell"].to_numpy() > a.regulon_threshold[None, :])
    assert np.isfinite(a.regulon_threshold).all() and 0 < active.mean() < 1

    # Co-expression graph: symmetric, weights ≥ min_corr.
    g = a.coexpr_csr()
    assert g.nnz > 0 and (g != g.T).nnz == 0 and g.data.min() >= 0.3

    manifest = json.loads((store / "manifest.json").read_text())
    grn = manifest["assets"]["grn"]
    assert grn["schema_version"] == 1 and grn["n_regulons"] == 3 and len(grn["summary"]) == len(st.cell_types)
    row = grn["summary"][0]
    assert row["n_tfs"] == 3 and row["n_edges"] == len(expected)
    assert row["mean_degree_tf"] > row["mean_degree_non_tf"] and 0 < row["share_genes_no_edge"] < 1


def _run_cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if line.startswith("error")]


def test_cli_bad_input_is_one_line_error(store, tmp_path, capsys):
    st = open_store(store)
    genes = set(st.gene_names)
    bad = tmp_path / "bad.tsv"
    bad.write_text("factor\tgene_symbol\nSPI1\tLYZ\n")
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(bad))
    assert rc == 2 and len(err) == 1 and "missing TF (source) column" in err[0]

    path, _ = _table(tmp_path, genes, cell_type="Not a cell type")
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(path))
    assert rc == 2 and "none of the table's cell types" in err[0]

    path, _ = _table(tmp_path, genes, cell_type=st.cell_types[0])  # the other 9 cell types would be empty
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(path), "--no-coexpr")
    assert rc == 2 and "9 store cell types would have an empty GRN" in err[0] and "--empty-celltype" in err[0]

    path, _ = _table(tmp_path, genes)
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(path), "--min-regulon-size", "50")
    assert rc == 2 and "lower --min-regulon-size" in err[0]
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(path), "--auc-threshold", "1.5")
    assert rc == 2 and "--auc-threshold" in err[0]


def test_scenicplus_and_pyscenic_inputs_through_the_cli(store, tmp_path, capsys):
    st = open_store(store)
    ct = st.cell_types
    scplus = tmp_path / "eRegulon_direct.tsv"
    pd.DataFrame({"Region": ["chr1:1-9", "chr1:20-29", "chr2:1-9", "chr3:1-9"],
                  "Gene": ["LYZ", "LYZ", "FCGR3A", "CD79A"], "TF": ["SPI1", "SPI1", "SPI1", "SPIB"],
                  "importance_TF2G": [1.0, 4.0, 2.0, 3.0], "regulation": [1, 1, -1, 1],
                  "cell_type": [ct[0], ct[0], ct[0], ct[1]]}).to_csv(scplus, sep="\t", index=False)
    rc = main(["--store", str(store), "--scenicplus", str(scplus), "--min-regulon-size", "1",
               "--empty-celltype", "global", "--no-coexpr", "--quiet"])
    assert rc == 0
    a = read_grn_assets(store)
    assert sorted(a.regulon_names.tolist()) == ["SPI1(+)", "SPI1(-)", "SPIB(+)"]
    src, dst, w, s = a.celltype_edges(0)
    genes = st.gene_names
    assert sorted(zip([genes[i] for i in src], [genes[i] for i in dst], w.tolist(), s.tolist())) == [
        ("SPI1", "FCGR3A", 2.0, -1), ("SPI1", "LYZ", 4.0, 1)]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["assets"]["grn"]["report"]["counts"]["celltypes_empty"] == len(ct) - 2

    adj = tmp_path / "adj.tsv"
    pd.DataFrame({"TF": ["SPI1"] * 3, "target": ["LYZ", "FCGR3A", "CST3"], "importance": [3.0, 2.0, 1.0]}).to_csv(
        adj, sep="\t", index=False)
    second = ["--store", str(store), "--pyscenic-adjacencies", str(adj), "--adjacency-top-targets", "2",
              "--min-regulon-size", "2", "--no-coexpr", "--quiet"]
    # a second build on a store with GRN assets is refused (one line, exit 2) and changes nothing ...
    before = {p.relative_to(store): p.read_bytes() for p in sorted((store / "grn").rglob("*")) if p.is_file()}
    rc, err = _run_cli(capsys, *second)
    assert rc == 2 and len(err) == 1 and "already has GRN assets: pass --overwrite" in err[0], err
    assert {p.relative_to(store): p.read_bytes() for p in sorted((store / "grn").rglob("*")) if p.is_file()} == before
    assert json.loads((store / "manifest.json").read_text())["assets"]["grn"] == manifest["assets"]["grn"]
    # ... and replaces them with --overwrite
    assert main(second + ["--overwrite"]) == 0
    a = read_grn_assets(store)
    assert a.regulon_names.tolist() == ["SPI1(+)"]
    assert sorted(genes[t] for t in a.regulon_edges(0)[1]) == ["FCGR3A", "LYZ"]


def test_demo_grn_is_real_and_idempotent(store):
    from grnformer_ds.grn.demo import DEMO_OPTIONS, demo_grn_complete, ensure_demo_grn

    assert not demo_grn_complete(store)
    a = ensure_demo_grn(store, log=lambda s: None)
    assert demo_grn_complete(store)
    assert a.n_regulons >= 10
    sizes = np.diff(a.celltype_indptr)
    assert (sizes > 0).all()  # no cell type is left with an empty GRN
    genes = a.genes.tolist()
    src, dst, _, _ = a.celltype_edges(a.celltype_names.tolist().index("CD14+ Monocyte"))
    assert "SPI1" in {genes[i] for i in src}  # the myeloid master regulator has targets in monocytes
    assert len(a.coexpr_indices) > 0
    logged = []
    ensure_demo_grn(store, log=logged.append)
    assert logged == []  # second call: nothing rebuilt
    grn = json.loads((store / "manifest.json").read_text())["assets"]["grn"]
    assert grn["sources"][0]["kind"] == "builtin_prior" and grn["options"]["infer"] is DEMO_OPTIONS["infer"]


def test_infer_from_a_prior_works_on_ordinary_data_without_extra_flags(store, tmp_path, capsys):
    """The docs' --infer example as written: small cell types (CD34+ has 13 cells) cannot be inferred and get the
    network inferred on all cells (the --infer default), counted, instead of failing."""
    path, _ = _table(tmp_path, set(open_store(store).gene_names))
    rc = main(["--store", str(store), "--tf-targets", str(path), "--infer", "--min-abs-corr", "0.1",
               "--min-expr-frac", "0.05", "--min-regulon-size", "1", "--no-coexpr", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    grn = json.loads((store / "manifest.json").read_text())["assets"]["grn"]
    assert grn["options"]["empty_celltype"] == "global" and grn["report"]["counts"]["celltypes_empty"] >= 3
    assert (np.diff(read_grn_assets(store).celltype_indptr) > 0).all()
    # without --infer a table missing cell types is still an error (a per-cell-type table with gaps is a mistake)
    path, _ = _table(tmp_path, set(open_store(store).gene_names), cell_type=open_store(store).cell_types[0])
    rc, err = _run_cli(capsys, "--store", str(store), "--tf-targets", str(path), "--no-coexpr", "--overwrite")
    assert rc == 2 and "--empty-celltype" in err[0]
