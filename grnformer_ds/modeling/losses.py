"""Loss terms shared by the backbones' pretraining heads."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100.0


def masked_mse_loss(predictions: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
    """Squared error over positions with label != -100 (scGPT's masked_mse_loss), in float32: the mean over this
    batch's masked positions, or, with `num_items_in_batch` (transformers' name), the sum divided by it. The trainer
    passes the number of masked positions of the whole optimizer step (every accumulated micro-batch on every rank),
    so that accumulating micro-batches gives the loss (and gradient) of one step over all of them.

    Uses a where-mask instead of boolean indexing: no host sync, and ignored positions contribute exactly zero
    (also their gradient). Returns 0 (with grad) when nothing is masked.
    """
    keep = labels != IGNORE_INDEX
    diff = torch.where(keep, predictions.float() - labels.float(), torch.zeros((), device=labels.device))
    denominator = keep.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return diff.pow(2).sum() / denominator
