#!/usr/bin/env python
"""The README's demo command, timed as a new user meets it: a fresh HOME (the demo store and its GRNs are built on
first use), then a rerun; and the thread default against torch's own (one thread per core), on an idle machine and
with another process spinning on one core (the issue-12 situation).

    python launchers/benchmarks/bench_demo.py --out demo_bench.json
    python launchers/benchmarks/bench_demo.py --cases idle-default,busy-default --repeats 2

Each case runs `deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero3.json` in a scratch directory
(links to this checkout's launchers/, ds_configs/) and reports the wall time of the command, the median step time
from the run's metrics.jsonl, the thread line it printed and its final losses. "torch-default" sets
OMP_NUM_THREADS to the number of cores (what torch does when nothing says otherwise); "default" leaves it unset
(grnformer_ds's choice, training/threads.py). "busy" pins a spinning process to the first core for the whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = ["deepspeed", "launchers/pretrain.py", "--deepspeed_config", "ds_configs/zero3.json"]
CASES = ("fresh-default", "rerun-default", "idle-torch-default", "busy-default", "busy-torch-default")


def _spinner(core: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])


def run_case(case: str, scratch: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GRNFORMER_DS_CACHE")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    cores = sorted(os.sched_getaffinity(0))
    if "torch-default" in case:
        env["OMP_NUM_THREADS"] = str(len(cores))
    spin = _spinner(cores[0]) if case.startswith("busy") else None
    try:
        if spin is not None:
            time.sleep(1.0)  # let the spinner own its core before the run samples the load
        t0 = time.perf_counter()
        p = subprocess.run(COMMAND, cwd=scratch, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    if p.returncode != 0:
        raise SystemExit(f"error: {case}: the demo command failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
    run_dir = re.search(r"^run directory: (\S+)", p.stdout, re.M).group(1)
    with open(scratch / run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        m = [json.loads(x) for x in fh if x.strip()]
    threads = re.search(r"^threads: .*$", p.stdout, re.M).group(0)
    done = re.search(r"^done: .*$", p.stdout, re.M).group(0)
    return {"case": case, "wall_s": round(wall, 1), "median_step_s": round(statistics.median(
        x["step_time_s"] for x in m[5:]), 4), "threads": threads, "done": done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per case (fresh-default always starts empty)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args(argv)
    cases = a.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"error: --cases: unknown {sorted(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        scratch = Path(tmp) / "clone"
        scratch.mkdir()
        for name in ("launchers", "ds_configs", "data_prep"):
            os.symlink(REPO / name, scratch / name)
        shared = Path(tmp) / "home"  # every case but fresh-default finds the demo store built
        sys.path.insert(0, str(REPO))
        from grnformer_ds.training.integration import ensure_demo

        ensure_demo(str(shared / ".cache" / "grnformer_ds"), say=lambda line: None)
        for case in cases:
            for i in range(a.repeats):
                home = Path(tmp) / f"home-fresh-{i}" if case == "fresh-default" else shared
                home.mkdir(exist_ok=True)
                row = run_case(case, scratch, home)
                rows.append(row)
                print(f"{row['case']:<20} wall {row['wall_s']:>6.1f} s  median step {row['median_step_s']:.3f} s  "
                      f"| {row['threads']} | {row['done']}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "cores": len(os.sched_getaffinity(0)), "command": " ".join(COMMAND), "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
