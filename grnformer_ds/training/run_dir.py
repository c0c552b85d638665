"""Where a pretraining run writes: the `--output-dir` the user named, or a fresh run directory.

With no `--output-dir`, every run gets `<runs root>/<YYYYMMDD-HHMMSS>` (root `runs/demo` for the demo,
`runs/pretrain` otherwise) and `<runs root>/latest` is a relative symlink to the newest one, so the card's command
can be repeated as written (HF's `runs/<date>` convention) and `--resume` alone continues the latest run. An explicit
`--output-dir` is taken as it is (the trainer refuses one holding another run's checkpoints unless told).

Rank 0 chooses and creates the directory; the other ranks receive its name (they may start a second later and would
otherwise pick another timestamp).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch.distributed as dist

LATEST = "latest"


@dataclass(frozen=True)
class RunDir:
    """`path`: the run's directory. `root`: the runs root when the directory was chosen here, else None.
    `how`: what happened, for the first lines the command prints."""

    path: str
    root: str | None
    how: str

    @property
    def automatic(self) -> bool:
        return self.root is not None


def latest_run(root: str) -> str | None:
    """`root/<name>` that `root/latest` points to, None when there is none (or the link is dangling)."""
    link = os.path.join(root, LATEST)
    if not os.path.islink(link):
        return None
    target = os.path.join(root, os.readlink(link))
    return os.path.normpath(target) if os.path.isdir(target) else None


def _point_latest(root: str, name: str) -> None:
    """Replace `root/latest` atomically (a symlink renamed over the old one)."""
    tmp = os.path.join(root, f".{LATEST}.{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(root, LATEST))


def create_run_dir(root: str, now: float | None = None) -> str:
    """Create `root/<YYYYMMDD-HHMMSS>` (suffix `-2`, `-3`, … when that name exists), point `latest` at it."""
    os.makedirs(root, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            os.mkdir(os.path.join(root, name))
        except FileExistsError:
            continue
        _point_latest(root, name)
        return os.path.join(root, name)
    raise RuntimeError(f"{root}: could not create a run directory for {stamp}")


def choose_run_dir(output_dir: str | None, root: str, resume: bool, is_main: bool = True) -> RunDir:
    """The run directory (see the module docstring). Collective when torch.distributed is initialised."""
    if output_dir is not None:
        return RunDir(output_dir, None, "")
    chosen = None
    if is_main:
        previous = latest_run(root) if resume else None
        if previous is not None:
            chosen = RunDir(previous, root, f"continues {os.path.join(root, LATEST)}")
        else:
            path = create_run_dir(root)
            how = (f"new: no earlier run under {root} to resume" if resume else
                   f"new; {os.path.join(root, LATEST)} points to it, --resume continues it")
            chosen = RunDir(path, root, how)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [chosen]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen
