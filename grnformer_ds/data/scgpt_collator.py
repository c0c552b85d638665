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

from .binning import DEFAULT_TARGET_SUM, bin_batch
from .cells import CellRows
from .masking import IGNORE_INDEX, choose_masked


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
        indptr, cols, counts = _drop_explicit_zeros(rows)
        lens = np.diff(indptr)
        # All tie-breaking uniforms first (one draw for the batch, cells in order, as scGPT's per-row draws), so the
        # bins of a cell do not depend on the subsetting / masking draws of the cells before it.
        uniforms = rng.random(int(indptr[-1]))
        bins = bin_batch(indptr, counts, self.n_bins, uniforms, self.target_sum).astype(np.float32)
        kept = np.minimum(lens, max_genes)
        longest = int(kept.max(initial=0)) + 1
        seq_len = self.max_seq_len if self.pad_to_max_len else longest
        input_ids = np.full((n_cells, seq_len), self.pad_id, dtype=np.int64)
        values = np.full((n_cells, seq_len), self.pad_value, dtype=np.float32)
        labels = np.full((n_cells, seq_len), IGNORE_INDEX, dtype=np.float32)
        slot_genes = np.full((n_cells, seq_len), -1, dtype=np.int64)
        input_ids[:, 0] = self.cls_id
        values[:, 0] = 0.0
        tokens = self.gene_token_ids[cols]
        # Per cell, in cell order (the generator's stream): gene subset of long cells, then the masked slots. Only
        # the random draws and contiguous slice copies stay per cell (cheaper here than scattering by index arrays).
        for b, (lo, hi) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist())):
            n = hi - lo
            if n > max_genes:
                keep = lo + np.sort(rng.choice(n, size=max_genes, replace=False))
                c, t, v = cols[keep], tokens[keep], bins[keep]
                n = max_genes
            else:
                c, t, v = cols[lo:hi], tokens[lo:hi], bins[lo:hi]
            masked = choose_masked(n, self.mask_ratio, rng) + 1
            input_ids[b, 1:n + 1] = t
            values[b, 1:n + 1] = v
            slot_genes[b, 1:n + 1] = c
            labels[b, masked] = values[b, masked]
            values[b, masked] = self.mask_value
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "values": torch.from_numpy(values),
            "attention_mask": torch.from_numpy(input_ids != self.pad_id),
            "labels": torch.from_numpy(labels),
            "cell_index": torch.from_numpy(np.asarray(rows.cell_index, dtype=np.int64)),
            "cell_type_ids": torch.from_numpy(np.asarray(rows.cell_type, dtype=np.int64)),
        }
        return batch, slot_genes


def _drop_explicit_zeros(rows: CellRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, gene columns, counts) of the batch without stored zeros (as `CellRows.row`, for all cells)."""
    indptr = np.asarray(rows.indptr, dtype=np.int64)
    cols, counts = rows.indices[indptr[0]:indptr[-1]], rows.data[indptr[0]:indptr[-1]]
    indptr = indptr - indptr[0]
    keep = counts != 0
    if keep.all():
        return indptr, cols, counts
    kept_before = np.zeros(len(keep) + 1, dtype=np.int64)  # kept nonzeros before each position
    np.cumsum(keep, out=kept_before[1:])
    return kept_before[indptr], cols[keep], counts[keep]
