"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` (the BERT/scGPT recipe), and what
happens to it when a run is resumed with other schedule settings.

A schedule is a list of segments. A fresh run has one: warmup from 0 to `lr`, cosine to the floor at `max_steps`.
`--resume` with a different `--max-steps`, `--lr`, `--warmup-steps` or `--min-lr-ratio` appends a segment that
starts at the resume step from the LR the run had there, so the curve stays continuous instead of jumping to the
new curve's value at that step (extending a 100-step run to 200 steps at step 20 would otherwise jump from 3e-4 to
1.65e-3): while the new warmup is unfinished, linearly to the new peak and then the new cosine; otherwise a cosine
from the current LR to the new floor at the new `max_steps`. The segments are saved in every checkpoint, so a later
resume continues the same curve.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): 0 → 1 linearly over `warmup_steps`, then a half cosine
    from 1 to `min_lr_ratio` at `max_steps`, flat afterwards."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


@dataclass(frozen=True)
class Segment:
    """The schedule from `start_step` on. `start_lr` None: a fresh run's warmup from 0; else the LR at `start_step`
    that the segment continues from."""

    lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    start_step: int = 0
    start_lr: float | None = None

    def settings(self) -> tuple:
        return self.lr, self.warmup_steps, self.max_steps, self.min_lr_ratio

    def lr_at(self, step: int) -> float:
        if self.start_lr is None:
            return self.lr * warmup_cosine_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        s0, a, floor = self.start_step, self.start_lr, self.min_lr_ratio * self.lr
        if s0 < self.warmup_steps:  # the new warmup is unfinished: straight to the peak, reached where it starts
            if step < self.warmup_steps:
                return a + (self.lr - a) * (step - s0) / (self.warmup_steps - s0)
            return self.lr * warmup_cosine_factor(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return _cosine(a, floor, (step - s0) / max(1, self.max_steps - s0))


class LRSchedule:
    """The run's LR as a function of the optimizer step (module docstring)."""

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a schedule needs at least one segment")
        self.segments = list(segments)

    @classmethod
    def warmup_cosine(cls, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> "LRSchedule":
        return cls([Segment(lr, warmup_steps, max_steps, min_lr_ratio)])

    @property
    def peak_lr(self) -> float:
        """The LR the optimizer was built with: what `LambdaLR`'s factors are relative to."""
        return self.segments[-1].lr

    def lr_at(self, step: int) -> float:
        seg = self.segments[0]
        for s in self.segments[1:]:
            if step >= s.start_step:
                seg = s
        return seg.lr_at(step)

    def state_dict(self) -> list[dict]:
        return [asdict(s) for s in self.segments]

    @classmethod
    def from_state(cls, state: list[dict]) -> "LRSchedule":
        return cls([Segment(**s) for s in state])

    def continue_from(self, saved: "LRSchedule", step: int) -> str | None:
        """Make this (the current settings') schedule continue `saved` at `step`; a one-line note when it changed."""
        new = self.segments[-1]
        old = saved.segments[-1]
        if new.settings() == old.settings():
            self.segments = list(saved.segments)
            return None
        names = ("lr", "warmup_steps", "max_steps", "min_lr_ratio")
        changed = ", ".join(f"{n} {o:g} → {v:g}" for n, o, v in zip(names, old.settings(), new.settings()) if o != v)
        start = saved.lr_at(step)
        self.segments = list(saved.segments) + [Segment(*new.settings(), start_step=step, start_lr=start)]
        return (f"the LR schedule changed on resume ({changed}): the LR continues from {start:.3g} at step {step} "
                f"to {self.lr_at(new.max_steps):.3g} at step {new.max_steps}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepped once per optimizer step (DeepSpeed steps it at each accumulation boundary). Its factors
    read `schedule` when called, so a resume can extend the schedule after the engine exists (Trainer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_at(step) / schedule.peak_lr)
