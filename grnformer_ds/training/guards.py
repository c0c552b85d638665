"""Training guards: skip non-finite losses (and stop after too many in a row), out-of-memory hints."""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """Raised when `max_consecutive` losses in a row were NaN/Inf: the run cannot recover by skipping."""


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-batch's loss is usable.

    A rank that skips backward while another does not would hang ZeRO's collective reductions, so the verdict is
    all-reduced (MAX of a 0/1 flag) when a process group is up.
    """

    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def is_finite(self, loss: torch.Tensor) -> bool:
        """True when `loss` (any shape) is finite on every rank. Counts and raises after too many in a row."""
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() == 0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite (NaN/Inf) losses in a row (limit --max-nonfinite "
                f"{self.max_consecutive}); stopping. Lower --lr, use --precision fp32 or check the data.")
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))


def params_are_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of `module` is finite on every rank.

    Under ZeRO-3 a rank holds only its partition (`param.ds_tensor`); the full `param.data` is an empty
    placeholder, so the partition is what is checked.
    """
    bad = torch.zeros(1)
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not torch.isfinite(t).all():
            bad.fill_(1.0)
            break
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = next(module.parameters()).device
        bad = bad.to(dev if dev.type != "meta" else "cpu")
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def oom_hint(micro_batch_size: int, zero_stage: int, max_len: int | None = None,
             max_tokens: int | None = None) -> str:
    """One line of advice printed when a step runs out of memory (`max_tokens`: the packed layout's budget)."""
    size = f"--max-tokens (now {max_tokens})" if max_tokens else f"--micro-batch-size (now {micro_batch_size})"
    tips = [f"lower {size} and raise --grad-accum to keep the global batch"]
    if max_len:
        tips.append(f"lower the model's max sequence length (now {max_len})")
    if zero_stage < 3:
        tips.append("use ds_configs/zero3.json (parameters partitioned across GPUs)")
    tips.append("use ds_configs/zero3_offload.json (optimizer and parameters in CPU memory)")
    return "out of memory: " + "; ".join(tips)

