#!/usr/bin/env python
"""Benchmark: build_store.py vs bionemo-scdl's convert_h5ad_to_scdl on the same synthetic h5ad collection.

Generates N cells × G genes (~K nonzeros per cell, integer counts, CSR) split over F files, written with h5py in
row blocks (so generating 1M cells needs little memory), then runs each converter as a subprocess and reports
wall time (including a final `sync` of its output), cells/s and peak RSS (the process tree's summed RSS, sampled
with psutil every 0.1 s). Tools run in alternating order per worker count.

    python launchers/benchmarks/bench_build_store.py --cells 200000 --files 4 --workers 2 --work /tmp/bench
    python launchers/benchmarks/bench_build_store.py --cells 100000 200000 --tools ours   # RSS vs input size

Not a test; needs the `bench` extra (bionemo-scdl, psutil). Results: a JSON line per run and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]


def write_synthetic_h5ad(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int,
                         block: int = 20_000) -> int:
    """CSR h5ad written block by block with h5py (anndata's on-disk layout); returns the number of nonzeros."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obs = pd.DataFrame(index=[f"f{seed}_c{i}" for i in range(n_cells)])
        obs["cell_type"] = pd.Categorical(rng.choice([f"type{i}" for i in range(8)], n_cells))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)]))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        kw = dict(chunks=(1 << 20,), maxshape=(None,))
        data = X.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
        indices = X.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        nnz = 0
        for r0 in range(0, n_cells, block):
            r1 = min(n_cells, r0 + block)
            # K random genes per cell, sorted; duplicates removed (so ~K·(1 - K/2G) nonzeros per cell)
            cols = np.sort(rng.integers(0, n_genes, size=(r1 - r0, nnz_per_cell), dtype=np.int32), axis=1)
            keep = np.ones_like(cols, dtype=bool)
            keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
            row_len = keep.sum(1)
            idx = cols[keep]
            vals = (1 + rng.geometric(0.5, size=idx.size)).astype(np.float32)
            data.resize((nnz + idx.size,))
            indices.resize((nnz + idx.size,))
            data[nnz:] = vals
            indices[nnz:] = idx
            indptr[r0 + 1:r1 + 1] = nnz + np.cumsum(row_len)
            nnz += idx.size
        X.create_dataset("indptr", data=indptr)
    return nnz


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                break
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._halt.set()


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd`, sampling its RSS. The page cache is flushed before (not timed: the previous step's dirty pages,
    e.g. the freshly generated inputs, must not be written back on this tool's clock) and after (timed: each tool
    pays for making its own output durable)."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(p.pid)
    sampler.start()
    out, _ = p.communicate()
    os.sync()
    wall = time.perf_counter() - t0
    sampler.stop()
    sampler.join()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({p.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_gb": sampler.peak / 2**30, "log_tail": out[-500:]}


def du_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def run_tool(tool: str, workers: int, n: int, nnz: int, files: list[str], inp: Path, work: Path, args, env,
             scdl_bin: str) -> dict:
    out = work / f"out_{tool}_w{workers}"
    if tool == "ours":
        cmd = [sys.executable, str(REPO / "data_prep" / "build_store.py"), "--out", str(out), "--quiet",
               "--workers", str(workers), "--shard-size", str(args.shard_size), "--cell-type-key", "cell_type", *files]
    else:
        cmd = [scdl_bin, "--data-path", str(inp), "--save-path", str(out), "--num-workers", str(workers),
               "--use-X-not-raw"]
        if tool == "scdl-paginated":
            cmd += ["--paginated-load-cutoff", "0", "--load-block-row-size", "50000"]
    res = run_measured(cmd, env)
    row = {"tool": tool, "cells": n, "genes": args.genes, "nnz": nnz, "files": args.files, "workers": workers,
           "wall_s": round(res["wall_s"], 1), "cells_per_s": round(n / res["wall_s"]),
           "peak_rss_gb": round(res["peak_rss_gb"], 2), "output_gb": round(du_gb(out), 2),
           "input_gb": round(du_gb(inp), 2), "machine": f"{platform.node()} {os.cpu_count()} cpu",
           "load_avg_1m": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[200_000], help="collection sizes to run")
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz-per-cell", type=int, default=1_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to run each tool with")
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--tools", nargs="+", default=["ours", "scdl"], choices=["ours", "scdl", "scdl-paginated"])
    ap.add_argument("--work", default="/tmp/bench_build_store")
    ap.add_argument("--keep", action="store_true", help="keep generated inputs and outputs")
    ap.add_argument("--json", help="append result rows to this JSON-lines file")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    scdl_bin = shutil.which("convert_h5ad_to_scdl") or str(Path(sys.executable).parent / "convert_h5ad_to_scdl")
    rows = []
    for n in args.cells:
        work = Path(args.work) / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        inp = work / "inputs"
        inp.mkdir(parents=True)
        t0 = time.perf_counter()
        per = [n // args.files + (i < n % args.files) for i in range(args.files)]
        nnz = sum(write_synthetic_h5ad(inp / f"part{i}.h5ad", c, args.genes, args.nnz_per_cell, seed=i)
                  for i, c in enumerate(per))
        gen_s = time.perf_counter() - t0
        print(f"generated {n} cells, {nnz} nnz, {du_gb(inp):.2f} GB in {gen_s:.0f} s", file=sys.stderr)
        files = sorted(str(p) for p in inp.glob("*.h5ad"))
        for j, workers in enumerate(args.workers):
            for tool in (args.tools if j % 2 == 0 else args.tools[::-1]):  # alternate who runs first
                rows.append(run_tool(tool, workers, n, nnz, files, inp, work, args, env, scdl_bin))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| tool | cells | nnz | workers | wall s | cells/s | peak RSS GB | output GB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['cells']:,} | {r['nnz']:,} | {r['workers']} | {r['wall_s']} | {r['cells_per_s']:,} "
              f"| {r['peak_rss_gb']} | {r['output_gb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
