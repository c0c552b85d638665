#!/usr/bin/env python
"""AUCell throughput and peak memory: grnformer_ds.grn.aucell vs pySCENIC's `aucell` on the same synthetic input.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_aucell.py --cells 200000 --genes 20000 --regulons 500 \
        --workers 1 2 --pyscenic-cells 2000

Input: synthetic scRNA-like counts (each cell has `--nnz-per-cell` expressed genes drawn with a skewed gene
popularity, geometric counts ⇒ many ties), regulons of 10–300 targets (log-uniform, like pySCENIC regulons).
Ours streams `--cells` cells in blocks of `--block-size` (the blocks are generated once and cycled, so the number
measures scoring, not data generation or disk reads). pySCENIC gets a dense DataFrame of `--pyscenic-cells` cells
(it ranks a dense cells × genes matrix). Each configuration runs in its own process; its peak RSS (the process plus
its largest worker) is reported. The first block of ours is checked against pySCENIC before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp


def synthetic_block(n_cells: int, n_genes: int, nnz_per_cell: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.0, n_genes) + 1e-3
    popularity /= popularity.sum()
    rows, cols = [], []
    for i in range(n_cells):
        k = int(np.clip(rng.normal(nnz_per_cell, nnz_per_cell / 4), 10, n_genes // 2))
        cols.append(rng.choice(n_genes, size=k, replace=False, p=popularity))
        rows.append(np.full(k, i))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    vals = rng.geometric(0.6, size=len(rows)).astype(np.float32)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_cells, n_genes))


def synthetic_regulons(n_genes: int, n_regulons: int, seed: int):
    rng = np.random.default_rng(seed + 1)
    sizes = np.exp(rng.uniform(np.log(10), np.log(300), n_regulons)).astype(int)
    members = [np.sort(rng.choice(n_genes, size=s, replace=False)) for s in sizes]
    indptr = np.r_[0, np.cumsum(sizes)]
    return indptr, np.concatenate(members)


def peak_rss_mb() -> float:
    """Peak RSS of this process + its largest finished child (worker pools), MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024


