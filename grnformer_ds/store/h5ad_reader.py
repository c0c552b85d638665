"""Backed, block-wise reads of one .h5ad: the count matrix (X, a layer or raw.X) and the few obs/var columns we keep.

h5py reads only the requested row block of X (CSR: an indptr slice and one contiguous data/indices range; dense: a
row slab; CSC: a scan of the column arrays, see `read_rows`), so memory is bounded by the block, not the file.
obs/var columns are read one element at a time with `anndata.io.read_elem` (anndata's own decoder for categoricals,
string arrays and dataframes) instead of `anndata.read_h5ad(backed="r")`, which would load every obs column.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserInputError

# CSC inputs are scanned in pieces of this many stored entries (12 bytes each as float64 + int32 before filtering).
_CSC_SCAN_ENTRIES = 1 << 22


def _encoding(node) -> str:
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    return {"csr": "csr_matrix", "csc": "csc_matrix"}.get(enc, enc)


def _value_dtype(a: np.ndarray) -> np.ndarray:
    """Values as a native-endian numeric array the kernels accept (bool and float16 widened to float32)."""
    if a.dtype == np.bool_ or a.dtype == np.float16:
        return a.astype(np.float32)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


class H5adSource:
    """One input file, opened read-only. Use as a context manager or call `close()`.

    Args:
        path: the .h5ad file.
        layer: read counts from ``layers/<layer>`` instead of X.
        use_raw: read counts from ``raw/X`` (genes from ``raw/var``).
        gene_id_column: var column holding gene ids (e.g. ``gene_ids``); genes are then matched by id.
        read_genes: read the var table (gene symbols / ids). The scatter stage passes False: the plan already read
            and validated it, and decoding 20k+ gene names per row block cost ~10% of a build.
    """

    def __init__(self, path: str | Path, layer: str | None = None, use_raw: bool = False,
                 gene_id_column: str | None = None, read_genes: bool = True):
        self.path = str(path)
        if layer and use_raw:
            raise UserInputError("choose either a layer or raw.X, not both", path=self.path)
        if not Path(path).is_file():
            raise UserInputError("input file not found", path=self.path)
        try:
            self._f = h5py.File(path, "r")
        except OSError as exc:
            raise UserInputError(f"unreadable or truncated h5ad file ({exc})", path=self.path) from None
        try:
            self._init(layer, use_raw, gene_id_column, read_genes)
        except UserInputError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self.close()
            raise UserInputError(f"unreadable or truncated h5ad file ({exc.__class__.__name__}: {exc})",
                                 path=self.path) from None

    # -- layout -------------------------------------------------------------------------------------------------
    def _init(self, layer: str | None, use_raw: bool, gene_id_column: str | None, read_genes: bool = True) -> None:
        f = self._f
        if layer:
            if "layers" not in f or layer not in f["layers"]:
                have = sorted(f["layers"].keys()) if "layers" in f else []
                raise UserInputError(f"no layer {layer!r} (layers: {have})", path=self.path)
            self._x = f["layers"][layer]
            self.matrix_name = f"layers/{layer}"
            var_node = f["var"]
        elif use_raw:
            if "raw" not in f or "X" not in f["raw"]:
                raise UserInputError("no raw.X in this file", path=self.path)
            self._x = f["raw"]["X"]
            self.matrix_name = "raw.X"
            var_node = f["raw"]["var"]
        else:
            if "X" not in f:
                raise UserInputError("no X matrix in this file", path=self.path)
            self._x = f["X"]
            self.matrix_name = "X"
            var_node = f["var"]
        if "obs" not in f:
            raise UserInputError("no obs in this file", path=self.path)

        if isinstance(self._x, h5py.Dataset):
            if self._x.ndim != 2:
                raise UserInputError(f"{self.matrix_name} is not a 2-d matrix", path=self.path)
            self.format = "dense"
            self.shape = tuple(int(s) for s in self._x.shape)
            self.dtype = self._x.dtype
        else:
            enc = _encoding(self._x)
            if enc not in ("csr_matrix", "csc_matrix"):
                raise UserInputError(f"{self.matrix_name} has unsupported encoding {enc!r}", path=self.path)
            self.format = "csr" if enc == "csr_matrix" else "csc"
            self.shape = tuple(int(s) for s in self._x.attrs["shape"])
            self._data, self._indices, self._indptr = self._x["data"], self._x["indices"], self._x["indptr"]
            self.dtype = self._data.dtype
        if not (np.issubdtype(self.dtype, np.number) or self.dtype == np.bool_):
            raise UserInputError(f"{self.matrix_name} has non-numeric dtype {self.dtype}", path=self.path)
        self.n_obs, self.n_vars = self.shape
        self._obs_node = f["obs"]
        self.gene_ids: list[str] | None = None
        if not read_genes:
            self.gene_symbols: list[str] | None = None
            return

        var_index = self._index_of(var_node)
        if len(var_index) != self.n_vars:
            raise UserInputError(f"var has {len(var_index)} genes but {self.matrix_name} has {self.n_vars} columns",
                                 path=self.path)
        self.gene_symbols = [str(v) for v in var_index]
        if gene_id_column:
            col = self._column(var_node, gene_id_column)
            if col is None:
                raise UserInputError(f"var has no column {gene_id_column!r} (--gene-id-column)", path=self.path)
            self.gene_ids = ["" if pd.isna(v) else str(v) for v in col]

    def _read_elem(self, node):
        import anndata as ad

        return ad.io.read_elem(node)

    def _index_of(self, df_node) -> np.ndarray:
        """Index of a dataframe element (modern group layout, or the legacy compound dataset)."""
        if isinstance(df_node, h5py.Group):
            key = df_node.attrs.get("_index", "_index")
            key = key.decode() if isinstance(key, bytes) else key
            return np.asarray(self._read_elem(df_node[key]), dtype=object)
        return np.asarray(self._read_elem(df_node).index, dtype=object)  # legacy (anndata < 0.7)

    def _column(self, df_node, name: str):
        if isinstance(df_node, h5py.Group):
            if name not in df_node or name == df_node.attrs.get("_index"):
                return None
            return self._read_elem(df_node[name])
        df = self._read_elem(df_node)
        return df[name] if name in df.columns else None

    # -- obs ----------------------------------------------------------------------------------------------------
    def obs_names(self) -> np.ndarray:
        names = self._index_of(self._obs_node)
        if len(names) != self.n_obs:
            raise UserInputError(f"obs has {len(names)} cells but {self.matrix_name} has {self.n_obs} rows",
                                 path=self.path)
        return names

    def obs_names_slice(self, r0: int, r1: int) -> np.ndarray:
        """Cell names of rows ``[r0, r1)`` as str objects, reading only that slice when the layout allows it."""
        node = self._obs_node
        if isinstance(node, h5py.Group):
            key = node.attrs.get("_index", "_index")
            key = key.decode() if isinstance(key, bytes) else key
            ds = node[key]
            if isinstance(ds, h5py.Dataset) and ds.dtype.kind in ("O", "S", "U"):
                vals = ds[r0:r1]
                return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in vals], dtype=object)
        return np.asarray([str(v) for v in self.obs_names()[r0:r1]], dtype=object)

    def obs_names_bytes_slice(self, r0: int, r1: int) -> np.ndarray:
        """Cell names of rows ``[r0, r1)`` as a fixed-width bytes ("S", UTF-8) array, without a str object per name
        when the index is a string dataset (the usual layout); else encoded from `obs_names_slice`."""
        node = self._obs_node
        if isinstance(node, h5py.Group):
            key = node.attrs.get("_index", "_index")
            key = key.decode() if isinstance(key, bytes) else key
            ds = node[key]
            if isinstance(ds, h5py.Dataset) and ds.dtype.kind in ("O", "S"):
                vals = ds[r0:r1]
                if vals.dtype.kind == "S":
                    return vals
                if all(type(v) is bytes for v in vals[:1]) and len(vals):
                    try:
                        return np.array(vals, dtype="S")
                    except (TypeError, ValueError, UnicodeError):
                        pass
        names = self.obs_names_slice(r0, r1)
        return np.array([nm.encode("utf-8") for nm in names], dtype="S") if len(names) else np.zeros(0, "S1")

    def obs_column(self, name: str) -> pd.Categorical | None:
        """An obs column as a pandas Categorical (categories as str), or None when the column does not exist."""
        col = self._column(self._obs_node, name)
        if col is None:
            return None
        if not isinstance(col, pd.Categorical):
            col = pd.Categorical(pd.Series(np.asarray(col)).astype("string").astype(object))
        if len(col) != self.n_obs:
            raise UserInputError(f"obs[{name!r}] has {len(col)} values for {self.n_obs} cells", path=self.path)
        return col.rename_categories([str(c) for c in col.categories])

    # -- X ------------------------------------------------------------------------------------------------------
    def read_rows(self, r0: int, r1: int) -> sp.csr_matrix:
        """Rows ``[r0, r1)`` as a CSR matrix of shape (r1 - r0, n_vars), duplicates summed.

        Values keep the file's dtype (float32 / float64 / integer), so a block is not copied just to widen it;
        booleans and float16 become float32.
        """
        try:
            if self.format == "csr":
                ip = self._indptr[r0:r1 + 1].astype(np.int64)
                lo, hi = int(ip[0]), int(ip[-1])
                data = _value_dtype(self._data[lo:hi])
                idx = self._indices[lo:hi]
                if not idx.dtype.isnative:
                    idx = idx.astype(idx.dtype.newbyteorder("="))
                m = sp.csr_matrix((data, idx, ip - lo), shape=(r1 - r0, self.n_vars))
            elif self.format == "dense":
                m = sp.csr_matrix(_value_dtype(np.asarray(self._x[r0:r1])))
            else:
                m = self._read_rows_csc(r0, r1)
        except (OSError, ValueError, KeyError) as exc:
            raise UserInputError(f"unreadable or truncated {self.matrix_name} at rows {r0}:{r1} ({exc})",
                                 path=self.path) from None
        m.sum_duplicates()  # also sorts indices; a no-op for well-formed input
        return m

    def _read_rows_csc(self, r0: int, r1: int) -> sp.csr_matrix:
        # A row block of a CSC matrix touches every column, so scan the column arrays in pieces and keep the
        # entries of rows [r0, r1). Cost: one read of the whole matrix per block, so callers use large blocks.
        indptr = self._indptr[:].astype(np.int64)
        total = int(indptr[-1])
        rows, cols, vals = [], [], []
        for lo in range(0, total, _CSC_SCAN_ENTRIES):
            hi = min(total, lo + _CSC_SCAN_ENTRIES)
            r = self._indices[lo:hi]
            keep = (r >= r0) & (r < r1)
            if not keep.any():
                continue
            pos = np.nonzero(keep)[0] + lo
            rows.append(r[keep].astype(np.int64) - r0)
            cols.append(np.searchsorted(indptr, pos, side="right") - 1)
            vals.append(_value_dtype(self._data[lo:hi][keep]))
        if not rows:
            return sp.csr_matrix((r1 - r0, self.n_vars), dtype=np.float32)
        return sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(r1 - r0, self.n_vars)).tocsr()

    def close(self) -> None:
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            f.close()

    def __enter__(self) -> "H5adSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
