"""Build all GRN assets of a store: cell-type GRNs, regulons, AUCell + thresholds (cell-specific GRNs), co-expression.

`build_grn(store, GRNBuildOptions(...))` is what `data_prep/build_grn.py` runs; `ensure_demo_grn(store)` builds the
demo's assets (built-in human prior + `--infer`) once and is what a trainer calls before using graphs.

Order of work (so a killed run never leaves a manifest pointing at half-written assets):
1. read + map the tables, infer per cell type if asked, co-expression from a per-cell-type cell sample;
2. AUCell over every shard in row blocks (parallel workers) → `obsm["aucell"]`, plus a seeded sample of the scores;
3. thresholds from that sample → `obsm["active_regulons"]` bitsets (second pass over the stored scores);
4. `STORE/grn/` written atomically, then the manifest's `assets.grn` (schema version, counts, sources, summary).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import UserInputError
from . import assets as grn_assets
from .aucell import RegulonMatrix, aucell_stream
from .coexpr import coexpression_graph
from .infer import INFER_METHODS, filter_prior_by_expression, grnboost2_edges
from .network import BuildReport, build_celltype_networks, build_regulons, map_edges, merge_edges
from .store_io import StoreView, normalize_log1p, open_store_view, sample_cells_by_type, shard_row_blocks
from .summary import celltype_summary, format_summary
from .thresholds import derive_thresholds


@dataclasses.dataclass
class GRNBuildOptions:
    """Every knob of `build_grn` (the CLI flags of data_prep/build_grn.py have the same names)."""

    # inputs (any combination; edges from all of them are merged)
    tf_targets: Sequence[str] = ()
    scenicplus: Sequence[str] = ()
    pyscenic_regulons: Sequence[str] = ()
    pyscenic_adjacencies: Sequence[str] = ()
    adjacency_top_targets: int = 50
    builtin_prior: bool = False  # the Pathway Commons prior shipped by priori-regulon-enrichment (priors.py)
    tf_list: str | None = None
    match_by: str = "symbol"
    # --infer
    infer: bool = False
    infer_method: str = "correlation"
    min_expr_frac: float = 0.05
    min_abs_corr: float = 0.1
    grnboost_top_targets: int = 50
    max_cells_per_type: int = 5000
    min_cells_infer: int = 20  # cell types with fewer cells are not inferred (→ --empty-celltype policy)
    # networks
    empty_celltype: str = "error"
    min_regulon_size: int = 5
    # AUCell + thresholds
    auc_threshold: float = 0.05
    aucell_weighted: bool = False
    seed: int = 0
    block_size: int = 4096
    n_workers: int = 1
    threshold_method: str = "auto"
    threshold_overrides: dict = dataclasses.field(default_factory=dict)
    max_threshold_cells: int = 100_000
    # co-expression
    coexpr: bool = True
    coexpr_top_k: int = 10
    coexpr_min_corr: float = 0.3
    coexpr_min_cells: int = 30


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_inputs(options: GRNBuildOptions) -> tuple[list[pd.DataFrame], list[dict]]:
    from . import tables
    from .priors import BUILTIN_PRIOR, load_builtin_prior

    frames, sources = [], []
    readers: list[tuple[str, Sequence[str], Callable]] = [
        ("tf_targets", options.tf_targets, tables.read_tf_targets),
        ("scenicplus", options.scenicplus, tables.read_scenicplus),
        ("pyscenic_regulons", options.pyscenic_regulons, tables.read_pyscenic_regulons),
        ("pyscenic_adjacencies", options.pyscenic_adjacencies,
         lambda p: tables.read_pyscenic_adjacencies(p, top_targets=options.adjacency_top_targets)),
    ]
    for kind, paths, reader in readers:
        for path in paths:
            frames.append(reader(path))
            sources.append({"kind": kind, "path": str(Path(path).resolve()), "sha256": _sha256(path),
                            "n_rows": len(frames[-1])})
    if options.builtin_prior:
        frames.append(load_builtin_prior())
        sources.append({"kind": "builtin_prior", "path": BUILTIN_PRIOR, "n_rows": len(frames[-1]),
                        "description": "Pathway Commons controls-expression-of (human), shipped by "
                                       "priori-regulon-enrichment"})
    return frames, sources


def _tf_columns(options: GRNBuildOptions, view: StoreView, matcher, report: BuildReport) -> np.ndarray | None:
    if not options.tf_list:
        return None
    from .tables import read_tf_list

    names = read_tf_list(options.tf_list)
    cols = matcher.columns(names)
    report.warn("tf_list_not_in_store", int((cols < 0).sum()), f"{options.tf_list}: {int((cols < 0).sum())} of "
                f"{len(names)} listed TFs are not store genes")
    if not (cols >= 0).any():
        raise UserInputError("no TF of the list is a store gene", path=options.tf_list)
    return np.unique(cols[cols >= 0])


def _infer(options: GRNBuildOptions, view: StoreView, prior: pd.DataFrame | None, tf_cols: np.ndarray | None,
           samples: dict, report: BuildReport, log) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-cell-type edges (src, dst, weight, sign, cell_type) from the store's expression, and the pooled network."""
    if options.infer_method not in INFER_METHODS:
        raise UserInputError(f"--infer-method must be one of {INFER_METHODS}, got {options.infer_method!r}")
    if options.infer_method == "correlation" and prior is None:
        raise UserInputError("--infer (correlation) filters a prior network: give --tf-targets/--pyscenic-*/"
                             "--scenicplus or --builtin-prior")
    if options.infer_method == "grnboost2" and prior is None and tf_cols is None:
        raise UserInputError("--infer-method grnboost2 needs candidate TFs: --tf-list or a prior table")
    def infer_one(expr):
        if options.infer_method == "correlation":
            return filter_prior_by_expression(expr, prior, min_expr_frac=options.min_expr_frac,
                                              min_abs_corr=options.min_abs_corr)
        cand = tf_cols if tf_cols is not None else np.unique(prior["src"].to_numpy())
        return grnboost2_edges(expr, cand, view.genes, top_targets=options.grnboost_top_targets,
                               seed=options.seed, prior=prior)

    parts, small = [], []
    for code, raw in sorted(samples.items()):
        if code < 0:
            report.warn("cells_without_cell_type", raw.shape[0], f"{raw.shape[0]} sampled cells have no cell type; "
                        "used only for the pooled network")
            continue
        name = view.cell_types[code]
        if raw.shape[0] < options.min_cells_infer:
            small.append(f"{name} ({raw.shape[0]})")
            continue
        t0 = time.time()
        kept = infer_one(normalize_log1p(raw))
        log(f"  infer {name}: {raw.shape[0]} cells, kept {len(kept)} edges ({time.time() - t0:.1f}s)")
        parts.append(kept.assign(cell_type=name)[["src", "dst", "weight", "sign", "cell_type"]])
    report.warn("celltypes_too_few_cells_to_infer", len(small), f"--infer: {len(small)} cell types have fewer than "
                f"{options.min_cells_infer} cells and get no inferred GRN of their own: {', '.join(small[:5])}")
    columns = {"src": np.zeros(0, np.int32), "dst": np.zeros(0, np.int32), "weight": np.zeros(0),
               "sign": np.zeros(0, np.int8), "cell_type": np.zeros(0, object)}
    edges = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns)
    edges.attrs["source"] = f"--infer {options.infer_method}"
    # The pooled network (all sampled cells, each normalised on its own) is what an empty cell type falls back to.
    from scipy import sparse

    pooled = infer_one(normalize_log1p(sparse.vstack(list(samples.values()), format="csr")))
    pooled = pooled.assign(cell_type=None)[["src", "dst", "weight", "sign", "cell_type"]]
    log(f"  infer pooled ({sum(m.shape[0] for m in samples.values())} cells): kept {len(pooled)} edges")
    if edges.empty and pooled.empty:
        raise UserInputError(f"--infer kept no edge in any cell type (min expressed fraction {options.min_expr_frac}, "
                             f"min |r| {options.min_abs_corr}); lower --min-abs-corr / --min-expr-frac")
    return edges, pooled


