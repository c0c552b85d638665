#!/usr/bin/env python
"""Pretraining throughput benchmark: padded vs token-packed batches, eager vs compiled, ZeRO-3 vs plain torch.

    python launchers/benchmarks/bench_pretrain_gpu.py --plan h100 --out $OUT/bench.json     # one H100, <= 8 min
    python launchers/benchmarks/bench_pretrain_gpu.py --plan cpu --allow-cpu                  # the CPU numbers
    python launchers/benchmarks/bench_pretrain_gpu.py --plan h100 --only 4,5 --steps 30       # some rows again

A plan is a list of runs (`PLANS`); each run trains one model for --warmup + --steps optimizer steps on one device
with the real streaming loader (real GRN graphs) and reports the measured steps: non-pad tokens/s, cells/s, MFU on
non-pad tokens (`grnformer_ds.training.throughput`), the step breakdown (data / embed / backbone / gnn / fusion /
head / backward / optimizer: CUDA events around module forwards, the backward and the optimizer step), the padding
fraction of the token slots and the peak memory. Modes:

* `zero3`: the card's path: `deepspeed.initialize` with ds_configs/zero3.json (bf16 weights, torch AdamW fused, the
  model's blocks as ZeRO-3 leaf modules unless the run says otherwise), `engine.backward(scale_wrt_gas=False)` with
  the loss divided by the micro-batch's masked positions as the trainer does;
* `torch`: plain PyTorch: fp32 weights, `torch.autocast(bfloat16)`, `torch.optim.AdamW(fused=True)`.

`compile` runs compile the model's blocks (`training.compile.compile_engine` / `compile_blocks`, what `--compile`
does); their warm-up steps include the compilation. Stores: `wide` (built on first use under --workdir: 20,000
synthetic cells x 5,000 genes, 750-2,250 expressed genes per cell, capped at 1,200 tokens, a synthetic GRN of 60
regulons; the loader benchmark's recipe) and `demo` (pbmc68k_reduced, ~250 tokens per cell). Results go to --out as
JSON after every run (a run cut short by the time limit keeps the rows before it); --budget-s stops starting runs
that would not finish in time. `--allow-cpu` runs on CPU (fp32, wall-clock timers, no MFU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launchers" / "benchmarks"))

import torch  # noqa: E402

from grnformer_ds.errors import UserInputError, cli_main  # noqa: E402


@dataclasses.dataclass
class Run:
    """One benchmark row. attn: an implementation, or "auto" (what the launcher picks for the model on this
    device); no_attn_dropout: attention_probs_dropout_prob = 0 (torch's varlen_attn has no attention dropout)."""

    preset: str
    layout: str  # "packed" | "padded"
    compile: bool
    mode: str  # "zero3" | "torch"
    data: str = "wide"  # "wide" | "demo"
    attn: str = "auto"
    no_attn_dropout: bool = True
    graphs: bool = True
    leaf_blocks: bool = True
    gnn_aggregation: str = "scatter"
    micro_batch: int = 32  # padded layout
    cells_per_pack: int = 32  # packed layout: max_tokens = cells_per_pack x the longest cell
    config: dict = dataclasses.field(default_factory=dict)  # GRNFormerConfig overrides
    zero: dict = dataclasses.field(default_factory=dict)  # zero_optimization overrides of ds_configs/zero3.json

    @property
    def name(self) -> str:
        parts = [self.preset, self.data, self.layout, "compile" if self.compile else "eager", self.mode, self.attn]
        if not self.graphs:
            parts.append("no-graphs")
        if not self.no_attn_dropout:
            parts.append("attn-dropout")
        if not self.leaf_blocks:
            parts.append("no-leaf-blocks")
        if self.gnn_aggregation != "scatter":
            parts.append(f"gnn-{self.gnn_aggregation}")
        parts += [f"{k}={v}" for k, v in {**self.config, **self.zero}.items()]
        return "/".join(parts)


R = Run
PLANS: dict[str, list[Run]] = {
    # one H100, in priority order (the budget cuts from the end)
    "h100": [
        R("scgpt-base", "padded", False, "zero3", attn="sdpa", no_attn_dropout=False),  # the card's path before
        R("scgpt-base", "packed", True, "zero3"),  # the card's path now (target: >= 1.3M non-pad tokens/s)
        R("scgpt-base", "packed", True, "torch"),  # ZeRO-3 / plain torch on the same batches
        R("scgpt-base", "packed", False, "zero3"),  # compile off
        R("scgpt-base", "padded", False, "torch", attn="sdpa", no_attn_dropout=False),
        R("scgpt-base", "packed", True, "torch", graphs=False),  # a plain scGPT-size encoder
        R("base", "packed", True, "zero3", cells_per_pack=16),  # MFU target
        R("base", "packed", True, "torch", cells_per_pack=16),
        R("scgpt-base", "packed", True, "zero3", attn="sdpa", no_attn_dropout=False),  # the preset as it is
        R("scgpt-base", "packed", False, "zero3", leaf_blocks=False),  # DeepSpeed's per-module hooks
        R("scgpt-base", "packed", True, "zero3", data="demo"),
        R("scgpt-base", "packed", False, "torch", gnn_aggregation="csr"),
        R("scgpt-base", "packed", False, "torch"),
    ],
    # the CPU rows of BENCHMARKS.md: packed vs padded tokens/s for `small`
    "cpu": [
        R("small", "padded", False, "torch", data="demo", attn="sdpa", micro_batch=8),
        R("small", "packed", False, "torch", data="demo", cells_per_pack=2),
        R("small", "padded", False, "zero3", data="demo", attn="sdpa", micro_batch=8),
        R("small", "packed", False, "zero3", data="demo", cells_per_pack=2),
        R("small", "packed", False, "zero3", data="demo", cells_per_pack=2, leaf_blocks=False),
        R("small", "packed", True, "zero3", data="demo", cells_per_pack=2),
        R("small", "packed", False, "torch", data="demo", cells_per_pack=2, gnn_aggregation="csr"),
    ],
    # ZeRO-3's own cost where it shows most: many small modules, little compute per step (the launch-bound regime
    # of a GPU step at small batches), 12 debug-width layers, packed demo cells, eager, CPU
    "zero3-overhead": [
        R("debug", "packed", False, "torch", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12}),
        R("debug", "packed", False, "zero3", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12},
          leaf_blocks=False),
        R("debug", "packed", False, "zero3", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12}),
        R("debug", "packed", False, "zero3", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12},
          leaf_blocks=False, zero={"stage3_param_persistence_threshold": 10**9}),
        R("debug", "packed", False, "zero3", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12},
          zero={"stage3_param_persistence_threshold": 10**9}),
        R("debug", "packed", False, "zero3", data="demo", cells_per_pack=1, config={"num_hidden_layers": 12},
          leaf_blocks=False, zero={"stage3_module_granularity_threshold": 10**5}),
        # scGPT's width: the 512 x 512 projections (262k) are partitioned below a persistence threshold of 1e6
        R("scgpt-base", "packed", False, "torch", data="demo", cells_per_pack=1),
        R("scgpt-base", "packed", False, "zero3", data="demo", cells_per_pack=1,
          zero={"stage3_param_persistence_threshold": 10**5}),
        R("scgpt-base", "packed", False, "zero3", data="demo", cells_per_pack=1),
        R("scgpt-base", "packed", False, "zero3", data="demo", cells_per_pack=1, leaf_blocks=False),
    ],
    # the test suite's smoke run of this script
    "smoke": [
        R("debug", "padded", False, "zero3", data="demo", attn="sdpa", micro_batch=4),
        R("debug", "packed", True, "torch", data="demo", cells_per_pack=1),
    ],
}


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