def input_blocks(a, cells: int) -> list[sp.csr_matrix]:
    """The benchmark input: `--distinct-blocks` generated blocks cycled up to `cells` rows (same for both tools)."""
    pool = [synthetic_block(a.block_size, a.genes, a.nnz_per_cell, a.seed + i) for i in range(a.distinct_blocks)]
    n_blocks = -(-cells // a.block_size)
    last = cells - (n_blocks - 1) * a.block_size
    return [pool[i % len(pool)] if i < n_blocks - 1 else pool[i % len(pool)][:last] for i in range(n_blocks)]


def child_ours(a) -> dict:
    from grnformer_ds.grn.aucell import RegulonMatrix, aucell_stream

    indptr, members = synthetic_regulons(a.genes, a.regulons, a.seed)
    regs = RegulonMatrix.from_csr(indptr, members, a.genes)
    blocks = input_blocks(a, a.cells)  # list of references to the few distinct blocks: no memory growth
    t0 = time.perf_counter()
    n = checksum = 0
    for auc in aucell_stream(blocks, regs, seed=a.seed, n_workers=a.workers):
        n += auc.shape[0]
        checksum += float(auc.sum())
    secs = time.perf_counter() - t0
    return {"impl": "grnformer_ds", "workers": a.workers, "cells": n, "seconds": secs, "cells_per_s": n / secs,
            "peak_rss_mb": peak_rss_mb(), "checksum": checksum}


def child_pyscenic(a) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import pandas as pd
    from ctxcore.genesig import GeneSignature
    from pyscenic.aucell import aucell

    indptr, members = synthetic_regulons(a.genes, a.regulons, a.seed)
    genes = [f"g{i}" for i in range(a.genes)]
    sigs = [GeneSignature(name=f"r{r}", gene2weight={genes[g]: 1.0 for g in members[indptr[r]:indptr[r + 1]]})
            for r in range(a.regulons)]
    X = sp.vstack(input_blocks(a, a.cells), format="csr")
    frame = pd.DataFrame(X.toarray(), columns=genes)
    del X
    aucell(frame.iloc[:50], sigs[:2], seed=a.seed, num_workers=1)  # numba JIT compile outside the timing
    t0 = time.perf_counter()
    auc = aucell(frame, sigs, seed=a.seed, num_workers=a.workers)
    secs = time.perf_counter() - t0
    return {"impl": "pyscenic", "workers": a.workers, "cells": a.cells, "seconds": secs,
            "cells_per_s": a.cells / secs, "peak_rss_mb": peak_rss_mb(), "checksum": float(auc.to_numpy().sum())}


def child_check(a) -> dict:
    """Our AUCell equals pySCENIC's on one block of the benchmark input."""
    import warnings

    warnings.filterwarnings("ignore")
    import pandas as pd
    from ctxcore.genesig import GeneSignature
    from pyscenic.aucell import aucell

    from grnformer_ds.grn.aucell import RegulonMatrix
    from grnformer_ds.grn.aucell import aucell as ours

    indptr, members = synthetic_regulons(a.genes, a.regulons, a.seed)
    genes = [f"g{i}" for i in range(a.genes)]
    X = input_blocks(a, 200)[0]
    sigs = [GeneSignature(name=f"r{r}", gene2weight={genes[g]: 1.0 for g in members[indptr[r]:indptr[r + 1]]})
            for r in range(min(a.regulons, 50))]
    frame = pd.DataFrame(X.toarray(), columns=genes)
    ref = aucell(frame, sigs, seed=a.seed, num_workers=1).loc[frame.index, [s.name for s in sigs]].to_numpy()
    regs = RegulonMatrix.from_csr(indptr[:len(sigs) + 1], members[:indptr[len(sigs)]], a.genes)
    diff = float(np.abs(ours(X, regs, seed=a.seed) - ref).max())
    return {"impl": "check", "max_abs_diff_vs_pyscenic": diff}


def run_child(mode: str, a, cells: int, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, "--cells", str(cells), "--genes", str(a.genes),
           "--regulons", str(a.regulons), "--nnz-per-cell", str(a.nnz_per_cell), "--block-size", str(a.block_size),
           "--distinct-blocks", str(a.distinct_blocks), "--seed", str(a.seed), "--workers", str(workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--regulons", type=int, default=500)
    p.add_argument("--nnz-per-cell", type=int, default=2000)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--distinct-blocks", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pyscenic-cells", type=int, default=2000, help="0 skips pySCENIC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-cells", type=int, default=1_000_000, help="extrapolate to this many cells")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", choices=("ours", "pyscenic", "check"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        a.workers = a.workers[0]
        fn = {"ours": child_ours, "pyscenic": child_pyscenic, "check": child_check}[a._child]
        print(json.dumps(fn(a)))
        return
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                          f"(load avg {os.getloadavg()[0]:.1f})",
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "input": {"genes": a.genes, "regulons": a.regulons, "nnz_per_cell": a.nnz_per_cell,
                         "block_size": a.block_size}, "runs": []}
    if a.pyscenic_cells:
        results["check"] = run_child("check", a, 200, 1)
        print(f"correctness: max |ours - pySCENIC| = {results['check']['max_abs_diff_vs_pyscenic']:.2e}", flush=True)
    for w in a.workers:
        results["runs"].append(run_child("ours", a, a.cells, w))
        print(json.dumps(results["runs"][-1]), flush=True)
    if a.pyscenic_cells:
        for w in a.workers:
            results["runs"].append(run_child("pyscenic", a, a.pyscenic_cells, w))
            print(json.dumps(results["runs"][-1]), flush=True)
        for w in a.workers:  # ours on exactly pySCENIC's input size
            results["runs"].append({**run_child("ours", a, a.pyscenic_cells, w), "note": "same cells as pySCENIC"})
            print(json.dumps(results["runs"][-1]), flush=True)
    print(f"\n{'impl':<14}{'workers':>8}{'cells':>10}{'seconds':>10}{'cells/s':>10}{'peak MiB':>10}"
          f"   extrapolated to {a.target_cells:,} cells")
    for r in results["runs"]:
        hours = a.target_cells / r["cells_per_s"] / 3600
        print(f"{r['impl']:<14}{r['workers']:>8}{r['cells']:>10}{r['seconds']:>10.1f}{r['cells_per_s']:>10.0f}"
              f"{r['peak_rss_mb']:>10.0f}   {hours:.2f} h")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
