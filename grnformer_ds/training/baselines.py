"""Two trivial predictors scored beside every held-out loss, so a run shows whether the model learned more than gene
identity: predict the training targets' global mean, and predict each gene's own training mean.

A masked-value model that only learns which gene sits at a position reaches the per-gene baseline; one that learned
nothing at all sits at the global one. Both are fitted once, before training, on the targets (the `labels` at masked
positions, in the backbone's own value space: scGPT's bins, scFoundation's log1p values) of the first batches of the
training split, read through a separate loader (the run's own data position is untouched), summed over ranks so that
every rank holds the same means. The gene of a label is the token id aligned with it: `input_ids` (scGPT, scPaLM;
padded or packed) or `decoder_input_ids` (scFoundation's all-gene decoder). A gene never seen in those batches is
predicted by the global mean.
"""
from __future__ import annotations

from typing import Iterable

import torch

IGNORE = -100.0


def masked_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(gene token ids (N,) int64, targets (N,) float32) of a batch's masked positions."""
    labels = batch["labels"]
    dec_ids, dec_values = batch.get("decoder_input_ids"), batch.get("decoder_values")
    if dec_ids is not None and dec_values is not None and labels.shape == dec_values.shape:
        ids = dec_ids if dec_ids.dim() == 2 else dec_ids.unsqueeze(0).expand_as(labels)
    else:
        ids = batch["input_ids"]
    keep = labels != IGNORE
    return ids[keep].to(torch.int64), labels[keep].to(torch.float32)


class TrivialBaselines:
    """Global and per-gene means of training targets (module docstring); `score` gives their squared errors."""

    def __init__(self, vocab_size: int):
        self.sums = torch.zeros(vocab_size, dtype=torch.float64)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64)
        self.global_mean = 0.0
        self.gene_mean = torch.zeros(vocab_size, dtype=torch.float32)

    def update(self, batch: dict) -> None:
        ids, y = masked_targets(batch)
        self.sums.index_add_(0, ids.cpu(), y.cpu().double())
        self.counts.index_add_(0, ids.cpu(), torch.ones_like(y, dtype=torch.float64).cpu())

    def finish(self, reduce=None) -> "TrivialBaselines":
        """Turn the sums into means; `reduce(tensor) -> tensor` sums them over ranks first (all-reduce)."""
        stacked = torch.stack([self.sums, self.counts])
        if reduce is not None:
            stacked = reduce(stacked)
        sums, counts = stacked[0], stacked[1]
        total = float(counts.sum())
        self.global_mean = float(sums.sum()) / total if total else 0.0
        self.gene_mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, self.global_mean)
                                     ).float()
        self.n_targets = int(total)
        return self

    def fit(self, batches: Iterable[dict], n_batches: int, reduce=None) -> "TrivialBaselines":
        for i, batch in enumerate(batches):
            if i >= n_batches:
                break
            self.update(batch)
        return self.finish(reduce)

    def score(self, batch: dict) -> tuple[float, float, int]:
        """(summed squared error of the global mean, of the per-gene means, number of masked positions)."""
        ids, y = masked_targets(batch)
        ids, y = ids.cpu(), y.cpu()
        sse_global = float(((y - self.global_mean) ** 2).sum())
        sse_gene = float(((y - self.gene_mean[ids]) ** 2).sum())
        return sse_global, sse_gene, int(y.numel())
