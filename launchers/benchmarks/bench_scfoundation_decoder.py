#!/usr/bin/env python
"""scFoundation's decoder with exact attention vs FAVOR+ (`decoder_attention`), as the number of decoder genes grows.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_scfoundation_decoder.py --out scf_decoder.json

One training step (forward + backward, fp32, eval-mode dropout off) of an scFoundation-style model with the `small`
preset's sizes (encoder 256 x 6, decoder 256 x 2, 4 heads) on a dummy batch of 2 cells x 256 encoder genes and G
decoder genes (+ T, S), use_graph False so the decoder dominates; median of `--repeats` steps after one warm-up. The
exact path is the model's attention dispatch (`--attn sdpa` by default: torch's fused CPU kernel); FAVOR+ is
scFoundation's (int(d ln d) = 177 random features per head). scFoundation itself runs only FAVOR+, so the peer is
the exact-attention decoder measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, when imported from elsewhere

from bench_common import machine_info, write_report  # noqa: E402


def step_ms(attention: str, n_genes: int, attn: str, repeats: int) -> float:
    import torch

    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, make_dummy_batch

    cfg = GRNFormerConfig.from_preset("small", backbone="scfoundation", vocab_size=n_genes + 3, use_graph=False,
                                      decoder_attention=attention, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, attn_implementation=attn)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg)
    batch = make_dummy_batch(cfg, batch_size=2, seq_len=256, n_genes=n_genes, graphs=False)
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genes", default="1024,4096,8192,19264")
    p.add_argument("--exact-max-genes", type=int, default=8192, help="skip exact attention above this G (time)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = []
    for n_genes in (int(g) for g in args.genes.split(",")):
        row = {"decoder_genes": n_genes, "performer_ms": step_ms("performer", n_genes, args.attn, args.repeats)}
        if n_genes <= args.exact_max_genes:
            row["exact_ms"] = step_ms("exact", n_genes, args.attn, args.repeats)
            row["exact_over_performer"] = row["exact_ms"] / row["performer_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_report(machine_info(attn=args.attn, rows=rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
