"""Helpers of the tests that start launchers in subprocesses (imported as a top-level module: tests/ is on sys.path)."""
from __future__ import annotations

import json
import os
import random
import socket
import sys


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for --master_port, an mlflow server), chosen below Linux's ephemeral
    range (32768-60999): the kernel hands ports of that range to every outgoing connection, so one found free there
    can be taken by another test's client socket before the launched process binds it (EADDRINUSE under xdist)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in [20000, 32000)")


def launch_env(**extra) -> dict:
    """The environment of a launched run: one thread per rank, no telemetry, unbuffered output, and none of the
    rank variables an in-process engine test may have set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def launch_cmd(script: str, args: list[str], ranks: int = 1, launcher: bool | None = None) -> list[str]:
    """The command that runs a launcher script: under the `deepspeed` launcher (its own free --master_port,
    --num_gpus when ranks > 1) or, with launcher=False, as a plain python process (1 rank). launcher=None: the
    deepspeed launcher exactly when ranks > 1."""
    if launcher is None:
        launcher = ranks > 1
    if not launcher:
        return [sys.executable, script, *args]
    ds = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [ds, "--master_port", str(free_port())] + (["--num_gpus", str(ranks)] if ranks > 1 else []) + [
        script, *args]


def read_metrics(out: str) -> list[dict]:
    """The run's metrics.jsonl lines ([] before it exists; a line still being written is left out)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(x) for x in fh if x.strip().endswith("}")]
