"""Early stopping on a validation metric (fine-tuning): the best evaluation so far, and when to stop.

The trainer checkpoints every evaluation that improves the metric and keeps that checkpoint from rotation; the run
ends after `patience` evaluations in a row without improvement (HF transformers' `EarlyStoppingCallback` rule, with
an improvement meaning strictly better than the best so far). Its state is saved in every checkpoint, so a resumed
run stops where an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from grnformer_ds.errors import UserInputError

MODES = ("max", "min")


@dataclass
class EarlyStopping:
    metric: str  # a key of the evaluator's metrics, e.g. "macro_f1"
    mode: str = "max"  # "max": higher is better
    patience: int | None = None  # evaluations without improvement before stopping; None = never stop early
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserInputError(f"early stopping mode must be one of {MODES}, got {self.mode!r}")
        if self.patience is not None and self.patience < 1:
            raise UserInputError(f"--patience must be >= 1, got {self.patience}")

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation at `step`; True when it is the best so far (a NaN never is)."""
        if self.metric not in metrics:
            raise KeyError(f"early stopping: the evaluation reports no {self.metric!r} ({sorted(metrics)})")
        value = float(metrics[self.metric])
        better = not math.isnan(value) and (self.best is None or (value > self.best if self.mode == "max"
                                                                   else value < self.best))
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("metric", self.metric) != self.metric or state.get("mode", self.mode) != self.mode:
            raise UserInputError(f"the checkpoint stopped early on {state.get('metric')} ({state.get('mode')}), this "
                                 f"run on {self.metric} ({self.mode}); resume with the same task settings")
        self.best, self.best_step, self.bad_evals = state.get("best"), state.get("best_step"), state.get("bad_evals", 0)
