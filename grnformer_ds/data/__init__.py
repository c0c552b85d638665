"""Streaming layer: store -> tokenized, masked batches with per-cell multi-scale graphs
(docs/design.md sections 1-3)."""
from .cells import CellRows
from .collators import collator_names, get_collator, register_collator
from .dataset import StatefulCellLoader, StreamingCellDataset, split_range
from .graphs import GraphBuilder
from .graphs_reference import slot_table
from .perturb import perturb_edges
from .readers import StoreReader
from .sampler import EpochPlan, batch_rng
from .scfoundation_collator import ScFoundationCollator
from .scgpt_collator import ScGPTCollator
from .scpalm_collator import ScPaLMCollator

__all__ = [
    "CellRows", "EpochPlan", "GraphBuilder", "ScFoundationCollator", "ScGPTCollator", "ScPaLMCollator",
    "StatefulCellLoader", "StoreReader", "StreamingCellDataset", "batch_rng", "collator_names", "get_collator",
    "perturb_edges", "register_collator", "slot_table", "split_range",
]
