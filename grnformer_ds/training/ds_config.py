"""Read a DeepSpeed JSON and resolve it against the run settings (one source of truth, no DeepSpeed import).

Rules, for `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`, `gradient_clipping` and precision:
a value given in the JSON (not "auto") and the same value given on the command line must agree, otherwise the run
is refused with one line naming both; whichever is given wins; "auto"/absent on both sides takes the default.
`train_batch_size` is always `micro * accum * world_size`; a JSON value that disagrees is refused (a JSON value
with no accumulation given anywhere sets the accumulation, as DeepSpeed itself does).

Batch layout: a micro batch size given anywhere (command line or JSON) selects padded micro-batches of that many
cells; otherwise micro-batches are token-packed (`--max-tokens`) and DeepSpeed is told a micro batch of 1 (one packed
row per micro-step: DeepSpeed only counts with it, it never looks at a batch's shape).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from grnformer_ds.errors import UserInputError, load_json_object
from grnformer_ds.training.settings import RunSettings

AUTO = "auto"


def load_ds_config(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` as a dict; a missing file or invalid JSON is a one-line `UserInputError`."""
    return load_json_object(path, "DeepSpeed config")


def _given(v: Any) -> bool:
    return v is not None and v != AUTO


def _agree(json_val: Any, cli_val: Any, json_key: str, flag: str, path: str) -> Any:
    """The one value of a setting given in the JSON and/or on the command line (None when neither)."""
    if _given(json_val) and cli_val is not None and json_val != cli_val:
        raise UserInputError(
            f'"{json_key}" is {json_val} but {flag} is {cli_val}; give it in one place (set the JSON value to "auto")',
            path)
    return cli_val if cli_val is not None else (json_val if _given(json_val) else None)


def _json_precision(cfg: dict[str, Any], path: str) -> str | None:
    """The precision the JSON explicitly asks for, None when it leaves it to the run ("auto" or absent)."""
    on = [k for k in ("bf16", "fp16") if cfg.get(k, {}).get("enabled") is True]
    if len(on) == 2:
        raise UserInputError('both "bf16" and "fp16" are enabled; enable at most one', path)
    if on:
        return on[0]
    explicit_off = all(cfg.get(k, {}).get("enabled", AUTO) is False for k in ("bf16", "fp16"))
    return "fp32" if explicit_off else None


@dataclass
class ResolvedConfig:
    """The concrete DeepSpeed dict passed to `deepspeed.initialize`, and facts the trainer needs from it."""

    ds_config: dict[str, Any]
    micro_batch_size: int
    grad_accum: int
    world_size: int
    precision: str
    zero_stage: int
    client_optimizer: bool  # True: the trainer passes torch AdamW; False: the JSON's "optimizer" block builds it
    notes: list[str] = field(default_factory=list)  # decisions the launcher should print (e.g. a precision fallback)
    packed: bool = False  # token-packed micro-batches (micro_batch_size is then DeepSpeed's bookkeeping 1)

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def resolve_ds_config(cfg: dict[str, Any], settings: RunSettings, world_size: int, path: str = "<ds_config>",
                      has_gpu: bool = False, bf16_supported: bool = True) -> ResolvedConfig:
    """Fill every "auto" of `cfg` from `settings` and check that nothing disagrees. Returns a new dict."""
    cfg = copy.deepcopy(cfg)
    if "scheduler" in cfg:
        raise UserInputError('remove the "scheduler" block: the warmup + cosine schedule is set by --lr, '
                             '--warmup-steps and --min-lr-ratio (one source of truth)', path)

    b = settings.batch
    micro = _agree(cfg.get("train_micro_batch_size_per_gpu"), b.micro_batch_size,
                   "train_micro_batch_size_per_gpu", "--micro-batch-size", path)
    packed = micro is None
    if not packed and (b.max_tokens is not None or b.pad_to_max_tokens):
        raise UserInputError(f'"train_micro_batch_size_per_gpu" is {micro}, which selects padded batches, but '
                             f'--max-tokens / --pad-to-max-tokens select packed ones; set it to "auto" to pack', path)
    accum = _agree(cfg.get("gradient_accumulation_steps"), b.grad_accum,
                   "gradient_accumulation_steps", "--grad-accum", path)
    micro = micro or 1  # packed: one packed row per micro-step
    tbs = cfg.get("train_batch_size")
    if accum is None and _given(tbs):
        if tbs % (micro * world_size):
            raise UserInputError(f'"train_batch_size" {tbs} is not a multiple of micro batch {micro} x '
                                 f'{world_size} ranks', path)
        accum = tbs // (micro * world_size)
    accum = accum or 1
    if _given(tbs) and tbs != micro * accum * world_size:
        raise UserInputError(f'"train_batch_size" is {tbs} but micro batch {micro} x accumulation {accum} x '
                             f'{world_size} ranks = {micro * accum * world_size}; set it to "auto"', path)
    for key, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(v, int) or v < 1:
            raise UserInputError(f'"{key}" must be a positive integer, got {v!r}', path)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * world_size

    clip = _agree(cfg.get("gradient_clipping"), settings.optim.grad_clip, "gradient_clipping", "--grad-clip", path)
    cfg["gradient_clipping"] = float(1.0 if clip is None else clip)

    notes: list[str] = []
    precision = _agree(_json_precision(cfg, path), settings.precision, "bf16/fp16 enabled", "--precision", path)
    if precision is None:  # nobody asked for anything: bf16 where the device has it, else a clear fallback
        precision = "bf16" if bf16_supported else "fp32"
        if not bf16_supported:
            notes.append("bf16 is not supported on this device; falling back to fp32 (--precision to choose)")
    if precision == "bf16" and not bf16_supported:
        raise UserInputError("bf16 is not supported on this device; use --precision fp32 (or fp16 on GPU)", path)
    if precision == "fp16" and not has_gpu:
        raise UserInputError("fp16 mixed precision needs a GPU; use --precision bf16 or fp32 on CPU", path)
    for key in ("bf16", "fp16"):
        block = dict(cfg.get(key, {}))
        block["enabled"] = precision == key
        cfg[key] = block

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserInputError(f'"zero_optimization.stage" must be 0, 1, 2 or 3, got {stage!r}', path)
    if not has_gpu:
        # Pinned host memory needs a CUDA context; on a CPU-only machine it is meaningless.
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(key), dict) and "pin_memory" in zero[key]:
                zero[key]["pin_memory"] = False

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        o = settings.optim
        for key, val in (("lr", o.lr), ("weight_decay", o.weight_decay), ("betas", list(o.betas)), ("eps", o.eps)):
            if params.get(key, AUTO) == AUTO:
                params[key] = val
            elif key == "lr" and params[key] != o.lr:
                raise UserInputError(f'"optimizer.params.lr" is {params[key]} but --lr is {o.lr}; set it to "auto"',
                                     path)
        if params.get("torch_adam") == AUTO:
            # DeepSpeedCPUAdam / FusedAdam are JIT-compiled C++/CUDA ops: worth it on a GPU box, a 100 s g++ build
            # for nothing on a CPU-only one.
            params["torch_adam"] = not has_gpu
    cfg.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    for key, val in cfg.items():
        if val == AUTO:
            raise UserInputError(f'"{key}" is "auto" but nothing fills it; give a value', path)
    return ResolvedConfig(ds_config=cfg, micro_batch_size=micro, grad_accum=accum, world_size=world_size,
                          precision=precision, zero_stage=int(stage), client_optimizer=opt is None,
                          notes=notes, packed=packed)
