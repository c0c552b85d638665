"""Loader scaling: ready-to-train batches (scGPT tokenization + both graph scales + edge perturbation) from
`StreamingCellDataset` through `StatefulCellLoader` with 0..N DataLoader workers, wall-clock cells/s.

For a many-core host (a GPU node): it generates a synthetic collection with `bench_loader`'s generators (5,000 genes,
~1,000 nonzeros per cell, 300 regulons with 30 % active per cell), builds the store with `build_store`, adds synthetic
GRN assets, then times each worker count after 3 warm-up batches (worker start-up excluded). ``lanes`` is set to
``max(4, workers)`` so that every worker reads its own blocks.

Usage::

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_loader_scaling.py --n-cells 60000 --workers 0 2 4 8 12
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_loader  # noqa: E402  (the generators)

from grnformer_ds.data import StatefulCellLoader, StreamingCellDataset  # noqa: E402
from grnformer_ds.errors import cli_main  # noqa: E402
from grnformer_ds.store import build_store  # noqa: E402


def prepare(work: Path, n_cells: int, build_workers: int) -> Path:
    store = work / "store"
    if not (store / "grn").exists():
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        bench_loader.make_h5ad(work / "cells.h5ad", n_cells, 5000, 1000, 0)
        t1 = time.perf_counter()
        build_store([str(work / "cells.h5ad")], store, cell_type_key="cell_type", overwrite=True, progress=False,
                    workers=build_workers)
        t2 = time.perf_counter()
        bench_loader.make_grn(store, 300, 0)
        print(json.dumps({"cells": n_cells, "h5ad_s": round(t1 - t, 1), "build_store_s": round(t2 - t1, 1)}),
              flush=True)
    return store


def measure(store: Path, workers: int, batches_per_worker: int, batch_size: int) -> dict:
    ds = StreamingCellDataset(store, batch_size=batch_size, seed=workers, eval_fraction=0.0, edge_perturbation=0.2,
                              lanes=max(4, workers))
    loader = StatefulCellLoader(ds, num_workers=workers, prefetch_factor=4 if workers else None)
    n_batches = min(batches_per_worker * max(workers, 1), len(ds) - 3)
    it = iter(loader)
    for _ in range(3):
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(n_batches):
        next(it)
        n += 1
    wall = time.perf_counter() - t
    del it
    return {"workers": workers, "batches": n, "cells_per_s": round(n * batch_size / wall),
            "per_worker": round(n * batch_size / wall / max(workers, 1))}


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/grnformer_scaling")
    p.add_argument("--n-cells", type=int, default=60000)
    p.add_argument("--build-workers", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8, 12])
    p.add_argument("--batches-per-worker", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    store = prepare(Path(args.work), args.n_cells, args.build_workers)
    rows = []
    for w in args.workers:
        rows.append(measure(store, w, args.batches_per_worker, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
