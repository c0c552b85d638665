"""Read contiguous row ranges of a store's shards: tensorstore (``zarr3`` driver) by default, zarr-python fallback.

A `StoreReader` maps a global cell range ``[g0, g1)`` onto shard rows (manifest ``cell_offset``) and returns
`CellRows`. Per shard it keeps in memory only what is O(cells) and small: ``X/indptr`` (8 B/cell) and the
``obs/cell_type`` codes; X data/indices and the active-regulon bitsets are read per range. Handles are opened lazily
and dropped on pickling, so a reader can be shipped to DataLoader workers (each worker opens its own).
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from ..store import open_store
from ..store.schema import CLS_TOKEN, PAD_TOKEN, vocab_path
from .cells import CellRows

READERS = ("tensorstore", "zarr")


class _ZarrArray:
    """zarr-python array with the same ``read(lo, hi)`` as `_TsArray`."""

    def __init__(self, path: Path):
        import zarr

        self._arr = zarr.open_array(str(path), mode="r")

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self._arr[lo:hi])

    def read_async(self, lo: int, hi: int):
        """Same as `read` (zarr-python has no futures): the result is ready, `_result` passes it through."""
        return self.read(lo, hi)

    def read_all(self) -> np.ndarray:
        return np.asarray(self._arr[...])


_TS_CONTEXT = None


def _ts_context():
    """One tensorstore context per process, with one decode thread: a loader process reads one block at a time and
    gets its parallelism from DataLoader workers; tensorstore's default (a thread per core) only adds hand-offs
    and CPU time (measured: 0.75 vs 0.89 ms per 256-cell block, see BENCHMARKS.md)."""
    global _TS_CONTEXT
    if _TS_CONTEXT is None:
        import tensorstore as ts

        _TS_CONTEXT = ts.Context({"data_copy_concurrency": {"limit": 1}})
    return _TS_CONTEXT


class _TsArray:
    """tensorstore ``zarr3`` array (handles the sharding codec natively, releases the GIL while decoding)."""

    def __init__(self, path: Path):
        import tensorstore as ts

        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        self._arr = ts.open(spec, read=True, open=True, context=_ts_context()).result()

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._arr[lo:hi].read().result()

    def read_async(self, lo: int, hi: int):
        """A tensorstore future: start several reads, then collect them with `_result` (the decodes overlap)."""
        return self._arr[lo:hi].read()

    def read_all(self) -> np.ndarray:
        return self._arr.read().result()


def _result(pending) -> np.ndarray:
    return pending if isinstance(pending, np.ndarray) else pending.result()


class ShardReader:
    """Rows of one shard (an AnnData zarr, docs/design.md section 1)."""

    def __init__(self, path: Path, n_cells: int, cell_offset: int, backend: str = "tensorstore"):
        self.path, self.n_cells, self.cell_offset, self.backend = Path(path), int(n_cells), int(cell_offset), backend
        self._open = False

    def _array(self, rel: str):
        p = self.path / rel
        if not (p / "zarr.json").exists():
            raise UserInputError(f"missing array {rel} in shard (incomplete store?)", path=str(self.path))
        return _TsArray(p) if self.backend == "tensorstore" else _ZarrArray(p)

    def _ensure_open(self) -> None:
        if self._open:
            return
        self._data = self._array("X/data")
        self._indices = self._array("X/indices")
        self.indptr = self._array("X/indptr").read_all().astype(np.int64)
        if len(self.indptr) != self.n_cells + 1:
            raise UserInputError(f"X/indptr has {len(self.indptr) - 1} rows, manifest says {self.n_cells}",
                                 path=str(self.path))
        self.cell_type = self.cell_type_codes()
        act = self.path / "obsm" / "active_regulons"
        self._active = self._array("obsm/active_regulons") if (act / "zarr.json").exists() else None
        self._open = True

    @property
    def has_active_regulons(self) -> bool:
        # a file check, not an open: tensorstore must not start its threads in a process that will fork workers
        return (self.path / "obsm" / "active_regulons" / "zarr.json").exists()

    def read_rows(self, r0: int, r1: int, with_active: bool) -> CellRows:
        """Rows ``[r0, r1)`` of this shard. A missing or corrupted chunk is a `StoreDamagedError` naming the shard
        and the cells (`store.integrity`)."""
        from ..store.integrity import damaged

        try:
            return self._read_rows(r0, r1, with_active)
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001  (tensorstore / zarr decode and I/O errors)
            raise damaged(self.path, (self.cell_offset + r0, self.cell_offset + r1), exc) from None

    def _read_rows(self, r0: int, r1: int, with_active: bool) -> CellRows:
        from ..store.integrity import check_chunks

        self._ensure_open()
        lo, hi = int(self.indptr[r0]), int(self.indptr[r1])
        for rel in ("X/indices", "X/data"):  # zarr reads a missing chunk file as zeros: refuse instead
            check_chunks(self.path / rel, lo, hi)
        active = None
        if with_active:
            if self._active is None:
                raise UserInputError("shard has no obsm/active_regulons (run build_grn.py on the store)",
                                     path=str(self.path))
            active = self._active.read_async(r0, r1)
        # all reads in flight before waiting on any
        indices, data = self._indices.read_async(lo, hi), self._data.read_async(lo, hi)
        if active is not None:
            active = np.ascontiguousarray(_result(active), dtype=np.uint8)
        # indices/data stay in the store's dtypes (uint16 in most stores): the batch gather widens them while copying
        return CellRows(
            indptr=self.indptr[r0:r1 + 1] - lo,
            indices=_result(indices),
            data=_result(data),
            cell_index=np.arange(self.cell_offset + r0, self.cell_offset + r1, dtype=np.int64),
            cell_type=self.cell_type[r0:r1],
            active_regulons=active,
        )

    def cell_type_codes(self) -> np.ndarray:
        """(n_cells,) int64 cell-type code of every row (``obs/cell_type/codes``; -1 everywhere without the column)."""
        codes = self.path / "obs" / "cell_type" / "codes"
        if (codes / "zarr.json").exists():
            return _ZarrArray(codes).read_all().astype(np.int64)
        return np.full(self.n_cells, -1, dtype=np.int64)

    def row_nnz(self) -> np.ndarray:
        """(n_cells,) int64 stored genes of every row, from ``X/indptr`` read with zarr-python (starts no tensorstore
        threads, so it is safe in a process that will fork workers)."""
        indptr = np.asarray(_ZarrArray(self.path / "X" / "indptr").read_all(), dtype=np.int64)
        if len(indptr) != self.n_cells + 1:
            raise UserInputError(f"X/indptr has {len(indptr) - 1} rows, manifest says {self.n_cells}",
                                 path=str(self.path))
        return np.diff(indptr)

    def __getstate__(self):
        return {k: getattr(self, k) for k in ("path", "n_cells", "cell_offset", "backend")} | {"_open": False}


class StoreReader:
    """A store opened for reading: manifest, vocabulary, gene → token map, and global row ranges."""

    def __init__(self, store: str | Path, backend: str = "tensorstore"):
        if backend not in READERS:
            raise UserInputError(f"unknown reader {backend!r}; choose one of {', '.join(READERS)}")
        self.store = open_store(store)  # validated manifest, shards present, vocab hash-checked
        self.root = self.store.path
        self.manifest = self.store.manifest
        self.vocab: dict[str, int] = self.store.vocab
        for tok in (PAD_TOKEN, CLS_TOKEN):
            if tok not in self.vocab:
                raise UserInputError(f"vocabulary lacks the special token {tok}", path=str(vocab_path(self.root)))
        if backend == "tensorstore" and importlib.util.find_spec("tensorstore") is None:
            # the fallback reads the same arrays, ~5x slower
            warnings.warn("tensorstore is not installed: reading the store with zarr-python instead")
            backend = "zarr"
        self.backend = backend
        self.n_cells, self.n_genes = self.store.n_cells, self.store.n_genes
        self.cell_types: list[str] = self.store.cell_types
        self.shards = [ShardReader(Path(s["abs_path"]), s["n_cells"], s["cell_offset"], backend)
                       for s in self.store.shards]
        if not self.shards:
            raise UserInputError("store has no shards", path=str(self.root))
        self._offsets = self.store.cell_offsets
        self.gene_token_ids = self.store.token_ids
        if len(self.gene_token_ids) != self.n_genes:
            raise UserInputError(f"var/token_id has {len(self.gene_token_ids)} genes, manifest says {self.n_genes}",
                                 path=str(self.shards[0].path))

    @property
    def pad_id(self) -> int:
        return int(self.vocab[PAD_TOKEN])

    @property
    def cls_id(self) -> int:
        return int(self.vocab[CLS_TOKEN])

    @property
    def has_active_regulons(self) -> bool:
        return all(s.has_active_regulons for s in self.shards)

    def cell_type_codes(self) -> np.ndarray:
        """(n_cells,) int64 cell-type code of every cell in store order (indexes `cell_types`; -1 unknown)."""
        return np.concatenate([shard.cell_type_codes() for shard in self.shards])

    def row_nnz(self, g0: int, g1: int) -> np.ndarray:
        """(g1 - g0,) int64 stored genes of the global cells ``[g0, g1)`` (no X data read)."""
        parts = []
        for shard in self.shards:
            a, b = max(g0, shard.cell_offset), min(g1, shard.cell_offset + shard.n_cells)
            if b > a:
                parts.append(shard.row_nnz()[a - shard.cell_offset:b - shard.cell_offset])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def read_range(self, g0: int, g1: int, with_active: bool = False) -> CellRows:
        """Global cells ``[g0, g1)`` (may span shards). indices/data keep the store's X dtypes (see `CellRows`)."""
        parts = []
        k = int(np.searchsorted(self._offsets, g0, side="right")) - 1
        while g0 < g1:
            shard = self.shards[k]
            end = min(g1, shard.cell_offset + shard.n_cells)
            if end > g0:
                parts.append(shard.read_rows(g0 - shard.cell_offset, end - shard.cell_offset, with_active))
            g0 = end
            k += 1
        return CellRows.concat(parts)
