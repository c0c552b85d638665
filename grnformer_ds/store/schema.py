"""Store layout constants (see docs/design.md section 1). Every path a reader or writer uses is named here."""
from __future__ import annotations

from pathlib import Path

FORMAT = "grnformer_ds.store"
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
SHARDS_DIR = "shards"
GRN_DIR = "grn"
WORK_DIR = "_work"  # scratch of unfinished builds; readers never look inside; finalize removes it

# scGPT's special tokens; with the default union vocabulary they take ids 0, 1, 2 in this order.
PAD_TOKEN, CLS_TOKEN, EOC_TOKEN = "<pad>", "<cls>", "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)

# Shard X arrays: zarr v3 sharding codec. Inner chunks are the unit of a random read (64 Ki elements = 256 KiB of
# float32 before compression); a storage shard groups 64 inner chunks into one file so a store of millions of cells
# stays at a few files per shard array.
X_INNER_CHUNK = 65536
X_CHUNKS_PER_SHARD = 64

# X dtypes. Counts (X/data) are uint16 when every value of the whole store is an integer <= 65,535 (nearly always
# for raw UMI counts), float32 otherwise (non-integer data, or a larger count somewhere): the streaming reader is bound
# by decoding X and the gather stage by copying it, and half the bytes of the values make both cheaper (BENCHMARKS.md).
# Gene columns (X/indices) stay int32 even below 65,536 genes: scipy warns on unsigned index arrays, and the shards
# must stay plain scverse objects.
X_INDICES_DTYPE = "int32"
X_INDPTR_DTYPE = "int64"

# Manifest keys a reader requires (a manifest without any of them is "incomplete").
REQUIRED_MANIFEST_KEYS = (
    "format", "schema_version", "complete", "n_cells", "n_genes", "nnz", "vocab_size", "special_tokens",
    "vocab_sha256", "cell_type_key", "cell_types", "shards", "inputs", "seed", "created_utc", "assets",
)
REQUIRED_SHARD_KEYS = ("path", "n_cells", "nnz", "cell_offset", "checksum")

# obs columns of every shard (docs/design.md section 1).
OBS_COLUMNS = ("cell_index", "cell_type", "source_file", "library_size", "n_genes")


def shard_relpath(index: int) -> str:
    """Path of shard `index` relative to the store root, e.g. ``shards/shard-000003.zarr``."""
    return f"{SHARDS_DIR}/shard-{index:06d}.zarr"


def manifest_path(store: str | Path) -> Path:
    return Path(store) / MANIFEST


def vocab_path(store: str | Path) -> Path:
    return Path(store) / VOCAB


def work_path(store: str | Path) -> Path:
    return Path(store) / WORK_DIR
