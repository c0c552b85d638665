#!/usr/bin/env python
"""GPU pretraining benchmark: cells/s, non-pad tokens/s, MFU, step-time breakdown, ZeRO-3 vs plain torch.

    python launchers/benchmarks/bench_pretrain_gpu.py --preset scgpt-base --micro-batch-size 32
    python launchers/benchmarks/bench_pretrain_gpu.py --data STORE --modes zero3,torch --out bench.json

Each mode trains the same model (same seed, same batches from the real streaming loader) for --warmup + --steps
optimizer steps on ONE GPU and reports the measured steps:

* `zero3`: the trainer's path — `deepspeed.initialize` with ds_configs/zero3.json (bf16, torch AdamW fused);
* `torch`: plain PyTorch — fp32 weights, `torch.autocast(bfloat16)`, `torch.optim.AdamW(fused=True)`.

Step-time breakdown (CUDA events around module forwards, the backward and the optimizer step): data (wait for the
next batch + host→device copy), embed (gene + value encoders), backbone (transformer layers), gnn (structure encoder),
fusion (graph adapter), head (decoder + loss and the rest of the forward), backward, optimizer. MFU uses the dense
transformer FLOP estimate of grnformer_ds.training.throughput on padded tokens and the GPU's dense bf16 peak.

`--allow-cpu` runs the same code on CPU (wall-clock timers, no MFU) to smoke-test the script without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from grnformer_ds.errors import UserInputError, cli_main  # noqa: E402


class SectionTimer:
    """Accumulates per-section times for one step: CUDA events on GPU (no sync inside the step), wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list[tuple[str, object, object]] = []
        self._open: dict[int, object] = {}

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, key):
        self._open[key] = self._now()

    def stop(self, key, name: str):
        t0 = self._open.pop(key, None)
        if t0 is not None:
            self.pending.append((name, t0, self._now()))

    @contextlib.contextmanager
    def section(self, name: str):
        k = object()
        self.start(k)
        yield
        self.stop(k, name)

    def collect(self) -> dict[str, float]:
        """Seconds per section since the last collect (synchronises the GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.pending:
            out[name] += (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)
        self.pending.clear()
        return dict(out)

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda m, a: self.start(id(m)))
        module.register_forward_hook(lambda m, a, o: self.stop(id(m), name))


def instrument(model, timer: SectionTimer) -> None:
    """Time the forward of each part of GRNFormerForMaskedLM (module names of grnformer_ds.modeling)."""
    core = model.grnformer
    timer.hook(core.gene_encoder, "embed")
    timer.hook(core.value_encoder, "embed")
    for layer in core.layers:
        timer.hook(layer, "backbone")
    if core.structure_encoder is not None:
        timer.hook(core.structure_encoder, "gnn")
    if core.fusion is not None:
        timer.hook(core.fusion, "fusion")


def build(args, store_path, device, world, rank):
    from grnformer_ds.training import integration as I

    store = I.open_store(store_path)
    config = I.build_model_config(store, args.preset, None, backbone=args.backbone, use_graph=not args.no_graph)
    config._attn_implementation = args.attn
    return store, config


def batches(args, store_path, config, rank, world):
    from grnformer_ds.data import StatefulCellLoader, StreamingCellDataset

    ds = StreamingCellDataset(store_path, batch_size=args.micro_batch_size, seed=0, rank=rank, world_size=world,
                              split="all", backbone=config.backbone, graphs=bool(config.use_graph),
                              max_seq_len=args.max_seq_len, pad_to_max_len=args.pad_to_max_len,
                              drop_last=True, shuffle=True, training=True)
    loader = StatefulCellLoader(ds, num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                                prefetch_factor=4 if args.num_workers else None)
    while True:
        yield from loader


def run_mode(mode: str, args, store_path, config, info) -> dict:
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.training.throughput import batch_counts, peak_flops, train_flops

    device = info.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    timer = SectionTimer(cuda)
    instrument(model, timer)
    if mode == "zero3":
        from grnformer_ds.training import engine as E
        from grnformer_ds.training.ds_config import load_ds_config, resolve_ds_config
        from grnformer_ds.training.schedule import build_scheduler
        from grnformer_ds.training.settings import BatchSettings, RunSettings

        s = RunSettings(output_dir="/tmp", precision="bf16" if cuda else "fp32",
                        batch=BatchSettings(args.micro_batch_size, 1))
        cfg_path = os.path.join(REPO, "ds_configs", "zero3.json")
        r = resolve_ds_config(load_ds_config(cfg_path), s, info.world_size, cfg_path, has_gpu=cuda)
        engine = E.build_engine(model, r, 1e-4, 0.01, (0.9, 0.999), 1e-8,
                                lambda o: build_scheduler(o, 10, 10**6, 0.1), has_gpu=cuda)
        fwd = engine

        def backward(loss):
            engine.backward(loss)

        def step():
            engine.step()
        autocast = contextlib.nullcontext
    else:
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **({"fused": True} if cuda else {}))
        fwd = model

        def backward(loss):
            loss.backward()

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    it = batches(args, store_path, config, info.rank, info.world_size)
    peak = peak_flops(device)
    rows = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with timer.section("data"):
            batch = next(it)
            dev = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with timer.section("forward"), autocast():
            loss = fwd(**dev).loss
        with timer.section("backward"):
            backward(loss)
        with timer.section("optimizer"):
            step()
        sec = timer.collect()
        wall = time.perf_counter() - t0
        if i < args.warmup:
            continue
        cells, tokens, nonpad = batch_counts(batch)
        seq = batch["input_ids"].shape[1]
        flops = train_flops(n_params, tokens, config.num_hidden_layers, seq, config.hidden_size)
        head = sec.get("forward", 0) - sum(sec.get(k, 0) for k in ("embed", "backbone", "gnn", "fusion"))
        rows.append({"wall": wall, "cells": cells, "tokens": tokens, "nonpad": nonpad, "flops": flops, "seq": seq,
                     "head": max(head, 0.0), **sec})
    res = summarize(mode, rows, peak, n_params, config, args, device)
    if cuda:
        res["gpu_mem_max_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    fwd = model = backward = step = None  # drop every reference to the engine/optimizer before the next mode
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def summarize(mode, rows, peak, n_params, config, args, device) -> dict:
    wall = sum(r["wall"] for r in rows)
    out = {
        "mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "graphs": bool(config.use_graph), "params_m": round(n_params / 1e6, 2),
        "micro_batch": args.micro_batch_size, "mean_seq_len": round(statistics.mean(r["seq"] for r in rows), 1),
        "steps": len(rows), "step_time_ms": round(1e3 * wall / len(rows), 2),
        "cells_per_s": round(sum(r["cells"] for r in rows) / wall, 1),
        "tokens_per_s": round(sum(r["tokens"] for r in rows) / wall, 1),
        "nonpad_tokens_per_s": round(sum(r["nonpad"] for r in rows) / wall, 1),
        "mfu": round(sum(r["flops"] for r in rows) / wall / peak, 4) if peak else None,
    }
    out["breakdown_ms"] = {k: round(1e3 * sum(r.get(k, 0.0) for r in rows) / len(rows), 2)
                           for k in ("data", "embed", "backbone", "gnn", "fusion", "head", "backward", "optimizer")}
    return out


def markdown(results: list[dict]) -> str:
    cols = ["mode", "device", "preset", "graphs", "params_m", "micro_batch", "mean_seq_len", "step_time_ms",
            "cells_per_s", "nonpad_tokens_per_s", "mfu"]
    lines = ["| " + " | ".join(cols) + " | breakdown ms (data/embed/backbone/gnn/fusion/head/bwd/opt) |",
             "|" + "---|" * (len(cols) + 1)]
    for r in results:
        b = r["breakdown_ms"]
        bd = "/".join(str(b[k]) for k in ("data", "embed", "backbone", "gnn", "fusion", "head", "backward",
                                           "optimizer"))
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + f" | {bd} |")
    if len(results) == 2 and {r["mode"] for r in results} == {"zero3", "torch"}:
        z = next(r for r in results if r["mode"] == "zero3")
        t = next(r for r in results if r["mode"] == "torch")
        lines.append(f"\nZeRO-3 / plain torch throughput: {z['cells_per_s'] / t['cells_per_s']:.3f}")
    return "\n".join(lines)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="store (default: the demo store, built on first use)")
    p.add_argument("--demo-cache-dir", default=None)
    p.add_argument("--preset", default="scgpt-base")
    p.add_argument("--backbone", default=None, choices=("scgpt", "scfoundation"))
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--pad-to-max-len", action="store_true", help="pad every batch to --max-seq-len")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured steps per mode")
    p.add_argument("--modes", default="zero3,torch")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-run on CPU (no MFU)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise UserInputError("no GPU visible; this is a GPU benchmark (use --allow-cpu for a smoke run)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"zero3", "torch"}:
        raise UserInputError(f"--modes takes zero3 and/or torch, got {args.modes!r}")

    from grnformer_ds.training import engine as E
    from grnformer_ds.training import integration as I

    info = E.init_distributed(args.local_rank)
    store_path = args.data or I.ensure_demo(args.demo_cache_dir)
    _, config = build(args, store_path, info.device, info.world_size, info.rank)
    results = [run_mode(m, args, store_path, config, info) for m in modes]
    if info.is_main:
        for r in results:
            print(json.dumps(r))
        print(markdown(results))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                json.dump({"argv": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                           "torch": torch.__version__, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
