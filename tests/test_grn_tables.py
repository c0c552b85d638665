"""Table readers (TF–target, SCENIC+, pySCENIC) and the mapping/merging rules of network.py."""
import warnings

import numpy as np
import pandas as pd
import pytest

from grnformer_ds.errors import UserInputError
from grnformer_ds.grn.network import BuildReport, build_celltype_networks, build_regulons, map_edges
from grnformer_ds.grn.tables import read_pyscenic_adjacencies, read_pyscenic_regulons, read_scenicplus, read_tf_targets
from grnformer_ds.store import GeneMatcher

GENES = ["SPI1", "CD14", "LYZ", "GATA1", "KLF1", "HBB", "PAX5", "CD79A", "MS4A1"]


def test_tf_targets_collectri_style_signs_and_aliases(tmp_path):
    f = tmp_path / "collectri.tsv"
    pd.DataFrame({"source": ["SPI1", "SPI1", "GATA1"], "target": ["CD14", "HBB", "SPI1"],
                  "weight": [1, -1, -1]}).to_csv(f, sep="\t", index=False)
    t = read_tf_targets(f)
    assert t[["tf", "target"]].values.tolist() == [["SPI1", "CD14"], ["SPI1", "HBB"], ["GATA1", "SPI1"]]
    assert t["sign"].tolist() == [1, -1, -1] and t["weight"].tolist() == [1, 1, 1]
    g = tmp_path / "words.csv"
    pd.DataFrame({"TF": ["PAX5"], "Target": ["CD79A"], "mode": ["repression"],
                  "cell_type": ["B"]}).to_csv(g, index=False)
    t = read_tf_targets(g)
    assert t["sign"].tolist() == [-1] and t["cell_type"].tolist() == ["B"]


def test_missing_columns_and_bad_values_are_one_line_errors(tmp_path):
    f = tmp_path / "bad.tsv"
    f.write_text("regulator_name\tgene_name\nSPI1\tCD14\n")
    with pytest.raises(UserInputError, match=r"bad.tsv: missing TF \(source\) column") as e:
        read_tf_targets(f)
    assert "\n" not in str(e.value)
    f.write_text("source\ttarget\tweight\nSPI1\tCD14\thigh\n")
    with pytest.raises(UserInputError, match="non-numeric"):
        read_tf_targets(f)
    f.write_text("")
    with pytest.raises(UserInputError, match="empty"):
        read_tf_targets(f)


def test_scenicplus_tf_gene_kept_once_with_weight_and_sign(tmp_path):
    f = tmp_path / "eRegulon_direct.tsv"
    pd.DataFrame({
        "Region": ["chr1:1-100", "chr1:200-300", "chr2:1-50", "chr3:1-10"],
        "Gene": ["CD14", "CD14", "HBB", "LYZ"], "TF": ["SPI1", "SPI1", "GATA1", "SPI1"],
        "importance_TF2G": [0.5, 0.9, 2.0, 0.1], "rho_TF2G": [0.3, 0.3, 0.4, -0.2],
        "eRegulon_name": ["SPI1_direct_+/+_(2r)", "SPI1_direct_+/+_(2r)", "GATA1_direct_+/+_(1r)",
                          "SPI1_direct_-/+_(1r)"],
    }).to_csv(f, sep="\t", index=False)
    report = BuildReport()
    edges = map_edges(read_scenicplus(f), GeneMatcher(GENES), report)
    got = {(GENES[s], GENES[d]): (round(w, 3), g) for s, d, w, g in
           zip(edges["src"], edges["dst"], edges["weight"], edges["sign"])}
    assert got == {("SPI1", "CD14"): (0.9, 1), ("GATA1", "HBB"): (2.0, 1), ("SPI1", "LYZ"): (0.1, -1)}
    assert report.counts["duplicate_edges_merged"] == 1  # one TF → gene link through two regions


def _ctx_table():
    """A `pyscenic ctx` result table with pySCENIC's column layout."""
    cols = pd.MultiIndex.from_tuples([("Enrichment", c) for c in (
        "AUC", "NES", "MotifSimilarityQvalue", "OrthologousIdentity", "Annotation", "Context", "TargetGenes",
        "RankAtMax")])
    rows = [
        ("SPI1", "m1", 0.1, 3.5, 0.0, 1.0, "direct", frozenset({"activating", "m1.feather"}),
         [("CD14", 1.5), ("LYZ", 0.7)], 120),
        ("SPI1", "m2", 0.1, 3.1, 0.0, 1.0, "direct", frozenset({"activating", "m2.feather"}),
         [("CD14", 2.0), ("MS4A1", 0.3)], 130),
        ("GATA1", "m3", 0.1, 4.0, 0.0, 1.0, "direct", frozenset({"repressing", "m3.feather"}),
         [("SPI1", 1.0), ("PAX5", 0.2)], 90),
    ]
    index = pd.MultiIndex.from_tuples([r[:2] for r in rows], names=["TF", "MotifID"])
    return pd.DataFrame([r[2:] for r in rows], index=index, columns=cols)