def build_grn(store, options: GRNBuildOptions | None = None, *, log: Callable[[str], None] = print,
              overwrite: bool = False) -> dict:
    """Build and write every GRN asset of `store`; returns the `assets.grn` manifest entry.

    A store that already has GRN assets is refused unless `overwrite` (as build_store.py refuses an existing store):
    a second run with other inputs would otherwise silently replace networks a model was trained on."""
    options = options or GRNBuildOptions()
    t_start = time.time()
    view = open_store_view(store)
    if grn_assets.has_grn_assets(view.root) and not overwrite:
        raise UserInputError("already has GRN assets: pass --overwrite to replace them", path=str(view.root))
    report = BuildReport()
    matcher = view.matcher(options.match_by)
    frames, sources = _read_inputs(options)
    if not frames and not (options.infer and options.infer_method == "grnboost2"):
        raise UserInputError("no GRN input: give --tf-targets, --scenicplus, --pyscenic-regulons, "
                             "--pyscenic-adjacencies or --builtin-prior (or --demo)")
    log(f"GRN build for {view.root}: {view.n_cells} cells, {view.n_genes} genes, {len(view.cell_types)} cell types")
    tf_cols = _tf_columns(options, view, matcher, report)

    edges = None
    if frames:
        mapped = [map_edges(f, matcher, report) for f in frames]
        edges = merge_edges(pd.concat(mapped, ignore_index=True), report, source="all inputs") if len(mapped) > 1 \
            else mapped[0]
        if tf_cols is not None:
            not_tf = ~edges["src"].isin(tf_cols)
            report.warn("edges_regulator_not_in_tf_list", int(not_tf.sum()), f"{int(not_tf.sum())} edges whose "
                        f"regulator is not in --tf-list dropped")
            edges = edges.loc[~not_tf]
            if edges.empty:
                raise UserInputError("no edge has a regulator from --tf-list", path=options.tf_list)

    samples = None
    if options.infer or options.coexpr:
        t0 = time.time()
        samples = sample_cells_by_type(view, options.max_cells_per_type, seed=options.seed)
        log(f"sampled ≤{options.max_cells_per_type} cells per cell type ({sum(m.shape[0] for m in samples.values())} "
            f"cells, {time.time() - t0:.1f}s)")
    pooled = None
    if options.infer:
        prior = None if edges is None else edges.drop(columns=["cell_type"]).drop_duplicates(["src", "dst"])
        edges, pooled = _infer(options, view, prior, tf_cols, samples, report, log)

    networks = build_celltype_networks(edges, view.cell_types, report, empty_celltype=options.empty_celltype,
                                       pooled=pooled)
    if len(networks.src):  # regulons = the cell-type GRNs' edges pooled, so every regulon edge is in some GRN
        regulon_edges = pd.DataFrame({"src": networks.src, "dst": networks.dst,
                                      "weight": networks.weight.astype(np.float64), "sign": networks.sign})
    else:  # a store without cell types (or --empty-celltype allow with nothing inferred)
        regulon_edges = pooled if pooled is not None else edges
        report.warn("regulons_from_pooled_network", 1, "no cell-type GRN has an edge: regulons come from the pooled "
                    "network")
    regulons = build_regulons(regulon_edges, view.genes, report, min_regulon_size=options.min_regulon_size)
    tf_mask = np.zeros(view.n_genes, bool)
    tf_mask[regulons.tf] = True
    tf_mask[np.unique(networks.src)] = True
    if tf_cols is not None:
        tf_mask[tf_cols] = True

    assets = grn_assets.GRNAssets.empty(view.genes, view.cell_types)
    assets.tf_mask = tf_mask
    assets.regulon_names, assets.regulon_tf, assets.regulon_indptr = regulons.names, regulons.tf, regulons.indptr
    assets.regulon_target, assets.regulon_weight, assets.regulon_sign = regulons.target, regulons.weight, regulons.sign
    assets.celltype_indptr, assets.celltype_src, assets.celltype_dst = networks.indptr, networks.src, networks.dst
    assets.celltype_weight, assets.celltype_sign = networks.weight, networks.sign

    if options.coexpr:
        t0 = time.time()
        normed = {code: normalize_log1p(m) for code, m in samples.items()}
        names = {i: n for i, n in enumerate(view.cell_types)}
        graph = coexpression_graph(normed, view.n_genes, report, top_k=options.coexpr_top_k,
                                   min_corr=options.coexpr_min_corr, min_cells=options.coexpr_min_cells, names=names)
        assets.coexpr_indptr = graph.indptr.astype(np.int64)
        assets.coexpr_indices = graph.indices.astype(np.int32)
        assets.coexpr_data = graph.data.astype(np.float32)
        log(f"co-expression graph: {graph.nnz} links ({time.time() - t0:.1f}s)")

    cell_stats = score_store(view, assets, options, report, log)
    summary = celltype_summary(assets)
    log(format_summary(summary))
    info = {
        "sources": sources,
        "options": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                    for k, v in dataclasses.asdict(options).items()},
        "n_regulons": assets.n_regulons, "n_tfs": int(tf_mask.sum()),
        "report": report.as_dict(), "summary": summary, "cell_specific": cell_stats,
        "coexpr": {"n_links": int(len(assets.coexpr_indices)), "top_k": options.coexpr_top_k,
                   "min_corr": options.coexpr_min_corr} if options.coexpr else None,
        "build_seconds": round(time.time() - t_start, 2),
    }
    assets.attrs = {"build": {"sources": [s["path"] for s in sources], "seed": options.seed}}
    grn_assets.write_grn_assets(view.root, assets, manifest_info=info)
    for line in report.warnings:
        log(line)
    log(f"GRN assets written to {view.root / grn_assets.GRN_DIR} ({info['build_seconds']}s): {assets.n_regulons} "
        f"regulons, {len(assets.celltype_src)} cell-type edges, {len(assets.coexpr_indices)} co-expression links")
    return info


