#!/usr/bin/env python
"""Tokens per cell and training-step time of the backbones at equal width, on the demo store.

    python launchers/benchmarks/bench_backbones.py --out backbones_bench.json
    python launchers/benchmarks/bench_backbones.py --device cuda --hidden 512 --layers 12 --heads 8

For each backbone (default scgpt and scpalm, both with GRN graphs) the same transformer width / depth, the same
packed micro-batches of the demo store (the same cells: both collators pack by gene slots with the same budget) and
one optimizer step per micro-batch (forward + backward + AdamW). Reported per backbone: input slots and encoder
tokens per cell (scPaLM's patches: 1 + ceil(genes / patch_size)), attention pairs per cell, median step time,
cells per second, and the first / last training loss (each backbone's own loss: not comparable across backbones).
Warm-up steps are not timed. Set OMP_NUM_THREADS=1 on a shared CPU machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, when imported from elsewhere

import torch  # noqa: E402
from bench_common import machine_info, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="scgpt,scpalm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=2400, help="gene slots per packed micro-batch (both backbones)")
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--demo-cache-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def bench_one(backbone: str, store: str, args) -> dict:
    from grnformer_ds.data import StreamingCellDataset, get_collator
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM
    from grnformer_ds.store import open_store

    s = open_store(store)
    config = GRNFormerConfig.from_preset(
        "debug", backbone=backbone, vocab_size=s.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.ffn, use_graph=not args.no_graph,
        pad_token_id=s.special_tokens["<pad>"], cls_token_id=s.special_tokens["<cls>"])
    options = {f: getattr(config, f) for f in get_collator(backbone).model_config_fields}
    ds = StreamingCellDataset(store, max_tokens=args.max_tokens, seed=0, backbone=backbone, graph_layout="csr",
                              graphs=not args.no_graph, undirected_graphs=True, collator_kwargs=options)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = GRNFormerForMaskedLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spec = config.backbone_spec
    it = iter(ds)
    times, losses, cells, slots, tokens, pairs = [], [], 0, 0, 0, 0
    for step in range(args.warmup + args.steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(ds)
            batch = next(it)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(out.loss.item())
        if step < args.warmup:
            continue
        n = batch["cell_index"].shape[0]
        lengths = batch["cu_seq_lens_q"].to(torch.int64).diff()[:n].cpu()
        enc = spec.encoder_lengths(config, lengths)
        times.append(dt)
        cells, slots, tokens, pairs = (cells + n, slots + int(lengths.sum()), tokens + int(enc.sum()),
                                       pairs + int((enc ** 2).sum()))
    step_s = statistics.median(times)
    return {"backbone": backbone, "params": sum(p.numel() for p in model.parameters()),
            "cells_per_step": cells / len(times), "slots_per_cell": slots / cells, "tokens_per_cell": tokens / cells,
            "attention_pairs_per_cell": pairs / cells, "step_ms": 1000 * step_s,
            "cells_per_s": cells / sum(times), "loss_first": losses[0], "loss_last": losses[-1]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from grnformer_ds.training.integration import ensure_demo

    store = ensure_demo(args.demo_cache_dir, say=lambda line: print(line, file=sys.stderr))
    results = [bench_one(b, store, args) for b in args.backbones.split(",") if b]
    report = machine_info(device=args.device,
                          width={"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "ffn": args.ffn},
                          max_tokens=args.max_tokens, graphs=not args.no_graph, results=results)
    cols = ("backbone", "params", "cells_per_step", "slots_per_cell", "tokens_per_cell", "attention_pairs_per_cell",
            "step_ms", "cells_per_s", "loss_first", "loss_last")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:,.1f}" if isinstance(r[c], float) else f"{r[c]:,}" if isinstance(r[c], int)
                                else str(r[c]) for c in cols) + " |")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
