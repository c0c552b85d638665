"""A random-GRN control with the real GRN's degrees: the ablation's "random GRN" arm.

`shuffled_assets` keeps every TF, every regulon, every cell-type network and every node's number of edges, and
redraws which gene each edge points to: the targets of all regulon edges are permuted among those edges, and, per
cell type, the targets of its network's edges among that network's edges (a degree-preserving shuffle: each TF's
out-degree and each target's in-degree are unchanged; a TF may meet the same target twice, as in the configuration
model). Regulon activity per cell (AUCell on the real regulons) and the co-expression graph are kept, so the arm
differs from the real GRN only in which genes are wired to which.

`random_grn_store` writes a store view with those assets: the shards are shared (symlinked), `grn/` and the
manifest are its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .assets import GRNAssets, read_grn_assets, write_grn_assets


def shuffled_assets(assets: GRNAssets, seed: int = 0) -> GRNAssets:
    """A copy of `assets` with regulon targets and each cell type's edge targets permuted (module docstring)."""
    rng = np.random.default_rng(seed)
    regulon_target = rng.permutation(assets.regulon_target)
    celltype_dst = assets.celltype_dst.copy()
    for c in range(assets.n_celltypes):
        lo, hi = int(assets.celltype_indptr[c]), int(assets.celltype_indptr[c + 1])
        celltype_dst[lo:hi] = rng.permutation(celltype_dst[lo:hi])
    attrs = {**assets.attrs, "shuffled_from_real_grn": True, "shuffle_seed": int(seed)}
    return dataclasses.replace(assets, regulon_target=regulon_target, celltype_dst=celltype_dst, attrs=attrs)


def random_grn_store(store: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> Path:
    """A view of `store` at `out` whose GRN assets are `shuffled_assets` (shards symlinked; replaced if present)."""
    src, out = Path(store).resolve(), Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name in ("grn", "manifest.json", "_work") or entry.name.startswith("."):
            continue
        if entry.is_dir():
            os.symlink(entry, out / entry.name)
        else:
            shutil.copy2(entry, out / entry.name)
    manifest = json.loads((src / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    info = dict((manifest.get("assets") or {}).get("grn") or {})
    info.update(shuffled_from=str(src), shuffle_seed=int(seed))
    write_grn_assets(out, shuffled_assets(read_grn_assets(src), seed), manifest_info=info)
    return out
