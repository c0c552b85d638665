"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` (the BERT/scGPT recipe)."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): 0 → 1 linearly over `warmup_steps`, then a half cosine
    from 1 to `min_lr_ratio` at `max_steps`, flat afterwards."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepped once per optimizer step (DeepSpeed steps it at each accumulation boundary); its
    state_dict is saved inside the DeepSpeed checkpoint, so a resumed run continues the same curve."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, max_steps, min_lr_ratio))
