"""Helpers of the tests that start launchers in subprocesses (imported as a top-level module: tests/ is on sys.path)."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for --master_port, an mlflow server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    """The environment of a launched run: one thread per rank, no telemetry, unbuffered output, and none of the
    rank variables an in-process engine test may have set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env
