"""GRN assets for the demo store (pbmc68k_reduced, human PBMCs) — built from packaged data only, no download.

Recipe (`python data_prep/build_grn.py --store STORE --demo` runs the same):
* prior: Pathway Commons "controls-expression-of" (human), shipped by `priori-regulon-enrichment` (see priors.py);
* `--infer` correlation: per cell type keep the prior edges whose regulator and target are expressed in ≥ 5 % of the
  type's cells and have |Pearson r| ≥ 0.1 on log1p-normalised expression;
* cell types left with no edge use the pooled network (`--empty-celltype global`, counted in the manifest);
* regulons of ≥ 3 targets; AUCell with pySCENIC's defaults (auc_threshold 0.05, seed 0); co-expression with
  build_grn.py's defaults (top-10 partners, r ≥ 0.3).
"""
from __future__ import annotations

from typing import Callable

from . import assets as grn_assets

DEMO_OPTIONS = dict(builtin_prior=True, infer=True, infer_method="correlation", empty_celltype="global",
                    min_regulon_size=3, min_abs_corr=0.1, min_expr_frac=0.05, seed=0)


def demo_grn_complete(store) -> bool:
    """True when the store has GRN assets recorded in its manifest and every shard has its active-regulon bitset."""
    import zarr

    from ..store import open_store

    if not grn_assets.has_grn_assets(store):
        return False
    opened = open_store(grn_assets.store_root(store))
    if "grn" not in opened.assets:
        return False
    for path in opened.shard_paths:
        group = zarr.open_group(str(path), mode="r")
        if "obsm" not in group or grn_assets.ACTIVE_KEY not in group["obsm"]:
            return False
    return True


def ensure_demo_grn(store, *, force: bool = False, n_workers: int = 1, log: Callable[[str], None] = print):
    """Build the demo GRN assets once (idempotent, seeded) and return `read_grn_assets(store)`."""
    from .build import GRNBuildOptions, build_grn

    if force or not demo_grn_complete(store):
        # overwrite: what is there is incomplete (or `force`)
        build_grn(store, GRNBuildOptions(**DEMO_OPTIONS, n_workers=n_workers), log=log, overwrite=True)
    return grn_assets.read_grn_assets(store)
