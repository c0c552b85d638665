"""Gene regulatory networks: table readers, AUCell, thresholds, co-expression graph, store assets.

Heavy modules (scikit-learn, anndata, zarr) are imported inside the functions that need them.
"""
from .assets import (
    GRNAssets,
    has_grn_assets,
    pack_active,
    read_grn_assets,
    read_shard_active_regulons,
    read_shard_aucell,
    unpack_active,
    write_grn_assets,
    write_shard_regulon_activity,
)

__all__ = [
    "GRNAssets",
    "has_grn_assets",
    "pack_active",
    "read_grn_assets",
    "read_shard_active_regulons",
    "read_shard_aucell",
    "unpack_active",
    "write_grn_assets",
    "write_shard_regulon_activity",
]
