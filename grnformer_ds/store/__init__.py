"""The cell store: sharded, pre-shuffled AnnData zarr shards + manifest, built from .h5ad collections.

Public API:
    build_store(inputs, out, **options) -> Store     convert h5ad files (see BuildOptions for options)
    open_store(path) -> Store                        open a complete store (UserInputError otherwise)
    run_stage(opts, stage, num_tasks, task_index)    one stage / one job-array task of a build
    ensure_demo_store(path) -> Path                  the pbmc68k_reduced demo store (built once)
    GeneMatcher, normalize_gene_key                  the gene-matching rules used everywhere
    read_manifest, update_manifest_assets            manifest access for later build steps
"""
import warnings as _warnings

from .builder import build_store, run_stage
from .demo import build_demo_store, ensure_demo_store
from .manifest import read_manifest, update_manifest_assets, write_manifest
from .options import BuildOptions
from .schema import SCHEMA_VERSION, SPECIAL_TOKENS
from .store import Store, open_store
from .vocab import GeneMatcher, build_union_vocab, load_vocab, normalize_gene_key, normalize_gene_keys

# Shards carry zarr's consolidated metadata (one read to open a shard); zarr warns on every write and open that
# it is not part of the v3 spec yet. anndata and zarr-python read it; tensorstore ignores it.
_warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

__all__ = [
    "build_store", "run_stage", "build_demo_store", "ensure_demo_store", "read_manifest", "update_manifest_assets",
    "write_manifest", "BuildOptions", "SCHEMA_VERSION", "SPECIAL_TOKENS", "Store", "open_store", "GeneMatcher",
    "build_union_vocab", "load_vocab", "normalize_gene_key", "normalize_gene_keys",
]