def test_pyscenic_regulons_match_pyscenic_df2regulons(tmp_path):
    f = tmp_path / "regulons.csv"
    _ctx_table().to_csv(f)  # what `pyscenic ctx --output regulons.csv` writes
    ours = build_regulons(map_edges(read_pyscenic_regulons(f), GeneMatcher(GENES), BuildReport()), GENES,
                          BuildReport())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.object = object  # pyscenic.transform still uses the removed alias
        from pyscenic.transform import df2regulons
        from pyscenic.utils import load_motifs

        reference = df2regulons(load_motifs(str(f)))
    ref = {r.name: dict(r.gene2weight) for r in reference}
    got = {}
    for r, name in enumerate(ours.names):
        lo, hi = ours.indptr[r], ours.indptr[r + 1]
        got[name] = {GENES[t]: float(w) for t, w in zip(ours.target[lo:hi], ours.weight[lo:hi])}
    assert set(got) == set(ref) == {"SPI1(+)", "GATA1(-)"}
    for name in ref:
        assert got[name] == pytest.approx(ref[name])


def test_pyscenic_adjacencies_top_targets(tmp_path):
    f = tmp_path / "adj.tsv"
    pd.DataFrame({"TF": ["SPI1"] * 3 + ["PAX5"], "target": ["CD14", "LYZ", "HBB", "CD79A"],
                  "importance": [5.0, 3.0, 0.1, 2.0]}).to_csv(f, sep="\t", index=False)
    t = read_pyscenic_adjacencies(f, top_targets=2)
    assert sorted(zip(t["tf"], t["target"])) == [("PAX5", "CD79A"), ("SPI1", "CD14"), ("SPI1", "LYZ")]


def _edges(rows, cell_type=True):
    frame = pd.DataFrame(rows, columns=["tf", "target", "weight", "sign", "cell_type"])
    if not cell_type:
        frame["cell_type"] = None
    frame.attrs["source"] = "t.tsv"
    return frame


def test_mapping_counts_unmapped_self_loops_duplicates():
    report = BuildReport()
    rows = [("SPI1", "CD14", 1.0, 1, None), ("SPI1", "CD14", 3.0, -1, None), ("SPI1", "SPI1", 1.0, 1, None),
            ("NOTAGENE", "CD14", 1.0, 1, None), ("GATA1", "XIST", 1.0, 1, None), ("GATA1", "HBB", 1.0, 1, None)]
    e = map_edges(_edges(rows, cell_type=False), GeneMatcher(GENES), report)
    assert [(GENES[s], GENES[d], w, g) for s, d, w, g in zip(e.src, e.dst, e.weight, e.sign)] == [
        ("SPI1", "CD14", 3.0, -1), ("GATA1", "HBB", 1.0, 1)]
    c = report.counts
    assert (c["tfs_not_in_store"], c["targets_not_in_store"], c["self_loops_dropped"], c["duplicate_edges_merged"],
            c["sign_conflicts"]) == (1, 1, 1, 1, 1)
    assert any("NOTAGENE" in w for w in report.warnings)
    with pytest.raises(UserInputError, match="no TF–target edge maps"):
        map_edges(_edges([("A", "B", 1.0, 1, None)], cell_type=False), GeneMatcher(GENES), BuildReport())


def test_regulon_without_mapped_target_is_counted():
    report = BuildReport()
    map_edges(_edges([("PAX5", "XIST", 1.0, 1, None), ("SPI1", "CD14", 1.0, 1, None)], cell_type=False),
              GeneMatcher(GENES), report)
    assert report.counts["regulons_without_mapped_target"] == 1


def test_celltype_rules():
    rows = [("SPI1", "CD14", 1.0, 1, "Mono"), ("SPI1", "LYZ", 1.0, 1, "Mono"), ("PAX5", "CD79A", 1.0, 1, "B"),
            ("GATA1", "HBB", 1.0, 1, "Ery")]
    e = map_edges(_edges(rows), GeneMatcher(GENES), BuildReport())
    report = BuildReport()
    net = build_celltype_networks(e, ["B", "Mono", "T"], report, empty_celltype="global")
    assert report.counts["celltypes_not_in_store"] == 1  # "Ery"
    assert report.counts["celltypes_empty"] == 1  # "T" gets the pooled network
    assert np.diff(net.indptr).tolist() == [1, 2, 3]
    with pytest.raises(UserInputError, match="empty GRN.*T"):
        build_celltype_networks(e, ["B", "Mono", "T"], BuildReport())
    with pytest.raises(UserInputError, match="none of the table's cell types"):
        build_celltype_networks(e, ["X", "Y"], BuildReport())
    allowed = build_celltype_networks(e, ["B", "Mono", "T"], BuildReport(), empty_celltype="allow")
    assert np.diff(allowed.indptr).tolist() == [1, 2, 0]
    regs = build_regulons(e, GENES, BuildReport(), min_regulon_size=2)
    assert regs.names.tolist() == ["SPI1(+)"]
    with pytest.raises(UserInputError, match="min-regulon-size"):
        build_regulons(e, GENES, BuildReport(), min_regulon_size=5)
