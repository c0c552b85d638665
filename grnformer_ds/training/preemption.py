"""Preemption: stop at the next optimizer-step boundary with a complete checkpoint when the cluster says so.

SLURM preempts a job with SIGTERM (then SIGKILL after its grace time), or with a chosen signal ahead of time
(`#SBATCH --signal=USR1@120`). `PreemptionHandler` catches SIGTERM and SIGUSR1 on every rank: the first one asks the
run to stop, later ones (the launcher forwarding the same signal, a second `scancel`) are noted and ignored, so a
checkpoint being written is never interrupted by them (a SIGKILL cannot be caught: the checkpoint protocol of
`checkpoint.py` then leaves the previous complete checkpoint as `latest`).

The ranks may see the signal at different moments, so after every optimizer step they agree (`should_stop`: one
all-reduce of a flag, MAX over ranks); when one rank was signalled, all of them save and leave together.
"""
from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist

SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionHandler:
    """Installed for the training loop (`install()` / `uninstall()`); `requested` once a signal arrived here."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS, say=None):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.requested = False
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict = {}
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.say(f"{name} again: already stopping at the next step boundary (a checkpoint is being written)")
            return
        self.requested, self.signal_name, self.received_at = True, name, time.time()
        self.say(f"{name} received: stopping at the next optimizer-step boundary with a checkpoint")

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): no handler
                pass
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it at the same point on all ranks)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
