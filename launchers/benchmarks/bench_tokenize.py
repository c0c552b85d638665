"""Tokenization throughput (cells per CPU-second) of the backbones' registered collators on ready batches.

Reads ``--n-batches`` raw batches (`CellRows`) from an existing store once, then times only the collator calls with
``time.process_time()`` (CPU time: the machine may be shared). Run with OMP_NUM_THREADS=1::

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_tokenize.py --store /tmp/grnformer_bench/store
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="/tmp/grnformer_bench/store")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the batches (best is reported)")
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--backbones", nargs="+", default=["scgpt", "scfoundation", "scpalm"])
    args = p.parse_args()

    from grnformer_ds.data import StreamingCellDataset, get_collator

    ds = StreamingCellDataset(args.store, batch_size=args.batch_size, seed=0, eval_fraction=0.0, graphs=False)
    plan = ds.plan()
    batches = [ds._rows(plan, plan.step_cells(s)) for s in range(args.n_batches)]
    n_cells = sum(len(r) for r in batches)
    nnz = sum(int(r.indptr[-1] - r.indptr[0]) for r in batches)
    collators = {name: get_collator(name).for_store(ds.reader, max_seq_len=args.max_seq_len)
                 for name in args.backbones}
    print(f"{len(batches)} batches x {args.batch_size} cells, {nnz / n_cells:.0f} nonzeros/cell")
    for name in args.backbones:
        collate = collators[name]
        collate(batches[0], np.random.default_rng(0))  # warm-up (numba cache load)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.process_time()
            for i, rows in enumerate(batches):
                collate(rows, np.random.default_rng(i))
            best = min(best, time.process_time() - t0)
        print(f"{name:13s} {n_cells / best:10,.0f} cells/CPU-s  ({best / len(batches) * 1e3:.2f} ms/batch)")


if __name__ == "__main__":
    main()