def score_store(view: StoreView, assets: grn_assets.GRNAssets, options: GRNBuildOptions, report: BuildReport,
                log) -> dict:
    """AUCell over every shard, thresholds, active-regulon bitsets; sets `assets.regulon_threshold`."""
    try:
        regulons = RegulonMatrix.from_assets(assets, weighted=options.aucell_weighted,
                                             auc_threshold=options.auc_threshold)
    except ValueError as exc:  # e.g. an auc_threshold that keeps no gene of a small store
        raise UserInputError(f"AUCell: {exc} (--auc-threshold)") from None
    n_cells, n_reg = view.n_cells, assets.n_regulons
    rng = np.random.default_rng(options.seed)
    n_sample = min(n_cells, options.max_threshold_cells)
    sample_idx = np.sort(rng.choice(n_cells, size=n_sample, replace=False)) if n_sample < n_cells \
        else np.arange(n_cells)
    sample = np.zeros((n_sample, n_reg), np.float32)
    t0 = time.time()
    offset = filled = 0
    for path in view.shard_paths():
        blocks = shard_row_blocks(path, options.block_size, view.n_genes)  # workers read their own rows
        auc = list(aucell_stream(blocks, regulons, seed=options.seed, n_workers=options.n_workers))
        auc = np.concatenate(auc) if auc else np.zeros((0, n_reg), np.float32)
        grn_assets.write_shard_regulon_activity(path, auc, None, assets.regulon_names)
        lo, hi = np.searchsorted(sample_idx, [offset, offset + auc.shape[0]])
        sample[filled:filled + hi - lo] = auc[sample_idx[lo:hi] - offset]
        filled += hi - lo
        offset += auc.shape[0]
    secs = time.time() - t0
    log(f"AUCell: {n_cells} cells × {n_reg} regulons in {secs:.1f}s ({n_cells / max(secs, 1e-9):.0f} cells/s, "
        f"{options.n_workers} workers)")
    thresholds = derive_thresholds(sample, list(assets.regulon_names), method=options.threshold_method,
                                   seed=options.seed, overrides=options.threshold_overrides)
    assets.regulon_threshold = np.array([t.value for t in thresholds], np.float32)
    methods = pd.Series([t.method for t in thresholds]).value_counts().to_dict()
    never = int((sample > assets.regulon_threshold[None, :]).sum(axis=0).__eq__(0).sum())
    report.warn("regulons_never_active", never, f"{never} regulons are active in no sampled cell (AUC never above "
                "their threshold)")
    n_active = []
    for path in view.shard_paths():
        auc = grn_assets.read_shard_aucell(path).to_numpy(np.float32)
        active = auc > assets.regulon_threshold[None, :]
        grn_assets.write_shard_regulon_activity(path, None, active, assets.regulon_names)
        n_active.append(active.sum(axis=1))
    n_active = np.concatenate(n_active) if n_active else np.zeros(0)
    no_active = int((n_active == 0).sum())
    report.warn("cells_without_active_regulon", no_active, f"{no_active} of {n_cells} cells have no active regulon "
                "(their cell-specific GRN is empty)")
    # Edges of a typical cell-specific GRN, on up to 200 cells of the threshold sample.
    k = min(200, n_sample)
    sizes = [len(assets.cell_edges(row > assets.regulon_threshold)[0]) for row in sample[:k]]
    return {"aucell_seconds": round(secs, 2), "aucell_cells_per_s": round(n_cells / max(secs, 1e-9), 1),
            "auc_threshold": options.auc_threshold, "weighted": options.aucell_weighted, "seed": options.seed,
            "threshold_methods": methods, "threshold_sample_cells": int(n_sample),
            "mean_active_regulons": float(n_active.mean()) if n_active.size else 0.0,
            "cells_without_active_regulon": no_active,
            "mean_cell_grn_edges": float(np.mean(sizes)) if sizes else 0.0}
