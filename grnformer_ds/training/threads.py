"""torch's intra-op thread count per rank: free cores ÷ ranks on this node, unless `OMP_NUM_THREADS` says otherwise.

Why: torch starts one OpenMP thread per core. Two ranks on two cores then run four threads, and a run sharing its
cores with another process is worse: every parallel region waits for the thread whose core is taken (the issue-12
demo took 7× longer with one of two cores busy). DeepSpeed's launcher sets `OMP_NUM_THREADS` only with
`--bind_cores_to_rank`; torchrun sets 1 for several ranks. Here each rank takes its share of the cores that are
not busy with other work, at least one.

"Busy" is sampled from `/proc/stat` over `SAMPLE_S` seconds while every rank waits (the callers sample right after
a barrier, so our own ranks are idle): a core counts busy when it spent more than half of the window on other work.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

SAMPLE_S = 0.2
# Ranks on this node: set by torchrun / DeepSpeed's launcher / Open MPI for the processes they start, else SLURM's
# tasks per node (srun).
LAUNCHER_LOCAL_RANKS_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
SLURM_LOCAL_RANKS_ENV = ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int
    busy: int
    local_ranks: int
    from_env: bool

    def describe(self) -> str:
        if self.from_env:
            return f"threads: {self.threads} per rank (OMP_NUM_THREADS)"
        busy = f", {self.busy} busy with other work" if self.busy else ""
        ranks = f"{self.local_ranks} rank{'s' if self.local_ranks != 1 else ''} on this node"
        return (f"threads: {self.threads} per rank ({self.cores} cores{busy}, {ranks}; "
                f"OMP_NUM_THREADS overrides)")


def usable_cores() -> list[int]:
    """The CPUs this process may run on (cgroup/SLURM affinity), not the machine's count."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _count(name: str) -> int | None:
    head = os.environ.get(name, "").split("(")[0].split(",")[0].strip()  # SLURM writes "8(x2)" or "8,4"
    return int(head) if head.isdigit() and int(head) > 0 else None


def local_ranks(default: int = 1) -> int:
    """Ranks on this node that share this process's CPUs. SLURM tasks bound to their own `--cpus-per-task` CPUs
    (an affinity no larger than that) share nothing: 1."""
    launcher = next((n for n in map(_count, LAUNCHER_LOCAL_RANKS_ENV) if n), None)
    if launcher:
        return launcher
    per_task = _count("SLURM_CPUS_PER_TASK")
    if per_task and len(usable_cores()) <= per_task:
        return 1
    return next((n for n in map(_count, SLURM_LOCAL_RANKS_ENV) if n), default)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{cpu: (busy jiffies, total jiffies)} from /proc/stat; {} where it cannot be read."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                v = [int(x) for x in fields[:8]]
                idle = v[3] + v[4]  # idle + iowait
                out[int(name[3:])] = (sum(v) - idle, sum(v))
    except (OSError, ValueError):
        return {}
    return out


def busy_cores(cores: list[int], sample_s: float = SAMPLE_S) -> int:
    """How many of `cores` spent more than half of the next `sample_s` seconds busy (0 if /proc/stat is absent)."""
    before = _cpu_times()
    if not before:
        return 0
    time.sleep(sample_s)
    after = _cpu_times()
    busy = 0
    for c in cores:
        if c in before and c in after:
            d_busy = after[c][0] - before[c][0]
            d_total = after[c][1] - before[c][1]
            busy += int(d_total > 0 and d_busy / d_total > 0.5)
    return busy


def choose_threads(cores: int, busy: int, ranks: int) -> int:
    """Each rank's share of the free cores, at least 1 (pure, for tests)."""
    free = max(1, cores - busy)
    return max(1, free // max(1, ranks))


def apply_thread_default(ranks: int | None = None, sample: bool = True) -> ThreadChoice:
    """Set torch's intra-op threads for this rank (module docstring) and return what was chosen."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    ranks = ranks or local_ranks()
    cores = usable_cores()
    if env.isdigit() and int(env) > 0:
        torch.set_num_threads(int(env))
        return ThreadChoice(int(env), len(cores), 0, ranks, True)
    busy = busy_cores(cores) if sample else 0
    n = choose_threads(len(cores), busy, ranks)
    torch.set_num_threads(n)
    return ThreadChoice(n, len(cores), busy, ranks, False)
