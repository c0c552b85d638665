"""Run settings: small typed dataclasses filled from the command line (no DeepSpeed, no torch).

Batch size, accumulation, clipping and precision have ONE source of truth: a value may be given either on the
command line (these settings) or in the DeepSpeed JSON; `ds_config.resolve_ds_config` fills the JSON's "auto"
fields from the settings and refuses a run where both are given and disagree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grnformer_ds.errors import UserInputError

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class BatchSettings:
    """Per-rank micro-batch and gradient accumulation. None = take it from the DeepSpeed JSON or default.

    Two layouts: token-packed micro-batches of at most ``max_tokens`` tokens (the default: whole cells back to back,
    no padding), or padded micro-batches of ``micro_batch_size`` cells (chosen by giving a micro batch size, here or
    in the JSON). ``max_tokens`` None in the packed layout = the default budget for the device
    (`default_max_tokens`). ``pad_to_max_tokens``: pad every packed micro-batch to exactly ``max_tokens`` (static
    shapes; None = on when compiling)."""

    micro_batch_size: int | None = None
    grad_accum: int | None = None
    max_tokens: int | None = None
    pad_to_max_tokens: bool | None = None

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum", "max_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.micro_batch_size is not None and (self.max_tokens is not None or self.pad_to_max_tokens):
            raise UserInputError("--micro-batch-size selects padded batches and --max-tokens / --pad-to-max-tokens "
                                 "packed ones; give one of them")


# Cells of the longest possible length per packed micro-batch when no --max-tokens is given: on a GPU the budget
# must be large enough for the step to be compute-bound (a 512-wide model needs tens of thousands of tokens per
# step, BENCHMARKS.md); on a CPU a few cells keep a step short. A whole multiple of the longest cell also packs
# capped cells (the common case at 1,200 tokens) without a gap.
DEFAULT_CELLS_PER_PACK = {"gpu": 32, "cpu": 2}


def default_max_tokens(max_cell_tokens: int, has_gpu: bool) -> int:
    """The token budget of a packed micro-batch when none is given (see `DEFAULT_CELLS_PER_PACK`)."""
    return DEFAULT_CELLS_PER_PACK["gpu" if has_gpu else "cpu"] * int(max_cell_tokens)


@dataclass
class OptimSettings:
    """AdamW + linear warmup + cosine decay to `min_lr_ratio * lr` at `max_steps` (optimizer steps)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int | None = None  # None: 5% of max_steps (at least 1)
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None  # None: JSON value, else 1.0
    new_params_lr: float | None = None  # --init-from: peak LR of the new GRN parts (None: 10 x lr)

    def __post_init__(self):
        if not self.lr > 0:
            raise UserInputError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserInputError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserInputError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.new_params_lr is not None and not self.new_params_lr > 0:
            raise UserInputError(f"--new-params-lr must be > 0, got {self.new_params_lr}")

    def resolved_warmup(self, max_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, int(0.05 * max_steps))


@dataclass
class RunSettings:
    """Everything a pretraining run needs besides the model config and the DeepSpeed JSON."""

    output_dir: str
    data: str | None = None  # None: the embedded demo store
    max_steps: int = 200  # optimizer steps
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep_last: int = 2  # complete checkpoints kept (older ones are removed after a newer one is complete)
    log_every: int = 1
    log_cells: bool = False  # <output_dir>/cells/rank_XXXXX.jsonl: the cells of every micro-batch (trainer.py)
    seed: int = 0
    precision: str | None = None  # None: the JSON's explicit choice, else bf16
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    resume: bool = False
    resume_universal: bool = False  # load through DeepSpeed's universal checkpoint even on the same ranks
    num_workers: int = 0
    export: bool = True  # export a HF folder at the end of the run
    progress: bool = True
    compile: bool = False  # torch.compile the model (training/compile.py)
    attn_implementation: str | None = None  # None: chosen for the device and model (training/compile.py)
    mlflow_tracking_uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment_name: str = "grnformer_ds"
    run_name: str | None = None
    init_from: str | None = None  # a Hugging Face folder to start from (import_checkpoint.py / export_hf.py)
    freeze_backbone: bool = False  # with init_from: train only the GRN structure encoder, the fusion and the head
    on_save_error: str = "stop"  # a checkpoint that cannot be written: "stop" the run (exit 1) or "continue" training
    batch: BatchSettings = field(default_factory=BatchSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)

    def __post_init__(self):
        if self.on_save_error not in ("stop", "continue"):
            raise UserInputError(f"--on-save-error must be stop or continue, got {self.on_save_error!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_steps", "eval_every", "save_every", "log_every", "keep_last", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise UserInputError(f"--eval-batches must be >= 0, got {self.eval_batches}")
        if self.freeze_backbone and not self.init_from:
            raise UserInputError("--freeze-backbone needs --init-from (a pretrained backbone to keep)")
        if self.optim.new_params_lr is not None and not self.init_from:
            raise UserInputError("--new-params-lr needs --init-from (otherwise every parameter is new)")

    def to_flat_dict(self) -> dict[str, Any]:
        """Flat `{"batch.micro_batch_size": 8, ...}` view for MLflow params."""
        out: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out
