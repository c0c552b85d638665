"""GRN assets in the store: `STORE/grn/` (zarr v3 group of plain arrays) and per-shard `obsm` (docs/design.md
section 2).

Everything refers to genes by **store gene column** `j ∈ [0, G)`, never by token id.

    grn/genes                       (G,)    str      store gene symbols, to check the assets match the store's var
    grn/tf_mask                     (G,)    bool     gene is the TF of at least one regulon / a listed TF
    grn/regulons/{names,tf,threshold}   (R,) str / int32 / float32 (NaN = no threshold yet)
    grn/regulons/indptr             (R+1,)  int64    CSR over regulons
    grn/regulons/{target,weight,sign}   (E_r,) int32 / float32 / int8
    grn/celltype/names              (C,)    str      same order as the manifest's `cell_types`
    grn/celltype/indptr             (C+1,)  int64
    grn/celltype/{src,dst,weight,sign}  (E_c,) int32 / int32 / float32 / int8
    grn/coexpr/{indptr,indices,data}    (G+1,) int64, (E_x,) int32, (E_x,) float32   gene × gene CSR

Per shard (AnnData zarr): `obsm["aucell"]` DataFrame (cells × R, columns = regulon names, float32) and
`obsm["active_regulons"]` uint8 (cells × ceil(R/8)) = `np.packbits(active, axis=1, bitorder="little")`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

GRN_SCHEMA_VERSION = 1
GRN_DIR = "grn"
AUCELL_KEY = "aucell"
ACTIVE_KEY = "active_regulons"


def _empty(dtype) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


@dataclasses.dataclass
class GRNAssets:
    """All GRN arrays of a store, as numpy arrays (shapes in the module docstring)."""

    genes: np.ndarray  # (G,) str
    tf_mask: np.ndarray  # (G,) bool
    regulon_names: np.ndarray  # (R,) str
    regulon_tf: np.ndarray  # (R,) int32
    regulon_indptr: np.ndarray  # (R+1,) int64
    regulon_target: np.ndarray  # (E_r,) int32
    regulon_weight: np.ndarray  # (E_r,) float32
    regulon_sign: np.ndarray  # (E_r,) int8
    celltype_names: np.ndarray  # (C,) str
    celltype_indptr: np.ndarray  # (C+1,) int64
    celltype_src: np.ndarray  # (E_c,) int32
    celltype_dst: np.ndarray  # (E_c,) int32
    celltype_weight: np.ndarray  # (E_c,) float32
    celltype_sign: np.ndarray  # (E_c,) int8
    coexpr_indptr: np.ndarray  # (G+1,) int64
    coexpr_indices: np.ndarray  # (E_x,) int32
    coexpr_data: np.ndarray  # (E_x,) float32
    regulon_threshold: np.ndarray | None = None  # (R,) float32, NaN where unknown
    attrs: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def empty(cls, genes, celltype_names=()) -> "GRNAssets":
        """Assets with no edges for `genes` (G,) and `celltype_names` (C,); fill the parts you need."""
        genes = np.asarray(list(genes), dtype=object).astype(str)
        n_genes, n_types = len(genes), len(celltype_names)
        return cls(
            genes=genes, tf_mask=np.zeros(n_genes, bool),
            regulon_names=np.zeros(0, dtype=str), regulon_tf=_empty(np.int32),
            regulon_indptr=np.zeros(1, np.int64), regulon_target=_empty(np.int32),
            regulon_weight=_empty(np.float32), regulon_sign=_empty(np.int8),
            celltype_names=np.asarray(list(celltype_names), dtype=object).astype(str),
            celltype_indptr=np.zeros(n_types + 1, np.int64), celltype_src=_empty(np.int32),
            celltype_dst=_empty(np.int32), celltype_weight=_empty(np.float32), celltype_sign=_empty(np.int8),
            coexpr_indptr=np.zeros(n_genes + 1, np.int64), coexpr_indices=_empty(np.int32),
            coexpr_data=_empty(np.float32),
        )

    # ------------------------------------------------------------------ sizes
    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_regulons(self) -> int:
        return len(self.regulon_names)

    @property
    def n_celltypes(self) -> int:
        return len(self.celltype_names)

    # ------------------------------------------------------------------ edge access
    def regulon_edges(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, weight, sign) of regulon `r`; src is the regulon's TF repeated."""
        lo, hi = int(self.regulon_indptr[r]), int(self.regulon_indptr[r + 1])
        dst = self.regulon_target[lo:hi]
        return (np.full(hi - lo, self.regulon_tf[r], np.int32), dst, self.regulon_weight[lo:hi],
                self.regulon_sign[lo:hi])

    def celltype_edges(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(src, dst, weight, sign) of cell type `c`'s GRN (store gene columns, TF → target)."""
        lo, hi = int(self.celltype_indptr[c]), int(self.celltype_indptr[c + 1])
        return (self.celltype_src[lo:hi], self.celltype_dst[lo:hi], self.celltype_weight[lo:hi],
                self.celltype_sign[lo:hi])

    def cell_edges(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cell-specific GRN: union of the edges of the active regulons.

        `active`: (R,) bool mask or integer regulon ids. An edge present in several active regulons (e.g. TF(+) and a
        second source for the same TF) is kept once, with the largest |weight|. Returns (src, dst, weight, sign)
        sorted by (src, dst).
        """
        active = np.asarray(active)
        ids = np.flatnonzero(active) if active.dtype == bool else active.astype(np.int64)
        if ids.size == 0:
            return _empty(np.int32), _empty(np.int32), _empty(np.float32), _empty(np.int8)
        lo, hi = self.regulon_indptr[ids], self.regulon_indptr[ids + 1]
        lengths = hi - lo
        # Gather the CSR slices of all active regulons without a Python loop over edges.
        pos = np.repeat(lo - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
        src = np.repeat(self.regulon_tf[ids], lengths).astype(np.int32)
        dst, w, s = self.regulon_target[pos], self.regulon_weight[pos], self.regulon_sign[pos]
        key = src.astype(np.int64) * self.n_genes + dst
        order = np.lexsort((-np.abs(w), key))  # per (src, dst): strongest first
        key, src, dst, w, s = key[order], src[order], dst[order], w[order], s[order]
        first = np.r_[True, key[1:] != key[:-1]]
        return src[first], dst[first], w[first], s[first]

    def coexpr_csr(self):
        """The co-expression graph as a scipy CSR matrix (G × G, float32 weights)."""
        import scipy.sparse as sp

        return sp.csr_matrix((self.coexpr_data, self.coexpr_indices, self.coexpr_indptr),
                             shape=(self.n_genes, self.n_genes))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError when arrays disagree in shape or refer to genes / edges out of range."""
        n_genes, n_reg, n_types = self.n_genes, self.n_regulons, self.n_celltypes
        _check(self.tf_mask.shape == (n_genes,), "tf_mask must have shape (G,)")
        _check(self.regulon_tf.shape == (n_reg,), "regulon_tf must have shape (R,)")
        _check_csr(self.regulon_indptr, n_reg, len(self.regulon_target), "regulons")
        _check(len(self.regulon_weight) == len(self.regulon_sign) == len(self.regulon_target),
               "regulon edge arrays differ in length")
        _check_csr(self.celltype_indptr, n_types, len(self.celltype_src), "celltype")
        _check(len(self.celltype_dst) == len(self.celltype_weight) == len(self.celltype_sign) == len(self.celltype_src),
               "celltype edge arrays differ in length")
        _check_csr(self.coexpr_indptr, n_genes, len(self.coexpr_indices), "coexpr")
        _check(len(self.coexpr_data) == len(self.coexpr_indices), "coexpr data/indices differ in length")
        for name, arr in (("regulon_tf", self.regulon_tf), ("regulon_target", self.regulon_target),
                          ("celltype_src", self.celltype_src), ("celltype_dst", self.celltype_dst),
                          ("coexpr_indices", self.coexpr_indices)):
            _check(arr.size == 0 or (arr.min() >= 0 and arr.max() < n_genes), f"{name} has gene columns outside [0, G)")
        for name, arr in (("regulon_sign", self.regulon_sign), ("celltype_sign", self.celltype_sign)):
            _check(np.isin(arr, (-1, 1)).all(), f"{name} must be -1 or +1")
        _check(len(set(self.regulon_names.tolist())) == n_reg, "regulon names must be unique")
        if self.regulon_threshold is not None:
            _check(self.regulon_threshold.shape == (n_reg,), "regulon_threshold must have shape (R,)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"GRN assets: {message}")


def _check_csr(indptr: np.ndarray, n_rows: int, n_entries: int, name: str) -> None:
    _check(indptr.shape == (n_rows + 1,), f"{name} indptr must have {n_rows + 1} entries")
    _check(indptr[0] == 0 and indptr[-1] == n_entries and bool(np.all(np.diff(indptr) >= 0)),
           f"{name} indptr must start at 0, be non-decreasing and end at the number of edges")


# ---------------------------------------------------------------------- store paths
def store_root(store: Any) -> Path:
    """The store folder from a path or a store object (anything with `.root` or `.path`)."""
    for attr in ("root", "path"):
        if hasattr(store, attr) and not isinstance(store, (str, os.PathLike)):
            return Path(getattr(store, attr))
    return Path(store)


_LAYOUT = {  # GRNAssets field -> (zarr path, dtype)
    "genes": ("genes", str), "tf_mask": ("tf_mask", bool),
    "regulon_names": ("regulons/names", str), "regulon_tf": ("regulons/tf", np.int32),
    "regulon_indptr": ("regulons/indptr", np.int64), "regulon_target": ("regulons/target", np.int32),
    "regulon_weight": ("regulons/weight", np.float32), "regulon_sign": ("regulons/sign", np.int8),
    "regulon_threshold": ("regulons/threshold", np.float32),
    "celltype_names": ("celltype/names", str), "celltype_indptr": ("celltype/indptr", np.int64),
    "celltype_src": ("celltype/src", np.int32), "celltype_dst": ("celltype/dst", np.int32),
    "celltype_weight": ("celltype/weight", np.float32), "celltype_sign": ("celltype/sign", np.int8),
    "coexpr_indptr": ("coexpr/indptr", np.int64), "coexpr_indices": ("coexpr/indices", np.int32),
    "coexpr_data": ("coexpr/data", np.float32),
}


def _as_dtype(value: np.ndarray, dtype) -> np.ndarray:
    if dtype is str:
        return np.asarray([str(v) for v in value], dtype=str) if len(value) else np.zeros(0, dtype=str)
    return np.ascontiguousarray(value, dtype=dtype)


def write_grn_assets(store: Any, assets: GRNAssets, *, manifest_info: Mapping[str, Any] | None = None,
                     update_manifest: bool = True) -> Path:
    """Write `assets` to `STORE/grn/` (replacing what was there) and record `assets.grn` in the manifest.

    The group is written to `STORE/_work/grn.tmp` and renamed into place so a reader never sees half of it.
    `manifest_info` (counts, sources, thresholds used, summary) is merged into the manifest's `assets.grn` together
    with `schema_version`; the manifest is rewritten with the store's atomic update. Returns the group path.
    """
    import shutil

    import zarr

    assets.validate()
    root = store_root(store)
    _check_matches_store(root, assets)
    threshold = assets.regulon_threshold
    if threshold is None:
        threshold = np.full(assets.n_regulons, np.nan, np.float32)
    tmp = root / "_work" / "grn.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for field, (path, dtype) in _LAYOUT.items():
        value = threshold if field == "regulon_threshold" else getattr(assets, field)
        value = _as_dtype(value, dtype)
        # An explicit chunk size: zarr's default would split small arrays into many tiny files.
        group.create_array(path, shape=value.shape, dtype=value.dtype if dtype is not str else str,
                           chunks=(max(1, min(len(value), 1 << 20)),), fill_value=None if dtype is str else 0)
        if len(value):
            group[path][:] = value
    attrs = {"format": "grnformer_ds.grn", "schema_version": GRN_SCHEMA_VERSION,
             "n_genes": assets.n_genes, "n_regulons": assets.n_regulons, "n_celltypes": assets.n_celltypes,
             "n_regulon_edges": int(len(assets.regulon_target)), "n_celltype_edges": int(len(assets.celltype_src)),
             "n_coexpr_edges": int(len(assets.coexpr_indices))}
    group.attrs.update({**assets.attrs, **attrs})
    final = root / GRN_DIR
    old = root / "_work" / "grn.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    try:  # leave no empty scratch folder behind (the store's finalize removed it before us)
        tmp.parent.rmdir()
    except OSError:
        pass
    if update_manifest:
        info = {**attrs, **dict(manifest_info or {})}
        info.pop("format", None)
        _update_manifest(root, info)
    return final


def _update_manifest(root: Path, info: dict) -> None:
    from ..store.manifest import update_manifest_assets  # the store's atomic manifest rewrite

    update_manifest_assets(root, "grn", info)


def _check_matches_store(root: Path, assets: GRNAssets) -> None:
    """The assets must be built for this store's genes and cell types (same order)."""
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        return
    import json

    manifest = json.loads(manifest_path.read_text())
    n_genes = manifest.get("n_genes")
    if n_genes is not None and int(n_genes) != assets.n_genes:
        raise ValueError(f"GRN assets have {assets.n_genes} genes but the store at {root} has {n_genes}")
    cell_types = manifest.get("cell_types")
    if cell_types is not None and assets.n_celltypes and list(cell_types) != assets.celltype_names.tolist():
        raise ValueError(f"GRN assets' cell types {assets.celltype_names.tolist()[:5]}… differ from the store's "
                         f"manifest cell_types {list(cell_types)[:5]}…")


def has_grn_assets(store: Any) -> bool:
    """True when `STORE/grn/` exists and was written completely."""
    return (store_root(store) / GRN_DIR / "zarr.json").exists()


def read_grn_assets(store: Any) -> GRNAssets:
    """Read `STORE/grn/` into numpy arrays. Raises UserInputError when the store has no GRN assets."""
    import zarr

    from grnformer_ds.errors import UserInputError

    root = store_root(store)
    path = root / GRN_DIR
    if not has_grn_assets(root):
        raise UserInputError("the store has no GRN assets; build them with `python data_prep/build_grn.py "
                             f"--store {root} ...` (or --demo)", path=str(root))
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    version = group.attrs.get("schema_version")
    if version != GRN_SCHEMA_VERSION:
        raise UserInputError(f"GRN assets have schema_version {version}, this code reads {GRN_SCHEMA_VERSION}",
                             path=str(path))
    values = {}
    for field, (zpath, dtype) in _LAYOUT.items():
        arr = group[zpath][:] if group[zpath].shape[0] else np.zeros(0, dtype=dtype)
        # zarr returns numpy's variable-width StringDType; go through object to get plain fixed-width str arrays.
        values[field] = np.asarray(arr.astype(object), dtype=str) if dtype is str else np.asarray(arr, dtype=dtype)
    attrs = dict(group.attrs)
    return GRNAssets(**values, attrs=attrs)


# ---------------------------------------------------------------------- per-shard obsm
def pack_active(active: np.ndarray) -> np.ndarray:
    """(n, R) bool → (n, ceil(R/8)) uint8 bitset, little bit order (regulon r is bit r % 8 of byte r // 8)."""
    return np.packbits(np.asarray(active, dtype=bool), axis=1, bitorder="little")


def unpack_active(bits: np.ndarray, n_regulons: int) -> np.ndarray:
    """Inverse of `pack_active`: (n, ceil(R/8)) uint8 → (n, R) bool."""
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), axis=1, count=n_regulons, bitorder="little").astype(bool)


def write_shard_regulon_activity(shard_path: str | os.PathLike, auc: np.ndarray | None, active: np.ndarray | None,
                                 regulon_names) -> None:
    """Write `obsm["aucell"]` (DataFrame, columns = regulon names) and/or `obsm["active_regulons"]` (bitset).

    `auc`: (n_cells, R) float or None (keep what is there); `active`: (n_cells, R) bool or None; rows in the shard's
    cell order. The builder writes the scores first and the bitset once the thresholds are known.
    """
    import anndata as ad
    import zarr

    # anndata refuses to edit a store through consolidated metadata: open the plain group, write, re-consolidate.
    group = zarr.open_group(str(shard_path), mode="r+", use_consolidated=False)
    was_consolidated = _has_consolidated(shard_path)
    obs_names = ad.io.read_elem(group["obs"]).index
    expected = (len(obs_names), len(regulon_names))
    for name, arr in (("AUCell matrix", auc), ("active regulons", active)):
        if arr is not None and np.shape(arr) != expected:
            raise ValueError(f"{shard_path}: {name} {np.shape(arr)} does not match {expected[0]} cells × "
                             f"{expected[1]} regulons")
    obsm = group["obsm"] if "obsm" in group else group.create_group("obsm")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):  # small arrays: no sharding codec
        _write_obsm(obsm, auc, active, obs_names, regulon_names)
    if was_consolidated:
        import warnings

        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": anndata reads it fine
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(shard_path))


