"""What a resume on another number of ranks costs (issue 16): the plan of the rest of the interrupted epoch, and
DeepSpeed's universal conversion of a checkpoint.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_elastic.py [--cells 1000000 10000000] \
        [--ranks 64:48 8:1 1:8] [--checkpoint RUN/checkpoints/global_stepN] [--out report.json]

* plan: for an epoch of ``--cells`` cells (token counts drawn like real cells, 200-1,200 genes) interrupted half-way on
  ``before`` ranks, the seconds and peak memory one new rank spends on `elastic.resumed_plan` (the unconsumed cells of
  every old rank, then the new sections and batches), packed (16,384-token micro-batches, the GPU default of
  scGPT-base) and padded (32 cells); beside it the ordinary epoch plan of the same rank (what every epoch start costs
  anyway). Each new rank, and each of its DataLoader workers, computes it once after the resume. ``--layouts
  packed>packed8192``: the resume also changes the micro-batch (here to 8,192 tokens); ``tokens_digest_s``: the digest
  of every cell's token count a packed data position carries (once per dataset).
* checkpoint: wall seconds of `checkpoint.universal_checkpoint` (DeepSpeed's ``ds_to_universal``, what the first
  rank does once before the others load) for an existing checkpoint tag, with its size.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine_info, write_report  # noqa: E402


def _layout(spec: str, tokens: np.ndarray) -> dict:
    """``packed`` (16,384-token micro-batches), ``packedN`` (N tokens), ``padded`` (32 cells) or ``paddedN``."""
    kind, size = spec.rstrip("0123456789"), spec[len(spec.rstrip("0123456789")):]
    if kind == "packed":
        return dict(tokens=tokens, max_tokens=int(size or 16384))
    if kind == "padded":
        return dict(batch_size=int(size or 32))
    raise SystemExit(f"unknown layout {spec!r}")


def plan_case(n_cells: int, before: int, after: int, layout: str) -> dict:
    """``layout``: one layout, or ``OLD>NEW`` for a resume that also changes the micro-batch."""
    from grnformer_ds.data.elastic import resumed_plan, tokens_digest
    from grnformer_ds.data.packing import PackedEpochPlan
    from grnformer_ds.data.sampler import EpochPlan

    rng = np.random.default_rng(0)
    tokens = rng.integers(201, 1202, n_cells).astype(np.uint16)  # <cls> + 200-1,200 genes
    common = dict(seed=0, epoch=3, block_size=256, buffer_blocks=8, shuffle=True, drop_last=True, lanes=4)
    old_spec, _, new_spec = layout.partition(">")
    old_layout, new_layout = _layout(old_spec, tokens), _layout(new_spec or old_spec, tokens)

    def base(rank, world, lay):
        if "max_tokens" in lay:
            return PackedEpochPlan(0, n_cells, rank=rank, world_size=world, **lay, **common)
        return EpochPlan(0, n_cells, rank=rank, world_size=world, **lay, **common)

    t0 = time.perf_counter()
    ordinary = base(0, after, new_layout)
    t_ordinary = time.perf_counter() - t0
    old = base(0, before, old_layout)
    consumed = old.n_steps // 2
    t0 = time.perf_counter()
    plan = resumed_plan(old, [(before, consumed)], rank=0, world_size=after, lo=0, block_size=256, lanes=4,
                        **new_layout)
    t_rest = time.perf_counter() - t0
    t_digest = None
    if "packed" in layout:  # in the data position of a packed run: once per dataset
        t0 = time.perf_counter()
        tokens_digest(tokens)
        t_digest = round(time.perf_counter() - t0, 3)
    return {"cells": n_cells, "layout": layout, "ranks": f"{before}->{after}", "consumed_per_rank": consumed,
            "rest_steps": plan.n_steps, "ordinary_steps": ordinary.n_steps, "resumed_plan_s": round(t_rest, 2),
            "ordinary_plan_s": round(t_ordinary, 2), "tokens_digest_s": t_digest,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def conversion_case(tag_dir: str) -> dict:
    from grnformer_ds.training import checkpoint as ckpt

    size = sum(os.path.getsize(os.path.join(tag_dir, f)) for f in os.listdir(tag_dir))
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "checkpoints")
        os.makedirs(root)
        tag = os.path.basename(os.path.normpath(tag_dir))
        shutil.copytree(tag_dir, os.path.join(root, tag))
        t0 = time.perf_counter()
        ckpt.universal_checkpoint(root, tag)
        seconds = time.perf_counter() - t0
    return {"checkpoint": tag_dir, "checkpoint_mib": round(size / 2**20, 1), "convert_s": round(seconds, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--ranks", nargs="+", default=["64:48", "8:1", "1:8"], help="before:after pairs")
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"],
                   help="packed[N] / padded[N], or OLD>NEW: the resume also changes the micro-batch")
    p.add_argument("--checkpoint", default=None, help="a checkpoint tag folder to convert")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for n in args.cells:
        for pair in args.ranks:
            before, after = (int(x) for x in pair.split(":"))
            for layout in args.layouts:
                rows.append(plan_case(n, before, after, layout))
                print(rows[-1], flush=True)
    report = {**machine_info(), "plans": rows}
    if args.checkpoint:
        report["conversion"] = conversion_case(args.checkpoint)
        print(report["conversion"], flush=True)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
