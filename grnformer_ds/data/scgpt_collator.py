"""scGPT-style tokenization of a batch of cells (docs/design.md section 3, ``backbone="scgpt"``).

Per cell: nonzero genes -> values normalised to ``target_sum``, log1p, binned into ``n_bins`` (``binning.py``, scGPT's
rule) -> if more than ``max_seq_len - 1`` genes, a uniformly random subset of that size (scGPT ``pad_batch`` sampling;
kept in gene-column order) -> ``<cls>`` prepended with value 0 -> masked-value modelling -> either padded to the longest
cell of the batch (or to ``max_seq_len`` with ``pad_to_max_len``) with ``<pad>`` / ``pad_value`` (the (B, L) layout),
or, with ``max_tokens``, packed back to back into one (1, T) row, each cell's segment starting with its ``<cls>`` (the
THD layout of `packing`; ``pad_to_max_tokens`` pads T to exactly ``max_tokens`` with dummy segments).

Random draws, in this order from the caller's generator: ``rng.random(nnz)`` tie-breaking uniforms (binning), then
one ``rng.random`` for the subset + mask partition of all cells (``masking.draw_partition``) (each cell's own draws
instead when the caller passes a `cell_random.CellKeyedRandom`, as inference does), then whatever a
subclass's `mask_more` draws (scPaLM's patch masking). The work is batch-wide:
one binning kernel, one partition kernel, one kernel writing the padded arrays (``token_kernels.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .binning import DEFAULT_TARGET_SUM, bin_batch
from .cell_random import draw_uniforms
from .cells import CellRows
from .masking import IGNORE_INDEX, draw_partition
from .packing import packed_keys, segment_offsets
from .token_kernels import fill_scgpt


@dataclass
class ScGPTCollator:
    """Builds ``input_ids, values, attention_mask, labels, cell_index, cell_type_ids`` from `CellRows` (padded), or
    ``input_ids, values, labels`` (1, T) + ``cu_seq_lens_q/k, max_length_q/k, cell_index, cell_type_ids`` (packed,
    when ``max_tokens`` is set).

    gene_token_ids: (G,) int64 vocab id of each store gene column (shard ``var["token_id"]``).
    Calling it returns ``(batch, slot_genes)`` where slot_genes is the store gene column of every token slot (-1 for
    ``<cls>`` and padding): (B, L) int64 padded, (T,) packed; the graph builder uses it to index GRN edges by token
    slot.
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
    max_tokens: int | None = None
    pad_to_max_tokens: bool = False

    model_config_fields = ("n_bins", "mask_value", "pad_value")  # options the model config decides (`collators`)

    def __post_init__(self):
        self.gene_token_ids = np.asarray(self.gene_token_ids, dtype=np.int64)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (one <cls> + one gene), got {self.max_seq_len}")
        if self.n_bins < 3:
            raise ValueError(f"n_bins must be >= 3, got {self.n_bins}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.max_tokens is not None and self.max_tokens < self.max_cell_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is smaller than the longest cell, {self.max_cell_tokens} "
                             f"tokens (max_seq_len)")

    @classmethod
    def for_store(cls, reader, **options) -> "ScGPTCollator":
        """The collator for a store's `StoreReader`: its gene ids and special tokens, `options` over the defaults."""
        return cls(reader.gene_token_ids, pad_id=reader.pad_id, cls_id=reader.cls_id, **options)

    @staticmethod
    def longest_cell(max_seq_len: int) -> int:
        """Tokens of the longest possible cell for ``max_seq_len`` (``<cls>`` included)."""
        return int(max_seq_len)

    @property
    def max_cell_tokens(self) -> int:
        return self.longest_cell(self.max_seq_len)

    def cell_tokens(self, nnz: np.ndarray) -> np.ndarray:
        """Tokens of a cell with ``nnz`` nonzero genes (``<cls>`` + at most max_seq_len - 1 genes)."""
        return np.minimum(np.asarray(nnz, np.int64), self.max_seq_len - 1) + 1

    def genes_to_mask(self, kept: np.ndarray) -> np.ndarray:
        """Genes masked one by one per cell, ``int(n * mask_ratio)`` of its kept genes (a subclass that masks in
        other units returns zeros and masks in `mask_more`)."""
        return (kept * self.mask_ratio).astype(np.int64)

    def mask_more(self, input_ids, values, labels, starts, kept, rng) -> None:
        """Hook after the token arrays are filled (cell b's genes at ``starts[b] + 1 ..``); scGPT masks nothing
        more."""

    def __call__(self, rows: CellRows, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        n_cells = len(rows)
        max_genes = self.max_seq_len - 1
        indptr, cols, counts = _drop_explicit_zeros(rows)
        lens = np.diff(indptr)
        # All tie-breaking uniforms first (one draw for the batch, cells in order, as scGPT's per-row draws), so the
        # bins of a cell do not depend on the subsetting / masking draws.
        uniforms = draw_uniforms(rng, np.diff(indptr))
        bins = bin_batch(indptr, counts, self.n_bins, uniforms, self.target_sum)
        # Then one draw for the whole batch: which genes long cells drop, which kept genes are masked (masking.py).
        kept = np.minimum(lens, max_genes)
        state = draw_partition(indptr, self.genes_to_mask(kept), lens - kept, rng)
        if self.max_tokens is not None:
            segments = segment_offsets(kept + 1, self.max_tokens if self.pad_to_max_tokens else None,
                                       self.max_cell_tokens)
            starts, caps, total = segments[:n_cells], kept + 1, int(segments[-1])
        else:
            seq_len = self.max_seq_len if self.pad_to_max_len else int(kept.max(initial=0)) + 1
            starts = np.arange(n_cells, dtype=np.int64) * seq_len
            caps, total = np.full(n_cells, seq_len, np.int64), n_cells * seq_len
        # every slot of a cell is written by the kernel; the packed tail (dummy segments) is padding
        input_ids = np.empty(total, dtype=np.int64)
        values = np.empty(total, dtype=np.float32)
        labels = np.empty(total, dtype=np.float32)
        slot_genes = np.empty(total, dtype=np.int64)
        fill_scgpt(indptr, np.ascontiguousarray(cols), bins, state, self.gene_token_ids, self.cls_id, self.pad_id,
                   self.mask_value, self.pad_value, IGNORE_INDEX, starts, caps, input_ids, values, labels, slot_genes)
        self.mask_more(input_ids, values, labels, starts, kept, rng)
        meta = {"cell_index": torch.from_numpy(np.asarray(rows.cell_index, dtype=np.int64)),
                "cell_type_ids": torch.from_numpy(np.asarray(rows.cell_type, dtype=np.int64))}
        if self.max_tokens is not None:
            end = int(segments[n_cells])
            input_ids[end:], values[end:], labels[end:], slot_genes[end:] = (self.pad_id, self.pad_value,
                                                                             IGNORE_INDEX, -1)
            batch = {"input_ids": torch.from_numpy(input_ids)[None], "values": torch.from_numpy(values)[None],
                     "labels": torch.from_numpy(labels)[None], **packed_keys(segments), **meta}
            return batch, slot_genes
        shape = (n_cells, seq_len)
        attention = np.arange(seq_len)[None, :] < (kept + 1)[:, None]
        batch = {
            "input_ids": torch.from_numpy(input_ids.reshape(shape)),
            "values": torch.from_numpy(values.reshape(shape)),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels.reshape(shape)),
            **meta,
        }
        return batch, slot_genes.reshape(shape)


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
