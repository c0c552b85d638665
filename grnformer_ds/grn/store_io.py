"""Read what the GRN builder needs from a store: genes, cell types, and X in bounded row blocks.

X of a shard is anndata's `csr_matrix` encoding (docs/design.md section 1); a block of rows is read by slicing
`X/indptr` and then only that range of `X/data` / `X/indices` from zarr, so memory is one block whatever the shard size.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.sparse as sp

from ..errors import UserInputError
from .assets import store_root


@dataclasses.dataclass
class StoreView:
    """What the GRN builder needs of a `grnformer_ds.store.Store` (opened and validated by the store's reader)."""

    store: object  # grnformer_ds.store.Store
    genes: np.ndarray  # (G,) str — store gene symbols, column order
    cell_types: list[str]

    @property
    def root(self) -> Path:
        return Path(self.store.path)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_cells(self) -> int:
        return int(self.store.n_cells)

    def shard_paths(self) -> list[Path]:
        return [Path(p) for p in self.store.shard_paths]

    def matcher(self, by: str = "symbol"):
        """The store's `GeneMatcher` (data-prep matching rules) over symbols, or gene ids with by="gene_id"."""
        return self.store.gene_matcher(by)


def open_store_view(store) -> StoreView:
    """Open `store` (path or Store) with the store's own reader."""
    from ..store import open_store

    opened = open_store(store_root(store))
    if not opened.manifest["shards"]:
        raise UserInputError("store has no shards", path=str(opened.path))
    return StoreView(store=opened, genes=np.asarray(opened.gene_names, dtype=str),
                     cell_types=[str(c) for c in opened.cell_types])


def shard_cell_type_codes(shard_path: Path, cell_types: list[str]) -> np.ndarray:
    """(n,) int64 index of each cell's type in the manifest's `cell_types` (-1 = missing)."""
    import anndata as ad
    import pandas as pd
    import zarr

    group = zarr.open_group(str(shard_path), mode="r")
    if "cell_type" not in group["obs"]:
        n = int(group["X"].attrs["shape"][0])
        return np.full(n, -1, np.int64)
    col = ad.io.read_elem(group["obs"]["cell_type"])
    col = pd.Categorical(col)
    lookup = {c: i for i, c in enumerate(cell_types)}
    codes = np.array([lookup.get(str(c), -1) for c in col.categories], dtype=np.int64)
    return np.where(col.codes >= 0, codes[np.maximum(col.codes, 0)], -1)


@dataclasses.dataclass(frozen=True)
class ShardRows:
    """Rows [start, stop) of a shard's X, read lazily with `.load()` (cheap to pickle to a worker process)."""

    path: str
    start: int
    stop: int
    n_genes: int

    def load(self) -> sp.csr_matrix:
        import zarr

        xg = zarr.open_group(self.path, mode="r")["X"]
        indptr = np.asarray(xg["indptr"][self.start:self.stop + 1], dtype=np.int64)
        return _rows_from(xg, indptr, self.n_genes, self.path, self.start)


def _rows_from(xg, indptr: np.ndarray, n_genes: int, shard: str, row0: int) -> sp.csr_matrix:
    """Rows of X as CSR; a missing or corrupted chunk is a `StoreDamagedError` naming the shard and its rows
    [row0, row0 + n) (`store.integrity`)."""
    from grnformer_ds.store.integrity import check_chunks, damaged

    lo, hi = int(indptr[0]), int(indptr[-1])
    try:
        for name in ("indices", "data"):
            check_chunks(os.path.join(shard, "X", name), lo, hi)
        data = np.asarray(xg["data"][lo:hi], dtype=np.float32) if hi > lo else np.zeros(0, np.float32)
        indices = np.asarray(xg["indices"][lo:hi], dtype=np.int32) if hi > lo else np.zeros(0, np.int32)
    except Exception as exc:  # noqa: BLE001  (zarr decode / I/O errors)
        raise damaged(shard, (row0, row0 + len(indptr) - 1), exc, what="rows") from None
    return sp.csr_matrix((data, indices, indptr - lo), shape=(len(indptr) - 1, n_genes))


def shard_row_blocks(shard_path: Path, block_size: int, n_genes: int) -> list[ShardRows]:
    """Lazy row blocks covering a shard."""
    import zarr

    n = int(zarr.open_group(str(shard_path), mode="r")["X"]["indptr"].shape[0]) - 1
    return [ShardRows(str(shard_path), s, min(n, s + block_size), n_genes) for s in range(0, n, block_size)]


def iter_shard_blocks(shard_path: Path, block_size: int, n_genes: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(row_start, CSR float32 block) over a shard's X, `block_size` rows at a time."""
    import zarr

    xg = zarr.open_group(str(shard_path), mode="r")["X"]
    indptr = np.asarray(xg["indptr"][:], dtype=np.int64)
    n = len(indptr) - 1
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        yield start, _rows_from(xg, indptr[start:stop + 1], n_genes, str(shard_path), start)


def sample_cells_by_type(view: StoreView, max_cells: int, *, seed: int = 0,
                         block_size: int = 8192) -> dict[int, sp.csr_matrix]:
    """Up to `max_cells` cells of each cell type (seeded uniform sample), as raw CSR (cells × G) per type index.

    Cells without a known type are pooled under -1. One pass over the store.
    """
    rng = np.random.default_rng(seed)
    codes = [shard_cell_type_codes(p, view.cell_types) for p in view.shard_paths()]
    all_codes = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    chosen = np.zeros(len(all_codes), bool)
    for code in np.unique(all_codes):
        idx = np.flatnonzero(all_codes == code)
        if len(idx) > max_cells:
            idx = rng.choice(idx, size=max_cells, replace=False)
        chosen[idx] = True
    parts: dict[int, list] = {}
    offset = 0
    for path, shard_codes in zip(view.shard_paths(), codes):
        for start, block in iter_shard_blocks(path, block_size, view.n_genes):
            rows = np.arange(start, start + block.shape[0])
            take = chosen[offset + rows]
            for code in np.unique(shard_codes[rows[take]]):
                sel = take & (shard_codes[rows] == code)
                parts.setdefault(int(code), []).append(block[sel])
        offset += len(shard_codes)
    return {code: sp.vstack(blocks, format="csr") for code, blocks in parts.items()}


def looks_like_counts(matrix: sp.spmatrix, n_check: int = 100_000) -> bool:
    """True when the (first `n_check`) stored values are all non-negative integers: raw counts."""
    data = matrix.data[:n_check]
    return bool(data.size == 0 or (np.all(data >= 0) and np.all(data == np.round(data))))


def normalize_log1p(matrix: sp.spmatrix, *, counts: bool | None = None, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / library size × 1e4) for raw counts (scanpy's normalize_total + log1p); non-count data (a store
    built with --allow-non-integer from already normalised values) is returned as it is."""
    matrix = sp.csr_matrix(matrix, dtype=np.float64)
    if counts is None:
        counts = looks_like_counts(matrix)
    if not counts:
        return matrix
    lib = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    out = sp.diags(scale) @ matrix
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out)
