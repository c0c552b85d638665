"""What a pretraining run prints: one line per phase on rank 0; the libraries' chatter only with `--verbose`.

Without `--verbose`: DeepSpeed is told it runs on the CPU when there is no GPU (its auto-detection prints "Setting
accelerator to CPU" in every rank otherwise), MLflow's and transformers' INFO logs and progress bars are off,
deprecation warnings from the libraries are hidden, and calls that print on their own (DeepSpeed's checkpoint
consolidation in the export) run with their output discarded. Our own warnings are printed either way.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Iterator


def quiet_libraries(verbose: bool) -> None:
    """Call before DeepSpeed is imported (the accelerator choice happens at its import)."""
    if verbose:
        return
    if "DS_ACCELERATOR" not in os.environ and "deepspeed" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # what its auto-detection would pick, without the warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # "Creating initial MLflow database tables...": MLflow sets its loggers' level from this at import
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextlib.contextmanager
def muted(verbose: bool) -> Iterator[None]:
    """Discard what the enclosed library calls print (stdout and stderr), unless `verbose`. Exceptions still
    propagate, so a failure is reported by whoever catches it."""
    if verbose:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
