"""scGPT-style tokenization of a batch of cells (DESIGN.md section 3, ``backbone="scgpt"``).

Per cell: nonzero genes -> values normalised to ``target_sum``, log1p, binned into ``n_bins`` (``binning.py``, scGPT's
rule) -> if more than ``max_seq_len - 1`` genes, a random subset of that size (scGPT ``pad_batch`` sampling; kept in
gene-column order) -> ``<cls>`` prepended with value 0 -> masked-value modelling (``masking.py``) -> padded to the
longest cell of the batch (or to ``max_seq_len`` with ``pad_to_max_len``) with ``<pad>`` / ``pad_value``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .binning import DEFAULT_TARGET_SUM, bin_nonzero, normalize_log1p
from .cells import CellRows
from .masking import IGNORE_INDEX, apply_mask, choose_masked


@dataclass
class ScGPTCollator:
    """Builds ``input_ids, values, attention_mask, labels, cell_index, cell_type_ids`` from `CellRows`.

    gene_token_ids: (G,) int64 vocab id of each store gene column (shard ``var["token_id"]``).
    Calling it returns ``(batch, slot_genes)`` where slot_genes (B, L) int64 is the store gene column of every token
    slot (-1 for ``<cls>`` and padding); the graph builder uses it to index GRN edges by token slot.
    """

    gene_token_ids: np.ndarray
    pad_id: int
    cls_id: int
    max_seq_len: int = 1200
    n_bins: int = 51
    mask_ratio: float = 0.15
    mask_value: float = -1.0
    pad_value: float = -2.0
    target_sum: float = DEFAULT_TARGET_SUM
    pad_to_max_len: bool = False

    def __post_init__(self):
        self.gene_token_ids = np.asarray(self.gene_token_ids, dtype=np.int64)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (one <cls> + one gene), got {self.max_seq_len}")
        if self.n_bins < 3:
            raise ValueError(f"n_bins must be >= 3, got {self.n_bins}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    def __call__(self, rows: CellRows, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        n_cells = len(rows)
        max_genes = self.max_seq_len - 1
        raw = [rows.row(b) for b in range(n_cells)]
        # All tie-breaking uniforms first (one draw for the batch, cells in order, as scGPT's per-row draws), so the
        # bins of a cell do not depend on the subsetting / masking draws of the cells before it.
        uniforms = rng.random(sum(len(c) for c, _ in raw))
        per_cell, offset = [], 0
        for cols, counts in raw:
            values = normalize_log1p(counts, target_sum=self.target_sum)
            bins = bin_nonzero(values, self.n_bins, uniforms[offset:offset + len(values)]).astype(np.float32)
            offset += len(values)
            if len(cols) > max_genes:
                keep = np.sort(rng.choice(len(cols), size=max_genes, replace=False))
                cols, bins = cols[keep], bins[keep]
            masked = choose_masked(len(cols), self.mask_ratio, rng)
            per_cell.append((cols, bins, masked))

        longest = max((len(c) for c, _, _ in per_cell), default=0) + 1
        seq_len = self.max_seq_len if self.pad_to_max_len else longest
        input_ids = np.full((n_cells, seq_len), self.pad_id, dtype=np.int64)
        values = np.full((n_cells, seq_len), self.pad_value, dtype=np.float32)
        labels = np.full((n_cells, seq_len), IGNORE_INDEX, dtype=np.float32)
        slot_genes = np.full((n_cells, seq_len), -1, dtype=np.int64)
        for b, (cols, bins, masked) in enumerate(per_cell):
            n = len(cols) + 1
            input_ids[b, 0] = self.cls_id
            input_ids[b, 1:n] = self.gene_token_ids[cols]
            masked_bins, gene_labels = apply_mask(bins, masked, self.mask_value)
            values[b, 0] = 0.0
            values[b, 1:n] = masked_bins
            labels[b, 1:n] = gene_labels
            slot_genes[b, 1:n] = cols
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "values": torch.from_numpy(values),
            "attention_mask": torch.from_numpy(input_ids != self.pad_id),
            "labels": torch.from_numpy(labels),
            "cell_index": torch.from_numpy(np.asarray(rows.cell_index, dtype=np.int64)),
            "cell_type_ids": torch.from_numpy(np.asarray(rows.cell_type, dtype=np.int64)),
        }
        return batch, slot_genes
