"""scFoundation-style (xTrimoGene) tokenization (docs/design.md section 3, ``backbone="scfoundation"``).

As in scFoundation's pretraining inputs: values are ``log1p(x / total * 1e4)`` (continuous, no binning); the total
counts go in as two scalars ``T`` = log10(raw total count) and ``S`` = log10(total count of the input the model sees)
(equal unless ``downsample_prob`` > 0, when a cell's counts are binomially down-sampled to a random fraction, the
read-depth-aware task of scFoundation). Masking hides a fraction of the nonzero genes. The encoder gets only the
nonzero, unmasked genes (random subset up to ``max_seq_len``, gene-column order, no ``<cls>``); the decoder gets all
G store genes: their value, ``mask_value`` at masked genes, 0 at zeros.

Layouts: padded, the encoder is (B, L) and the model adds the T and S tokens itself; packed (``max_tokens``), the
encoder is one (1, T) row where each cell's segment is ``[T, S, genes...]`` (two reserved slots the model fills from
``total_counts``); the decoder stays (B, G) in both.

Batch-wide like `ScGPTCollator`: optional down-sampling draws (`_downsample`), one ``rng.random`` for the
masked / left-out partition of all cells (``masking.draw_partition``), one kernel filling encoder and decoder arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .binning import DEFAULT_TARGET_SUM, normalize_log1p_batch, row_totals
from .cells import CellRows
from .masking import IGNORE_INDEX, draw_partition
from .packing import packed_keys, segment_offsets
from .scgpt_collator import _drop_explicit_zeros
from .token_kernels import fill_scfoundation


@dataclass
class ScFoundationCollator:
    """Builds ``input_ids, values, attention_mask, total_counts, decoder_values, decoder_input_ids, labels,
    cell_index, cell_type_ids`` (packed: ``cu_seq_lens_q/k, max_length_q/k`` instead of ``attention_mask``).

    gene_token_ids: (G,) vocab id of every store gene column. Returns ``(batch, slot_genes)`` like `ScGPTCollator`
    (slot_genes: store gene column of each encoder slot, -1 at padding and at the T / S slots).
    """

    gene_token_ids: np.ndarray
    pad_id: int
    max_seq_len: int = 2048
    mask_ratio: float = 0.3
    mask_value: float = -1.0
    pad_value: float = 0.0
    target_sum: float = DEFAULT_TARGET_SUM
    pad_to_max_len: bool = False
    downsample_prob: float = 0.0
    downsample_min_fraction: float = 0.1
    max_tokens: int | None = None
    pad_to_max_tokens: bool = False

    LEAD = 2  # the T and S slots at the start of each packed segment
    model_config_fields = ("mask_value", "pad_value")  # options the model config decides (`collators`)

    def __post_init__(self):
        self.gene_token_ids = np.asarray(self.gene_token_ids, dtype=np.int64)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.max_tokens is not None and self.max_tokens < self.max_cell_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} is smaller than the longest cell, {self.max_cell_tokens} "
                             f"tokens (max_seq_len + the T and S tokens)")

    @classmethod
    def for_store(cls, reader, **options) -> "ScFoundationCollator":
        """The collator for a store's `StoreReader`: its gene ids and `<pad>`, `options` over the defaults."""
        return cls(reader.gene_token_ids, pad_id=reader.pad_id, **options)

    @classmethod
    def longest_cell(cls, max_seq_len: int) -> int:
        """Packed tokens of the longest possible cell for ``max_seq_len`` (T and S included)."""
        return int(max_seq_len) + cls.LEAD

    @property
    def max_cell_tokens(self) -> int:
        return self.longest_cell(self.max_seq_len)

    def cell_tokens(self, nnz: np.ndarray) -> np.ndarray:
        """Packed tokens of a cell with ``nnz`` nonzero genes: T, S and its unmasked genes up to max_seq_len (an
        upper bound when down-sampling removes genes)."""
        nnz = np.asarray(nnz, np.int64)
        return np.minimum(nnz - (nnz * self.mask_ratio).astype(np.int64), self.max_seq_len) + self.LEAD

    def __call__(self, rows: CellRows, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        n_cells, n_genes = len(rows), len(self.gene_token_ids)
        indptr, cols, counts = _drop_explicit_zeros(rows)
        raw_total = row_totals(indptr, counts)
        if self.downsample_prob > 0:
            indptr, cols, counts = self._downsample(indptr, cols, counts, rng)
        lens = np.diff(indptr)
        totals = np.stack([np.log10(np.maximum(raw_total, 1.0)),
                           np.log10(np.maximum(row_totals(indptr, counts), 1.0))], axis=1).astype(np.float32)
        vals, _ = normalize_log1p_batch(indptr, counts, self.target_sum)
        # one draw for the batch: masked genes, then genes beyond max_seq_len left out of the encoder (masking.py)
        n_mask = (lens * self.mask_ratio).astype(np.int64)  # int(n * mask_ratio) per cell
        n_drop = np.maximum(lens - n_mask - self.max_seq_len, 0)
        state = draw_partition(indptr, n_mask, n_drop, rng)
        enc = lens - n_mask - n_drop
        if self.max_tokens is not None:
            segments = segment_offsets(enc + self.LEAD, self.max_tokens if self.pad_to_max_tokens else None,
                                       self.max_cell_tokens)
            starts, caps, total, lead = segments[:n_cells], enc + self.LEAD, int(segments[-1]), self.LEAD
        else:
            seq_len = self.max_seq_len if self.pad_to_max_len else max(1, int(enc.max(initial=0)))
            starts = np.arange(n_cells, dtype=np.int64) * seq_len
            caps, total, lead = np.full(n_cells, seq_len, np.int64), n_cells * seq_len, 0
        decoder = np.zeros((n_cells, n_genes), dtype=np.float32)
        labels = np.full((n_cells, n_genes), IGNORE_INDEX, dtype=np.float32)
        input_ids = np.empty(total, dtype=np.int64)  # the kernel writes every slot of a cell
        values = np.empty(total, dtype=np.float32)
        slot_genes = np.empty(total, dtype=np.int64)
        fill_scfoundation(indptr, np.ascontiguousarray(cols), vals, state, self.gene_token_ids, self.pad_id,
                          self.mask_value, self.pad_value, IGNORE_INDEX, lead, decoder, labels, starts, caps,
                          input_ids, values, slot_genes)
        batch = {
            "total_counts": torch.from_numpy(totals),
            "decoder_values": torch.from_numpy(decoder),
            # same row for every cell: an expanded view, so workers ship G ids, not B x G
            "decoder_input_ids": torch.from_numpy(self.gene_token_ids).expand(n_cells, n_genes),
            "labels": torch.from_numpy(labels),
            "cell_index": torch.from_numpy(np.asarray(rows.cell_index, dtype=np.int64)),
            "cell_type_ids": torch.from_numpy(np.asarray(rows.cell_type, dtype=np.int64)),
        }
        if self.max_tokens is not None:
            end = int(segments[n_cells])
            input_ids[end:], values[end:], slot_genes[end:] = self.pad_id, self.pad_value, -1
            return {"input_ids": torch.from_numpy(input_ids)[None], "values": torch.from_numpy(values)[None],
                    **packed_keys(segments), **batch}, slot_genes
        shape = (n_cells, seq_len)
        return {"input_ids": torch.from_numpy(input_ids.reshape(shape)),
                "values": torch.from_numpy(values.reshape(shape)),
                "attention_mask": torch.from_numpy(np.arange(seq_len)[None, :] < enc[:, None]),
                **batch}, slot_genes.reshape(shape)

    def _downsample(self, indptr, cols, counts, rng):
        """Binomially thin the counts of each cell with probability downsample_prob, to a fraction uniform in
        [downsample_min_fraction, 1): draws ``rng.random(B)``, ``rng.uniform(.., B)``, then one ``rng.binomial``
        over the picked cells' genes. Genes thinned to 0 are removed. Returns (indptr, cols, counts)."""
        n_cells = len(indptr) - 1
        picked = rng.random(n_cells) < self.downsample_prob
        frac = rng.uniform(self.downsample_min_fraction, 1.0, n_cells)
        lens = np.diff(indptr)
        on = np.repeat(picked, lens)
        counts = counts.copy()
        counts[on] = rng.binomial(counts[on].astype(np.int64), np.repeat(frac, lens)[on]).astype(np.float32)
        keep = counts > 0
        kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        return kept_before[indptr], cols[keep], counts[keep]