def wide_store(workdir: Path, n_cells: int = 20_000) -> Path:
    """The `wide` store (module docstring), built once under `workdir` with the loader benchmark's recipe."""
    from bench_loader import make_grn, make_h5ad

    store = workdir / "wide_store"
    if (store / "grn").exists():
        return store
    from grnformer_ds.store import build_store

    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_h5ad(workdir / "wide.h5ad", n_cells, 5_000, 1_500, seed=0)
    build_store([str(workdir / "wide.h5ad")], store, cell_type_key="cell_type", overwrite=True, progress=False)
    make_grn(store, 60, seed=0)
    print(f"wide store built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return store


def make_config(run: Run, store_path, has_gpu: bool):
    from grnformer_ds.training import integration as I
    from grnformer_ds.training.compile import choose_attn_implementation

    overrides = {"gnn_aggregation": run.gnn_aggregation}
    if run.no_attn_dropout:
        overrides["attention_probs_dropout_prob"] = 0.0
    config = I.build_model_config(I.open_store(store_path), run.preset, None, use_graph=run.graphs)
    config = type(config).from_dict({**config.to_dict(), **run.config})
    for key, value in overrides.items():
        setattr(config, key, value)
    impl, _ = choose_attn_implementation(None if run.attn == "auto" else run.attn, config, has_gpu)
    config._attn_implementation = impl
    return config


def loader(run: Run, store_path, config, info, num_workers: int):
    from grnformer_ds.data import StatefulCellLoader, StreamingCellDataset
    from grnformer_ds.data.dataset import longest_cell_tokens

    if run.layout == "packed":
        layout = dict(max_tokens=run.cells_per_pack * longest_cell_tokens(config.backbone),
                      pad_to_max_tokens=run.compile)
    else:
        layout = dict(batch_size=run.micro_batch)
    ds = StreamingCellDataset(store_path, seed=0, rank=info.rank, world_size=info.world_size, split="all",
                              backbone=config.backbone, graphs=bool(config.use_graph), graph_layout="csr",
                              undirected_graphs=config.gnn_add_reverse_edges, mask_value=config.mask_value,
                              pad_value=config.pad_value, training=True, **layout)
    it = StatefulCellLoader(ds, num_workers=num_workers, pin_memory=info.has_gpu,
                            prefetch_factor=4 if num_workers else None)
    while True:
        yield from it


def run_one(run: Run, args, stores: dict, info) -> dict:
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.training.compile import compile_blocks, compile_engine
    from grnformer_ds.training.throughput import (
        BatchCounts,
        batch_counts,
        flops_profile,
        masked_positions,
        peak_flops,
        train_flops,
    )

    device, cuda = info.device, info.device.type == "cuda"
    store_path = stores[run.data]
    config = make_config(run, store_path, cuda)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    profile = flops_profile(model)
    timer = SectionTimer(cuda)
    instrument(model, timer)
    if run.mode == "zero3":
        from grnformer_ds.training import engine as E
        from grnformer_ds.training.ds_config import load_ds_config, resolve_ds_config
        from grnformer_ds.training.schedule import LRSchedule, build_scheduler
        from grnformer_ds.training.settings import BatchSettings, RunSettings

        batch = BatchSettings(run.micro_batch if run.layout == "padded" else None, 1)
        s = RunSettings(output_dir="/tmp", precision="bf16" if cuda else "fp32", batch=batch)
        cfg_path = str(REPO / "ds_configs" / "zero3.json")
        raw = load_ds_config(cfg_path)
        raw["zero_optimization"].update(run.zero)
        r = resolve_ds_config(raw, s, info.world_size, cfg_path, has_gpu=cuda)
        engine = E.build_engine(model, r, 1e-4, 0.01, (0.9, 0.999), 1e-8,
                                lambda o: build_scheduler(o, LRSchedule.warmup_cosine(1e-4, 10, 10**6, 0.1)),
                                has_gpu=cuda, leaf_blocks=run.leaf_blocks)
        prepare = compile_engine(engine) if run.compile else None
        fwd = engine

        def backward(loss):
            engine.backward(loss, scale_wrt_gas=False)

        def step():
            engine.step()

        autocast = contextlib.nullcontext
    else:
        model.to(device).train()
        prepare = None
        if run.compile:
            compile_blocks(model)
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

    batches = loader(run, store_path, config, info, args.num_workers)
    peak = peak_flops(device)
    rows, t_start = [], time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warm_s = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            warm_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        with timer.section("data"):
            batch = next(batches)
            dev = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            dev["num_items_in_batch"] = torch.tensor(float(max(masked_positions(batch), 1)), device=device)
            if prepare is not None:
                prepare(dev)
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
        c = batch_counts(batch)
        head = sec.get("forward", 0) - sum(sec.get(k, 0) for k in ("embed", "backbone", "gnn", "fusion"))
        rows.append({"wall": wall, "counts": c, "flops": train_flops(profile, c), "head": max(head, 0.0), **sec})
    wall = sum(r["wall"] for r in rows)
    total = BatchCounts(*(sum(getattr(r["counts"], f) for r in rows)
                          for f in ("cells", "tokens", "nonpad", "attention_pairs", "decoder_tokens")))
    out = {
        "run": run.name, **dataclasses.asdict(run), "attn_implementation": config._attn_implementation,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "params_m": round(n_params / 1e6, 2),
        "steps": len(rows), "warmup_s": round(warm_s or 0.0, 1), "step_time_ms": round(1e3 * wall / len(rows), 2),
        "cells_per_step": round(total.cells / len(rows), 1),
        "cells_per_s": round(total.cells / wall, 1), "tokens_per_s": round(total.tokens / wall),
        "nonpad_tokens_per_s": round(total.nonpad / wall),
        "padding_fraction": round(1 - total.nonpad / total.tokens, 4),
        "mfu": round(sum(r["flops"] for r in rows) / wall / peak, 4) if peak else None,
        "breakdown_ms": {k: round(1e3 * sum(r.get(k, 0.0) for r in rows) / len(rows), 2)
                         for k in ("data", "embed", "backbone", "gnn", "fusion", "head", "backward", "optimizer")},
    }
    if cuda:
        out["gpu_mem_max_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def markdown(results: list[dict]) -> str:
    cols = ["run", "attn_implementation", "params_m", "cells_per_step", "step_time_ms", "cells_per_s",
            "nonpad_tokens_per_s", "padding_fraction", "mfu", "gpu_mem_max_gib", "warmup_s"]
    lines = ["| # | " + " | ".join(cols) + " | data/embed/backbone/gnn/fusion/head/bwd/opt ms |",
             "|" + "---|" * (len(cols) + 2)]
    for i, r in enumerate(results):
        b = r.get("breakdown_ms")
        bd = "/".join(str(b[k]) for k in ("data", "embed", "backbone", "gnn", "fusion", "head", "backward",
                                           "optimizer")) if b else r.get("error", "")
        lines.append(f"| {r.get('index', i)} | " + " | ".join(str(r.get(c, "")) for c in cols) + f" | {bd} |")
    return "\n".join(lines)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", default="h100", choices=sorted(PLANS))
    p.add_argument("--only", default=None, help="comma-separated run numbers of the plan (0-based)")
    p.add_argument("--workdir", default=os.environ.get("GRNFORMER_BENCH_DIR", "/tmp/grnformer_bench"),
                   help="where the `wide` store is built")
    p.add_argument("--demo-cache-dir", default=None)
    p.add_argument("--demo-store", default=None, help="a ready demo store (with GRN assets) instead of building it")
    p.add_argument("--wide-store", default=None, help="a ready `wide` store (with GRN assets) instead of building it")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: 4 on GPU, 0 on CPU)")
    p.add_argument("--steps", type=int, default=15, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured steps per run (compilation happens here)")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here (after every run)")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU (fp32, no MFU)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise UserInputError("no GPU visible; this is a GPU benchmark (use --allow-cpu to run it on CPU)")
    plan = list(enumerate(PLANS[args.plan]))
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        plan = [(i, r) for i, r in plan if i in keep]
    if args.num_workers is None:
        args.num_workers = 4 if torch.cuda.is_available() else 0

    from grnformer_ds.training import engine as E
    from grnformer_ds.training import integration as I

    t_begin = time.perf_counter()
    info = E.init_distributed(args.local_rank)
    stores = {"demo": args.demo_store or I.ensure_demo(args.demo_cache_dir)}
    if any(r.data == "wide" for _, r in plan):
        stores["wide"] = args.wide_store or str(wide_store(Path(args.workdir)))
    results: list[dict] = []
    for index, run in plan:
        elapsed = time.perf_counter() - t_begin
        if args.budget_s and results and elapsed + max(r["run_s"] for r in results) > args.budget_s:
            results.append({"index": index, "run": run.name, "error": f"skipped: {elapsed:.0f} s of {args.budget_s}"})
            continue
        t = time.perf_counter()
        try:
            row = run_one(run, args, stores, info)
        except Exception as exc:  # a failing row (an unsupported kernel, OOM) must not cost the others
            row = {"run": run.name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        row.update(index=index, run_s=round(time.perf_counter() - t, 1))
        results.append(row)
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if info.is_main:
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(
                    {"argv": sys.argv, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "torch": torch.__version__, "results": results}, indent=1))
    if info.is_main:
        print(markdown(results))
        done = [r for r in results if "error" not in r]
        by = {r["run"]: r for r in done}
        for r in done:  # ZeRO-3 / plain torch on the same batches
            twin = by.get(r["run"].replace("/zero3/", "/torch/"))
            if r["mode"] == "zero3" and twin:
                ratio = r["nonpad_tokens_per_s"] / twin["nonpad_tokens_per_s"]
                print(f"ZeRO-3 / torch, {r['run']}: {ratio:.3f}")
    return 0 if all("error" not in r or r["error"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
