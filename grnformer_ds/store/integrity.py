"""Damaged store shards found when read: a chunk file that is missing, or a chunk whose crc32c does not match.

zarr gives a missing chunk file the array's fill value (zeros) without a word, so a read first checks that the chunk
files covering its range exist (`check_chunks`); a corrupted chunk fails its crc32c inside the zarr / tensorstore
decode, and `damaged` turns either into one `StoreDamagedError` naming the shard, the array and the global cell range.
Used by the training loader (`data.readers`), embeddings (the same loader) and build_grn.py (`grn.store_io`).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from grnformer_ds.errors import UserInputError


class StoreDamagedError(UserInputError):
    """A shard's data cannot be read back as written."""


@lru_cache(maxsize=256)
def _chunk_layout(array_dir: str) -> tuple[int, str]:
    """(outer chunk length, key prefix) of a 1-d zarr v3 array (`c/<k>` with the default key encoding)."""
    with open(os.path.join(array_dir, "zarr.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    enc = meta.get("chunk_key_encoding", {})
    sep = (enc.get("configuration") or {}).get("separator", "/")
    prefix = f"c{sep}" if enc.get("name", "default") == "default" else ""
    return chunk, prefix


def check_chunks(array_dir: str | Path, lo: int, hi: int) -> None:
    """Raise FileNotFoundError naming the first chunk file of elements [lo, hi) that is missing."""
    if hi <= lo:
        return
    array_dir = str(array_dir)
    chunk, prefix = _chunk_layout(array_dir)
    for k in range(lo // chunk, (hi - 1) // chunk + 1):
        name = f"{prefix}{k}"
        if not os.path.isfile(os.path.join(array_dir, *name.split("/"))):
            raise FileNotFoundError(f"chunk file {name} of {os.path.basename(array_dir)} is missing")


def damaged(shard: str | Path, cells: tuple[int, int], exc: BaseException,
            what: str = "cells") -> StoreDamagedError:
    """The one-line error for a shard that could not be read; `cells`: the range being read (`what`: "cells" =
    global store positions, or "rows" of this shard)."""
    reason = " ".join(str(exc).split())
    if len(reason) > 300:
        reason = reason[:300] + "…"
    return StoreDamagedError(f"{what} [{cells[0]}, {cells[1]}) cannot be read ({type(exc).__name__}: {reason}); the "
                             f"store is damaged: rebuild it (data_prep/build_store.py) or restore this shard",
                             path=str(shard))
