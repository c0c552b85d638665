"""From edge tables (gene names) to store-indexed networks: mapping, merging, regulons, cell-type CSR.

Rules (each drop is counted in the `BuildReport` and printed as one warning line):
* TF and target names map to store gene columns with the store's `GeneMatcher` (the data-prep matching rules).
  Edges whose TF or target is not in the store are dropped; no edge left at all is an error.
* Self-loops (TF == target after mapping) are dropped: autoregulation is not an edge of the token graph.
* Duplicate edges (same cell type, TF and target — e.g. one TF → gene link through several SCENIC+ regions or
  motifs) are merged into one edge with the largest weight and the sign of that strongest row; sign disagreements
  are counted.
* Regulons are per (TF, sign) over all cell types, named `TF(+)` / `TF(-)` as pySCENIC names them; a regulon with
  fewer than `min_regulon_size` targets is dropped (counted); none left is an error.
* Cell types: a table without a cell_type column gives every store cell type the same network. Table cell types the
  store does not have are dropped (counted; none matching is an error). A store cell type left with no edge follows
  `empty_celltype`: "error" (default), "global" (it gets the union network of the table, counted) or "allow".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import UserInputError

EMPTY_CELLTYPE_POLICIES = ("error", "global", "allow")


@dataclasses.dataclass
class BuildReport:
    """Counters and one-line warnings collected while building GRN assets (stored in the manifest)."""

    counts: dict = dataclasses.field(default_factory=dict)
    warnings: list = dataclasses.field(default_factory=list)

    def add(self, key: str, n: int) -> None:
        self.counts[key] = int(self.counts.get(key, 0)) + int(n)

    def warn(self, key: str, n: int, message: str) -> None:
        """Count `n` under `key` and, when n > 0, keep the warning line."""
        self.add(key, n)
        if n:
            self.warnings.append(f"warning: {message}")

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "warnings": list(self.warnings)}


def _examples(names: Sequence[str], k: int = 5) -> str:
    names = sorted(set(map(str, names)))
    return ", ".join(names[:k]) + (f" … (+{len(names) - k})" if len(names) > k else "")


def map_edges(table: pd.DataFrame, matcher, report: BuildReport, *, what: str = "table") -> pd.DataFrame:
    """Map an edge table's names to store columns; returns columns src, dst (int32), weight, sign, cell_type.

    `matcher` is the store's `GeneMatcher` (anything with `.columns(names) -> int array, -1 = absent`).
    """
    source = table.attrs.get("source", what)
    report.add("edges_read", len(table))
    report.warn("rows_missing_name", table.attrs.get("n_rows_missing_name", 0),
                f"{source}: {table.attrs.get('n_rows_missing_name', 0)} rows without a TF or target name skipped")
    tf_names = pd.unique(table["tf"])
    tg_names = pd.unique(table["target"])
    tf_col = dict(zip(tf_names, matcher.columns(tf_names)))
    tg_col = dict(zip(tg_names, matcher.columns(tg_names)))
    src = table["tf"].map(tf_col).to_numpy(np.int64)
    dst = table["target"].map(tg_col).to_numpy(np.int64)
    bad_tf = [n for n, c in tf_col.items() if c < 0]
    if bad_tf:
        report.warn("tfs_not_in_store", len(bad_tf), f"{source}: {len(bad_tf)} of {len(tf_names)} TFs are not store "
                    f"genes ({_examples(bad_tf)}); their {int((src < 0).sum())} edges dropped")
    report.add("edges_unmapped_tf", int((src < 0).sum()))
    bad_tg = [n for n, c in tg_col.items() if c < 0]
    only_target_bad = (src >= 0) & (dst < 0)
    if bad_tg:
        report.warn("targets_not_in_store", len(bad_tg), f"{source}: {len(bad_tg)} of {len(tg_names)} target genes "
                    f"are not store genes ({_examples(bad_tg)}); {int(only_target_bad.sum())} more edges dropped")
    report.add("edges_unmapped_target", int(only_target_bad.sum()))
    # TFs all of whose targets are unmapped: their regulon would be empty.
    mapped_tf = src >= 0
    tf_with_target = set(table["tf"][mapped_tf & (dst >= 0)])
    orphan = [n for n in pd.unique(table["tf"][mapped_tf]) if n not in tf_with_target]
    report.warn("regulons_without_mapped_target", len(orphan), f"{source}: {len(orphan)} TFs have no target in the "
                f"store ({_examples(orphan)}); no regulon for them")
    keep = (src >= 0) & (dst >= 0)
    if not keep.any():
        raise UserInputError(f"no TF–target edge maps to the store's genes ({len(bad_tf)} TFs and {len(bad_tg)} "
                             f"targets unknown, e.g. {_examples(list(bad_tf) + list(bad_tg), 3)}); check the gene "
                             f"naming (--match-by symbol|gene_id) and the organism", path=source)
    cell_type = table["cell_type"] if "cell_type" in table and table["cell_type"].notna().any() else None
    out = pd.DataFrame({
        "src": src[keep].astype(np.int32), "dst": dst[keep].astype(np.int32),
        "weight": table["weight"].to_numpy(np.float64)[keep], "sign": table["sign"].to_numpy(np.int8)[keep],
        "cell_type": cell_type.to_numpy(object)[keep] if cell_type is not None else None,
    })
    out.attrs["source"] = source
    return merge_edges(out, report, source=source)


def merge_edges(edges: pd.DataFrame, report: BuildReport, *, source: str = "table") -> pd.DataFrame:
    """Drop self-loops; merge duplicate (cell_type, src, dst) edges keeping the strongest row (counted)."""
    loops = edges["src"].to_numpy() == edges["dst"].to_numpy()
    report.warn("self_loops_dropped", int(loops.sum()), f"{source}: {int(loops.sum())} self-loops (TF regulating "
                f"itself) dropped")
    edges = edges.loc[~loops]
    keys = ["cell_type", "src", "dst"] if edges["cell_type"].notna().any() else ["src", "dst"]
    ordered = edges.sort_values("weight", ascending=False, kind="stable")
    dup = ordered.duplicated(keys, keep="first")
    if dup.any():
        n_signs = ordered.groupby(keys, sort=False)["sign"].nunique()
        report.warn("duplicate_edges_merged", int(dup.sum()), f"{source}: {int(dup.sum())} duplicate edges merged "
                    f"(kept the largest weight)")
        report.warn("sign_conflicts", int((n_signs > 1).sum()), f"{source}: {int((n_signs > 1).sum())} TF–target "
                    f"pairs listed with both signs; kept the sign of the strongest row")
    merged = ordered.loc[~dup].sort_values(keys, kind="stable").reset_index(drop=True)
    merged.attrs["source"] = source
    return merged


@dataclasses.dataclass
class Regulons:
    names: np.ndarray  # (R,) str
    tf: np.ndarray  # (R,) int32
    indptr: np.ndarray  # (R+1,) int64
    target: np.ndarray  # (E,) int32
    weight: np.ndarray  # (E,) float32
    sign: np.ndarray  # (E,) int8


def build_regulons(edges: pd.DataFrame, genes: Sequence[str], report: BuildReport, *,
                   min_regulon_size: int = 1) -> Regulons:
    """Regulons per (TF, sign) from store-indexed edges (all cell types pooled; a pair keeps its largest weight)."""
    pooled = (edges.sort_values("weight", ascending=False, kind="stable")
              .drop_duplicates(["src", "dst", "sign"]))
    # Positive regulons first within a TF, then by TF name for stable, readable names.
    pooled = pooled.assign(_name=np.asarray(genes, dtype=object)[pooled["src"].to_numpy()],
                           _neg=pooled["sign"].to_numpy() < 0)
    pooled = pooled.sort_values(["_name", "_neg", "dst"], kind="stable")
    groups = pooled.groupby(["_name", "_neg"], sort=False)
    sizes = groups.size()
    small = sizes[sizes < min_regulon_size]
    report.warn("regulons_too_small", len(small), f"{len(small)} regulons have fewer than {min_regulon_size} targets "
                "(--min-regulon-size) and are dropped "
                f"({_examples([f'{t}({chr(45) if n else chr(43)})' for t, n in small.index])})")
    big = sizes[sizes >= min_regulon_size]
    if big.empty:
        raise UserInputError(f"no regulon has at least {min_regulon_size} targets in the store (largest: "
                             f"{int(sizes.max()) if len(sizes) else 0}); lower --min-regulon-size")
    pooled = pooled.set_index(["_name", "_neg"]).loc[big.index].reset_index()
    names = np.array([f"{tf}({'-' if neg else '+'})" for tf, neg in big.index], dtype=str)
    counts = big.to_numpy()
    indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
    tf = pooled["src"].to_numpy(np.int32)[indptr[:-1]]
    return Regulons(names=names, tf=tf, indptr=indptr, target=pooled["dst"].to_numpy(np.int32),
                    weight=pooled["weight"].to_numpy(np.float32), sign=pooled["sign"].to_numpy(np.int8))


@dataclasses.dataclass
class CellTypeNetworks:
    names: np.ndarray  # (C,) str (store order)
    indptr: np.ndarray  # (C+1,) int64
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    sign: np.ndarray


def build_celltype_networks(edges: pd.DataFrame, celltype_names: Sequence[str], report: BuildReport, *,
                            empty_celltype: str = "error", pooled: pd.DataFrame | None = None) -> CellTypeNetworks:
    """Cell-type CSR in the store's cell-type order (see the module docstring for the rules).

    `pooled`: the network an empty cell type gets under `empty_celltype="global"` (default: the union of `edges`;
    `--infer` passes the network inferred on all cells pooled).
    """
    if empty_celltype not in EMPTY_CELLTYPE_POLICIES:
        raise UserInputError(f"empty-celltype policy must be one of {EMPTY_CELLTYPE_POLICIES}, got {empty_celltype!r}")
    celltype_names = [str(c) for c in celltype_names]
    source = edges.attrs.get("source", "table")
    per_type = "cell_type" in edges and edges["cell_type"].notna().any()
    if per_type:
        known = set(celltype_names)
        table_types = pd.unique(edges["cell_type"].astype(str))
        unknown = [t for t in table_types if t not in known]
        n_unknown_edges = int(edges["cell_type"].astype(str).isin(unknown).sum())
        report.warn("celltypes_not_in_store", len(unknown), f"{source}: {len(unknown)} cell types are not in the store "
                    f"({_examples(unknown)}); their {n_unknown_edges} edges dropped (store cell types: "
                    f"{_examples(celltype_names, 4)})")
        if len(unknown) == len(table_types):
            raise UserInputError(f"none of the table's cell types ({_examples(table_types, 3)}) is a store cell type "
                                 f"({_examples(celltype_names, 3)})", path=source)
        edges = edges[~edges["cell_type"].astype(str).isin(unknown)]
    global_net = (edges if pooled is None else pooled).sort_values("weight", ascending=False, kind="stable")
    global_net = global_net.drop_duplicates(["src", "dst"]).sort_values(["src", "dst"])
    parts, empty = [], []
    for name in celltype_names:
        sub = edges[edges["cell_type"].astype(str) == name] if per_type else edges
        sub = sub.sort_values("weight", ascending=False, kind="stable").drop_duplicates(["src", "dst"])
        if sub.empty:
            empty.append(name)
            if empty_celltype == "global":
                sub = global_net
        parts.append(sub.sort_values(["src", "dst"], kind="stable"))
    if empty:
        if empty_celltype == "error":
            raise UserInputError(f"{len(empty)} store cell types would have an empty GRN ({_examples(empty)}); give "
                                 f"them edges, or pass --empty-celltype global (use the pooled network) or allow",
                                 path=source)
        verb = "get the pooled network" if empty_celltype == "global" else "keep an EMPTY GRN (--empty-celltype allow)"
        report.warn("celltypes_empty", len(empty), f"{len(empty)} store cell types have no edge of their own "
                    f"({_examples(empty)}) and {verb}")
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    cat = pd.concat(parts, ignore_index=True) if parts else edges.iloc[:0]
    return CellTypeNetworks(
        names=np.array(celltype_names, dtype=str), indptr=np.r_[0, np.cumsum(counts)].astype(np.int64),
        src=cat["src"].to_numpy(np.int32), dst=cat["dst"].to_numpy(np.int32),
        weight=cat["weight"].to_numpy(np.float32), sign=cat["sign"].to_numpy(np.int8))
