"""scPaLM-style tokenization (``backbone="scpalm"``): scGPT's cells (`<cls>` + binned values of the expressed genes),
masked in whole patches.

The model cuts each cell's genes into patches of ``patch_size`` genes in token-id order
(`grnformer_ds.modeling.backbone_scpalm`); this collator masks in the same units: ``mask_ratio`` of a cell's patches
(``int(n_patches * mask_ratio)``, at least one when the cell has two patches or more) have every gene value hidden
(``mask_value``, the bin as label). Layouts, subsetting to ``max_seq_len`` and the packed budget are scGPT's (the
budget counts gene slots; the transformer sees about ``patch_size`` times fewer tokens).

Random draws: scGPT's (binning uniforms, the subset partition with no gene-wise masking), then one
``rng.random(total patches)`` that picks the masked patches of every cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cell_random import draw_uniforms
from .scgpt_collator import ScGPTCollator
from .token_kernels import mask_patches


@dataclass
class ScPaLMCollator(ScGPTCollator):
    patch_size: int = 16
    mask_ratio: float = 0.25

    model_config_fields = ("n_bins", "mask_value", "pad_value", "patch_size")

    def __post_init__(self):
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        # store columns in token-id order (any vocabulary built by build_store.py): a cell's genes, which the
        # collator writes in column order, are then in the model's canonical order already
        self._columns_in_id_order = bool((np.diff(self.gene_token_ids) > 0).all())

    def genes_to_mask(self, kept: np.ndarray) -> np.ndarray:
        return np.zeros_like(kept)

    def mask_more(self, input_ids, values, labels, starts, kept, rng) -> None:
        """Mask whole patches: cell b's genes sit at ``starts[b] + 1 .. starts[b] + kept[b]``; a patch is
        ``patch_size`` consecutive genes in token-id order (the model's canonical order)."""
        kept = np.asarray(kept, np.int64)
        n_genes = int(kept.sum())
        if n_genes == 0 or self.mask_ratio == 0:
            return
        starts = np.asarray(starts, np.int64)
        rank = np.empty(0, np.int64)
        if not self._columns_in_id_order:  # rank each gene within its cell by token id
            cell = np.repeat(np.arange(len(kept)), kept)
            first = np.zeros(len(kept) + 1, np.int64)
            np.cumsum(kept, out=first[1:])
            pos = starts[cell] + 1 + (np.arange(n_genes) - first[cell])
            order = np.lexsort((input_ids[pos], cell))  # by cell, then token id
            rank = np.empty(n_genes, np.int64)
            rank[order] = np.arange(n_genes) - first[cell[order]]
        n_patches = -(-kept // self.patch_size)
        patch_first = np.zeros(len(kept) + 1, np.int64)
        np.cumsum(n_patches, out=patch_first[1:])
        n_mask = (n_patches * self.mask_ratio).astype(np.int64)
        n_mask = np.where((n_mask == 0) & (n_patches > 1), 1, n_mask)
        # a uniform per patch; each cell masks its n_mask patches with the smallest draws (`mask_patches`)
        u = draw_uniforms(rng, n_patches)
        mask_patches(starts, kept, rank, self.patch_size, n_mask, u, patch_first, np.float32(self.mask_value),
                     values, labels)
