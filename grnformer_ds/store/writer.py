"""Write one shard as an AnnData zarr (format 3) whose X arrays use the zarr v3 sharding codec.

obs/var go through anndata's own writer (so `anndata.read_zarr` reads them back exactly, categoricals included);
X is written in anndata's `csr_matrix` encoding; its arrays are zarr v3 arrays with the `sharding_indexed` codec,
written with tensorstore (which the streaming reader also uses) and read by zarr-python/anndata as well.
Inner chunks carry a crc32c checksum so a corrupted chunk fails loudly on read. X/data and X/indices keep the dtypes
X/data keeps the dtype it is given (the gather stage stores counts as uint16 when they fit, see schema.py);
X/indices is int32 and X/indptr int64.
"""
from __future__ import annotations

import hashlib
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .atomic import replace_dir, tmp_suffix
from .schema import X_CHUNKS_PER_SHARD, X_INNER_CHUNK


@dataclass
class CsrArrays:
    """The three CSR arrays of a shard's X as they will be stored (a scipy ``csr_matrix`` has the same attributes).
    data (nnz,) uint16 or float32, indices (nnz,) int32, indptr (n+1,) int64 (schema.py)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])


def x_array_spec(path: str | Path, n: int, dtype: np.dtype) -> dict:
    """tensorstore `zarr3` spec of a 1-d X array of length `n` with the sharding codec.

    Inner chunks of X_INNER_CHUNK elements (the unit of a random read) are blosc-lz4 compressed with bit shuffle
    (fast to decode while streaming; on uint16 counts/columns it measured as fast as byte shuffle and 17% smaller)
    and carry a crc32c; X_CHUNKS_PER_SHARD of them form one storage shard file.
    zarr needs chunk >= 1 even for an empty array.
    """
    dtype = np.dtype(dtype)
    chunk = max(1, min(X_INNER_CHUNK, n))
    per_shard = max(1, min(X_CHUNKS_PER_SHARD, -(-n // chunk)))
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    inner = [little,
             {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle",
                                                 "typesize": dtype.itemsize, "blocksize": 0}},
             {"name": "crc32c"}]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [n], "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk * per_shard]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [chunk], "codecs": inner, "index_codecs": [little, {"name": "crc32c"}],
                "index_location": "end"}}],
        },
        "create": True, "delete_existing": True,
    }


def shard_checksum(indptr: np.ndarray, cell_index: np.ndarray) -> str:
    """sha256 over X/indptr (int64) and obs cell_index (int64), little-endian: the shard's structure, cheap to
    re-verify. Every inner chunk of X/data and X/indices carries its own crc32c, checked on each read."""
    h = hashlib.sha256()
    for arr in (indptr, cell_index):
        h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def _start_csr(group: zarr.Group, path: Path, X: CsrArrays | sp.csr_matrix) -> list:
    """X in anndata's csr_matrix encoding. The group and its attributes come from zarr; the three arrays are
    written with tensorstore (C++, several threads: ~10x faster than zarr-python's sharding writer here).
    Arrays are written one by one, not via scipy, because the store contract is indptr int64 / indices int32
    whatever the shard size (scipy would give both one dtype).

    Returns the pending write futures: all three writes are issued before waiting on any, so tensorstore encodes
    (blosc + crc32c) and writes them on its own threads while the caller builds and writes obs/var."""
    import tensorstore as ts

    xg = group.create_group("X")
    xg.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(X.shape)})
    arrays = [("data", X.data), ("indices", X.indices.astype(np.int32, copy=False)),
              ("indptr", X.indptr.astype(np.int64, copy=False))]
    # open all three before writing any: an open issued while a write keeps tensorstore's threads busy waits on it
    opened = [ts.open(x_array_spec(path / "X" / name, arr.size, arr.dtype)) for name, arr in arrays]
    outs = [fut.result() for fut in opened]
    # can_reference_source_data_indefinitely: no copy of the arrays (ShardWriter keeps them alive until written)
    return [out.write(arr, can_reference_source_data_indefinitely=True) for out, (_, arr) in zip(outs, arrays)
            if arr.size]


# anndata's settings.override and warnings.catch_warnings change process-wide state: shards written by two threads of
# one process (builder.py) take turns in the parts that use them.
_GLOBAL_STATE = threading.Lock()


class ShardWriter:
    """Two-step shard write: `ShardWriter(path, X)` starts writing X in the background (tensorstore threads);
    `finish(obs, var)` writes obs/var, waits for X, consolidates the metadata and renames the temporary directory
    to `final_path` (replacing a stale copy). Nothing is visible under `final_path` before `finish` returns."""

    def __init__(self, final_path: str | Path, X: CsrArrays | sp.csr_matrix):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final_path.with_name(f"{self.final_path.name}.{tmp_suffix()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.X = X  # keep the arrays alive until the writes are done
        with _GLOBAL_STATE, ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            self.group = zarr.open_group(self.tmp, mode="w", zarr_format=3)
            self.pending = _start_csr(self.group, self.tmp, X)

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for fut in pending:
            fut.result()

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        try:
            # auto_shard_zarr_v3=False: obs/var are small; X has explicit shards.
            with _GLOBAL_STATE, warnings.catch_warnings(), \
                    ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
                # anndata silences this one in its own AnnData writer; writing elements one by one does not
                warnings.filterwarnings("ignore", message=".*autosharding will be the default.*")
                # Element by element, as anndata's writer does for an AnnData with X=None (writing the AnnData at
                # "/" would first clear the group, X included, which is being written).
                for key, elem in (("obs", obs), ("var", var), ("obsm", {}), ("varm", {}), ("obsp", {}),
                                  ("varp", {}), ("layers", {}), ("uns", {}), ("raw", None)):
                    ad.io.write_elem(self.group, key, elem)
                self.group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        finally:
            self.wait()
        with _GLOBAL_STATE, warnings.catch_warnings():  # "not part of the v3 spec" (see store/__init__.py)
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.tmp))  # one metadata read instead of one per array on open
        replace_dir(self.tmp, self.final_path)
        self.X = None


def write_shard(final_path: str | Path, X: CsrArrays | sp.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame) -> None:
    """Write the shard to a temporary directory, then rename it to `final_path` (replacing a stale copy)."""
    ShardWriter(final_path, X).finish(obs, var)
