#!/usr/bin/env python
"""Training-step time of the model alone (forward + backward, fp32, 1 thread) on fixed dummy batches, for timing one
tree against another (a `git worktree` of an older commit) on the model's hot path.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_model_step.py [--repo PATH_OF_A_CHECKOUT]

A dummy batch of 8 cells x 256 slots with graphs (400 edges per cell), 256 hidden x 4 layers, 4 heads, FFN 512; the
scFoundation decoder 64 wide over 2,000 genes. Paths: scGPT padded, scGPT packed, scFoundation padded. Prints the
fastest of 28 timed steps (after 2 warm-up steps) per path, in ms, as JSON. `--repo` imports grnformer_ds from that
checkout instead of this one, so both trees run the same script.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
p.add_argument("--steps", type=int, default=30)
args = p.parse_args()
sys.path.insert(0, args.repo)

import torch  # noqa: E402

from grnformer_ds.data.packing import pack_padded_batch  # noqa: E402
from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, make_dummy_batch  # noqa: E402

torch.set_num_threads(1)
out = {}
for backbone, layout in (("scgpt", "padded"), ("scgpt", "packed"), ("scfoundation", "padded")):
    cfg = GRNFormerConfig.from_preset("debug", vocab_size=2003, backbone=backbone, hidden_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=512, decoder_hidden_size=64,
                                      decoder_intermediate_size=128)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).train()
    batch = make_dummy_batch(cfg, batch_size=8, seq_len=256, n_genes=2000, edges_per_cell=400, seed=0)
    if layout == "packed":
        batch = pack_padded_batch(batch, lead=2 if backbone == "scfoundation" else 0, pad_id=cfg.pad_token_id,
                                  pad_value=cfg.pad_value)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    out[f"{backbone}/{layout}"] = round(1000 * min(times[2:]), 1)
print(json.dumps({"repo": args.repo, "ms": out}))