def _write_obsm(obsm, auc, active, obs_names, regulon_names) -> None:
    import anndata as ad
    import pandas as pd

    if auc is not None:
        frame = pd.DataFrame(np.asarray(auc, dtype=np.float32), index=obs_names,
                             columns=pd.Index([str(n) for n in regulon_names], dtype=object))
        if AUCELL_KEY in obsm:
            del obsm[AUCELL_KEY]
        ad.io.write_elem(obsm, AUCELL_KEY, frame)
    if active is not None:
        if ACTIVE_KEY in obsm:
            del obsm[ACTIVE_KEY]
        ad.io.write_elem(obsm, ACTIVE_KEY, pack_active(active))


def _has_consolidated(shard_path) -> bool:
    """Whether the zarr v3 root metadata carries consolidated metadata (v2: a `.zmetadata` file)."""
    import json

    root_meta = Path(shard_path) / "zarr.json"
    if root_meta.exists():
        return json.loads(root_meta.read_text()).get("consolidated_metadata") is not None
    return (Path(shard_path) / ".zmetadata").exists()


def read_shard_active_regulons(shard_path: str | os.PathLike, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """The packed bitset `obsm["active_regulons"]` of a shard, (n, ceil(R/8)) uint8, optionally only `rows`.

    Unpack with `unpack_active(bits, R)`; reads just the requested rows from zarr.
    """
    import zarr

    arr = zarr.open_group(str(shard_path), mode="r")["obsm"][ACTIVE_KEY]
    if rows is None:
        return np.asarray(arr[:])
    if isinstance(rows, slice):
        return np.asarray(arr[rows])
    rows = np.asarray(rows)
    return np.asarray(arr.get_orthogonal_selection((rows, slice(None))))


def read_shard_aucell(shard_path: str | os.PathLike):
    """`obsm["aucell"]` of a shard as a pandas DataFrame (cells × regulon names)."""
    import anndata as ad
    import zarr

    return ad.io.read_elem(zarr.open_group(str(shard_path), mode="r")["obsm"][AUCELL_KEY])
