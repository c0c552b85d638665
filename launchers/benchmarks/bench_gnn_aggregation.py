#!/usr/bin/env python
"""Structure-encoder aggregation: PyG's scatter over the edge list vs a CSR sparse-adjacency product
(`GRNFormerConfig.gnn_aggregation`), on real packed micro-batches with both graph scales.

    python launchers/benchmarks/bench_gnn_aggregation.py --store STORE --max-tokens 38400 --width 512
    python launchers/benchmarks/bench_gnn_aggregation.py --store STORE --device cuda --dtype bf16

Each micro-batch comes from the streaming loader with `graph_layout="csr"` (undirected, destination-sorted, as the
trainer streams them); both paths run the same StructureEncoder weights, forward + backward w.r.t. the node features,
and the median over the batches is reported with the largest output difference. CSR runs only where it can (float32
or CUDA, not GAT), otherwise the row says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from grnformer_ds.errors import cli_main  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a store with GRN assets")
    p.add_argument("--max-tokens", type=int, default=38400)
    p.add_argument("--width", type=int, default=512, help="node feature width (the model's hidden size)")
    p.add_argument("--gnn-types", default="sage,gcn,gin")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    from grnformer_ds.data import StreamingCellDataset
    from grnformer_ds.modeling import GRNFormerConfig
    from grnformer_ds.modeling.gnn import StructureEncoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ds = StreamingCellDataset(args.store, max_tokens=args.max_tokens, seed=0, graph_layout="csr", split="all")
    batches = [ds.batch(s) for s in range(min(args.batches, len(ds)))]
    graphs = [{k: (b[f"{k}_edge_index"].to(device), b[f"{k}_edge_weight"].to(device)) for k in ("celltype", "cell")}
              for b in batches]
    tokens = [b["input_ids"].shape[1] for b in batches]
    edges = [sum(int(g[k][0].shape[1]) for k in g) for g in graphs]
    rows = []
    for gnn_type in args.gnn_types.split(","):
        times, outs = {}, {}
        for aggregation in ("scatter", "csr"):
            cfg = GRNFormerConfig(vocab_size=10, hidden_size=args.width, num_attention_heads=8, gnn_type=gnn_type,
                                  gnn_aggregation=aggregation)
            torch.manual_seed(0)
            enc = StructureEncoder(cfg).to(device, dtype).train()
            ts = []
            for i, g in enumerate(graphs):
                x = torch.randn(tokens[i], args.width, device=device, dtype=dtype, requires_grad=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = enc(x, g, "csr")
                out.float().square().mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
                outs.setdefault(aggregation, out.detach().float())
            times[aggregation] = statistics.median(ts[1:] or ts)
            ran = "csr" if aggregation == "csr" and enc._sparse_ok(x) else "scatter"
            times[aggregation + "_ran"] = ran
        diff = float((outs["scatter"] - outs["csr"]).abs().max())
        rows.append({"gnn": gnn_type, "width": args.width, "dtype": args.dtype, "device": args.device,
                     "tokens": statistics.mean(tokens), "edges": statistics.mean(edges),
                     "scatter_ms": round(1e3 * times["scatter"], 2), "csr_ms": round(1e3 * times["csr"], 2),
                     "csr_path": times["csr_ran"], "speedup": round(times["scatter"] / times["csr"], 2),
                     "max_abs_diff": diff})
        print(json.dumps(rows[-1]), flush=True)
    print("| GNN | width | dtype | device | tokens | edges (both scales) | scatter ms | CSR ms | CSR path "
          "| scatter / CSR | max abs diff |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gnn']} | {r['width']} | {r['dtype']} | {r['device']} | {r['tokens']:.0f} | {r['edges']:.0f} | "
              f"{r['scatter_ms']} | {r['csr_ms']} | {r['csr_path']} | {r['speedup']} | {r['max_abs_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
