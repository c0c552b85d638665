"""`python data_prep/build_grn.py --store STORE ...`: build the GRN assets of a store (see docs/grn.md / build.py)."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserInputError, cli_main
from .build import GRNBuildOptions, build_grn


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_grn.py",
        description="Build cell-type GRNs, regulons, AUCell cell-specific GRNs and the co-expression graph of a store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True, help="store folder made by data_prep/build_store.py")
    p.add_argument("--demo", action="store_true",
                   help="demo recipe: built-in human prior + --infer (no download; see grnformer_ds/grn/demo.py)")
    g = p.add_argument_group("inputs (any combination; repeat a flag for several files)")
    g.add_argument("--tf-targets", action="append", default=[], metavar="TABLE",
                   help="TF–target TSV/CSV: source|TF, target, optional weight, sign, cell_type")
    g.add_argument("--scenicplus", action="append", default=[], metavar="FILE", help="SCENIC+ eRegulon table")
    g.add_argument("--pyscenic-regulons", action="append", default=[], metavar="CSV", help="`pyscenic ctx` output")
    g.add_argument("--pyscenic-adjacencies", action="append", default=[], metavar="TSV",
                   help="GRNBoost2 adjacencies (TF target importance)")
    g.add_argument("--adjacency-top-targets", type=int, default=50, help="targets kept per TF from adjacencies")
    g.add_argument("--builtin-prior", action="store_true",
                   help="human Pathway Commons prior shipped by priori-regulon-enrichment")
    g.add_argument("--tf-list", help="one TF per line; restricts regulators and marks TFs")
    g.add_argument("--match-by", choices=("symbol", "gene_id"), default="symbol",
                   help="how table genes map to the store")
    g = p.add_argument_group("reference mapping (RNA-only data: cell types and GRNs from a typed reference)")
    g.add_argument("--reference-store", help="a store with cell types and GRN assets; the query's cells take the "
                                             "majority type of their --k nearest reference cells, and its GRNs")
    g.add_argument("--reference-model", help="the model that embeds both stores (export_hf.py / import_checkpoint.py "
                                             "folder; both stores on its vocabulary)")
    g.add_argument("--k", type=int, default=15, help="reference neighbours per query cell")
    g = p.add_argument_group("--infer (RNA-only cell-type GRNs)")
    g.add_argument("--infer", action="store_true", help="filter the prior per cell type by the store's expression")
    g.add_argument("--infer-method", choices=("correlation", "grnboost2"), default="correlation")
    g.add_argument("--min-expr-frac", type=float, default=0.05,
                   help="TF and target expressed in this fraction of cells")
    g.add_argument("--min-abs-corr", type=float, default=0.1, help="|Pearson r| of TF and target, log1p-normalised")
    g.add_argument("--grnboost-top-targets", type=int, default=50, help="targets kept per TF (grnboost2)")
    g.add_argument("--max-cells-per-type", type=int, default=5000, help="cells sampled per cell type (infer/coexpr)")
    g.add_argument("--min-cells-infer", type=int, default=20, help="smaller cell types are not inferred")
    g = p.add_argument_group("networks")
    g.add_argument("--empty-celltype", choices=("error", "global", "allow"), default=None,
                   help="a store cell type with no edge: fail, use the pooled network, or keep it empty (default: "
                        "global with --infer, where small cell types cannot be inferred; error otherwise)")
    g.add_argument("--min-regulon-size", type=int, default=5, help="regulons with fewer targets are dropped")
    g = p.add_argument_group("AUCell and thresholds")
    g.add_argument("--auc-threshold", type=float, default=0.05, help="fraction of top-ranked genes (pySCENIC)")
    g.add_argument("--aucell-weights", action="store_true", help="weight genes by edge weight (pySCENIC --weights)")
    g.add_argument("--seed", type=int, default=0, help="tie-break permutation, GMM and cell samples")
    g.add_argument("--block-size", type=int, default=4096, help="cells per AUCell block")
    g.add_argument("--workers", type=int, default=1, help="AUCell worker processes")
    g.add_argument("--threshold-method", choices=("auto", "gmm", "mean_sd"), default="auto",
                   help="auto: GMM intersection when bimodal (BIC), else mean + 2 sd")
    g.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE", help="override one regulon")
    g.add_argument("--thresholds-file", help="two columns: regulon name, threshold")
    g.add_argument("--max-threshold-cells", type=int, default=100_000, help="cells sampled to fit thresholds")
    g = p.add_argument_group("co-expression graph")
    g.add_argument("--no-coexpr", action="store_true", help="skip the co-expression graph")
    g.add_argument("--coexpr-top-k", type=int, default=10, help="partners kept per gene per cell type")
    g.add_argument("--coexpr-min-corr", type=float, default=0.3, help="minimum Pearson r of a co-expression link")
    g.add_argument("--coexpr-min-cells", type=int, default=30, help="smaller cell types add no links")
    p.add_argument("--overwrite", action="store_true", help="replace the store's existing GRN assets")
    p.add_argument("--quiet", action="store_true", help="print only warnings and the summary line")
    return p


def _check_ranges(a: argparse.Namespace) -> None:
    checks = [
        (0 < a.auc_threshold <= 1, "--auc-threshold must be in (0, 1]"),
        (0 <= a.min_expr_frac <= 1, "--min-expr-frac must be in [0, 1]"),
        (0 <= a.min_abs_corr <= 1, "--min-abs-corr must be in [0, 1]"),
        (-1 <= a.coexpr_min_corr <= 1, "--coexpr-min-corr must be in [-1, 1]"),
        (a.workers >= 1, "--workers must be ≥ 1"),
        (a.block_size >= 1, "--block-size must be ≥ 1"),
        (a.min_regulon_size >= 1, "--min-regulon-size must be ≥ 1"),
        (a.coexpr_top_k >= 1, "--coexpr-top-k must be ≥ 1"),
        (a.max_cells_per_type >= 2, "--max-cells-per-type must be ≥ 2"),
        (a.max_threshold_cells >= 1, "--max-threshold-cells must be ≥ 1"),
        (a.adjacency_top_targets >= 1, "--adjacency-top-targets must be ≥ 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserInputError(message)


def options_from_args(a: argparse.Namespace) -> GRNBuildOptions:
    from .demo import DEMO_OPTIONS
    from .thresholds import parse_threshold_overrides

    _check_ranges(a)
    options = GRNBuildOptions(
        tf_targets=a.tf_targets, scenicplus=a.scenicplus, pyscenic_regulons=a.pyscenic_regulons,
        pyscenic_adjacencies=a.pyscenic_adjacencies, adjacency_top_targets=a.adjacency_top_targets,
        builtin_prior=a.builtin_prior, tf_list=a.tf_list, match_by=a.match_by, infer=a.infer,
        infer_method=a.infer_method, min_expr_frac=a.min_expr_frac, min_abs_corr=a.min_abs_corr,
        grnboost_top_targets=a.grnboost_top_targets, max_cells_per_type=a.max_cells_per_type,
        min_cells_infer=a.min_cells_infer,
        empty_celltype=a.empty_celltype or ("global" if a.infer or a.demo else "error"),
        min_regulon_size=a.min_regulon_size,
        auc_threshold=a.auc_threshold, aucell_weighted=a.aucell_weights, seed=a.seed, block_size=a.block_size,
        n_workers=a.workers, threshold_method=a.threshold_method,
        threshold_overrides=parse_threshold_overrides(a.threshold, a.thresholds_file),
        max_threshold_cells=a.max_threshold_cells, coexpr=not a.no_coexpr, coexpr_top_k=a.coexpr_top_k,
        coexpr_min_corr=a.coexpr_min_corr, coexpr_min_cells=a.coexpr_min_cells)
    if a.demo:
        for key, value in DEMO_OPTIONS.items():
            setattr(options, key, value)
    return options


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    options = options_from_args(args)

    def log(line: str) -> None:
        if not args.quiet or line.startswith("warning") or line.startswith("GRN assets written"):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)

    if bool(args.reference_store) != bool(args.reference_model):
        raise UserInputError("--reference-store and --reference-model go together")
    if not args.reference_store:
        build_grn(args.store, options, log=log, overwrite=args.overwrite)
        return 0
    import os
    import tempfile

    from .assets import has_grn_assets
    from .reference_mapping import map_to_reference

    if has_grn_assets(args.store) and not args.overwrite:  # refuse before the cell types change
        raise UserInputError("already has GRN assets: pass --overwrite to replace them", args.store)
    with tempfile.TemporaryDirectory(prefix="grnformer_refmap_") as tmp:
        table = os.path.join(tmp, "reference_celltype_grns.tsv")
        map_to_reference(args.store, args.reference_store, args.reference_model, args.k, table, log=log)
        options.tf_targets = [*options.tf_targets, table]
        if args.empty_celltype is None:
            options.empty_celltype = "allow"  # a cell type's network is the reference's, empty or not
        build_grn(args.store, options, log=log, overwrite=args.overwrite)
    return 0
