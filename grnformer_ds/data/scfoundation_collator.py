"""scFoundation-style (xTrimoGene) tokenization (DESIGN.md section 3, ``backbone="scfoundation"``).

As in scFoundation's pretraining inputs: values are ``log1p(x / total * 1e4)`` (continuous, no binning); the total
counts go in as two scalars ``T`` = log10(raw total count) and ``S`` = log10(total count of the input the model sees)
(equal unless ``downsample_prob`` > 0, when a cell's counts are binomially down-sampled to a random fraction, the
read-depth-aware task of scFoundation). Masking hides a fraction of the nonzero genes. The encoder gets only the
nonzero, unmasked genes (random subset up to ``max_seq_len``, gene-column order, no ``<cls>``); the decoder gets all
G store genes: their value, ``mask_value`` at masked genes, 0 at zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .binning import DEFAULT_TARGET_SUM, normalize_log1p
from .cells import CellRows
from .masking import IGNORE_INDEX, choose_masked


@dataclass
class ScFoundationCollator:
    """Builds ``input_ids, values, attention_mask, total_counts, decoder_values, decoder_input_ids, labels,
    cell_index, cell_type_ids``.

    gene_token_ids: (G,) vocab id of every store gene column. Returns ``(batch, slot_genes)`` like `ScGPTCollator`
    (slot_genes (B, L): store gene column of each encoder slot, -1 at padding).
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

    def __post_init__(self):
        self.gene_token_ids = np.asarray(self.gene_token_ids, dtype=np.int64)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    def __call__(self, rows: CellRows, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        n_cells, n_genes = len(rows), len(self.gene_token_ids)
        decoder = np.zeros((n_cells, n_genes), dtype=np.float32)
        labels = np.full((n_cells, n_genes), IGNORE_INDEX, dtype=np.float32)
        totals = np.zeros((n_cells, 2), dtype=np.float32)
        encoder = []
        for b in range(n_cells):
            cols, counts = rows.row(b)
            raw_total = float(counts.sum())
            if self.downsample_prob > 0 and rng.random() < self.downsample_prob:
                frac = rng.uniform(self.downsample_min_fraction, 1.0)
                counts = rng.binomial(counts.astype(np.int64), frac).astype(np.float32)
                keep = counts > 0
                cols, counts = cols[keep], counts[keep]
            values = normalize_log1p(counts, target_sum=self.target_sum)
            totals[b] = (np.log10(max(raw_total, 1.0)), np.log10(max(float(counts.sum()), 1.0)))
            decoder[b, cols] = values
            masked = choose_masked(len(cols), self.mask_ratio, rng)
            labels[b, cols[masked]] = values[masked]
            decoder[b, cols[masked]] = self.mask_value
            unmasked = np.ones(len(cols), dtype=bool)
            unmasked[masked] = False
            enc_cols, enc_vals = cols[unmasked], values[unmasked]
            if len(enc_cols) > self.max_seq_len:
                keep = np.sort(rng.choice(len(enc_cols), size=self.max_seq_len, replace=False))
                enc_cols, enc_vals = enc_cols[keep], enc_vals[keep]
            encoder.append((enc_cols, enc_vals))

        seq_len = self.max_seq_len if self.pad_to_max_len else max(1, max((len(c) for c, _ in encoder), default=1))
        input_ids = np.full((n_cells, seq_len), self.pad_id, dtype=np.int64)
        values = np.full((n_cells, seq_len), self.pad_value, dtype=np.float32)
        slot_genes = np.full((n_cells, seq_len), -1, dtype=np.int64)
        for b, (cols, vals) in enumerate(encoder):
            input_ids[b, :len(cols)] = self.gene_token_ids[cols]
            values[b, :len(cols)] = vals
            slot_genes[b, :len(cols)] = cols
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "values": torch.from_numpy(values),
            "attention_mask": torch.from_numpy(slot_genes >= 0),
            "total_counts": torch.from_numpy(totals),
            "decoder_values": torch.from_numpy(decoder),
            # same row for every cell: an expanded view, so workers ship G ids, not B x G
            "decoder_input_ids": torch.from_numpy(self.gene_token_ids).expand(n_cells, n_genes),
            "labels": torch.from_numpy(labels),
            "cell_index": torch.from_numpy(np.asarray(rows.cell_index, dtype=np.int64)),
            "cell_type_ids": torch.from_numpy(np.asarray(rows.cell_type, dtype=np.int64)),
        }
        return batch, slot_genes
