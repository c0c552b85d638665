"""What every benchmark report starts with (the machine, the date) and how it is written, for the scripts in this
folder (they run as files, so this folder is on sys.path)."""
from __future__ import annotations

import json
import os
import platform
import time


def machine_info(**extra) -> dict:
    """date (UTC wall clock, minutes), platform, CPU count, torch version and threads, plus `extra`."""
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}


def write_report(report: dict, out: str | None, show: bool = False) -> None:
    """Print the report as JSON when `show`; write it to `out` when given."""
    if show:
        print(json.dumps(report, indent=1))
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=1)
