#!/usr/bin/env python
"""Cell-embedding throughput of `grnformer_ds.inference.embed` beside scGPT's own encoder on the same cells.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_embed.py --out embed_bench.json

A scGPT TransformerModel (scgpt 0.2.4, random weights, `--hidden`/`--layers`/`--heads`) on the demo store's
vocabulary is written in scGPT's checkpoint format and imported (`import_checkpoint.py --from scgpt`), so both sides
hold the same weights. Over the demo store's 700 cells:

- ours: `embed(model, store, ...)` end to end (store reads, tokenization, forward, gather), packed micro-batches
  (the default) and padded batches of 64 cells, no graphs (scGPT has none), and packed with the demo GRN graphs
  for a model with GRN parts of the same size;
- scGPT: `TransformerModel._encode` + the `<cls>` state, what scGPT's `get_batch_cell_embeddings` runs per batch of 64
  cells, on the same padded tokens (made by our loader beforehand: its tokenization is not timed, which favours it).

cells/s from the best of `--repeats` passes, and the largest difference between scGPT's and our embeddings.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, when imported from elsewhere

from bench_common import machine_info, write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", default=None, help="demo cache directory (default: a temporary one)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from scgpt_reference import make_scgpt, write_scgpt_folder

    from grnformer_ds.inference import embed, embedding_dataset, load_model
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.export import save_hf_folder
    from grnformer_ds.training.importing import import_checkpoint
    from grnformer_ds.training.integration import build_model_config, ensure_demo

    work = tempfile.mkdtemp(prefix="bench_embed_")
    store_path = ensure_demo(args.cache or os.path.join(work, "cache"), say=lambda line: None)
    store = open_store(store_path)
    vocab = dict(store.vocab)
    ref = make_scgpt(vocab, d_model=args.hidden, nhead=args.heads, d_hid=args.hidden * 2, nlayers=args.layers,
                     randomize=False)
    hf = import_checkpoint("scgpt", write_scgpt_folder(ref, vocab, os.path.join(work, "scgpt")),
                           os.path.join(work, "hf"), say=lambda line: None)
    ours = load_model(hf, device="cpu")
    n = store.n_cells

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    rows = {}
    t, packed = best(lambda: embed(ours, store_path, graphs=False))
    rows["ours_packed_no_graph"] = n / t
    t, padded = best(lambda: embed(ours, store_path, batch_size=64, graphs=False))
    rows["ours_padded64_no_graph"] = n / t

    batches = list(embedding_dataset(ours, store_path, batch_size=64, graphs=False))

    @torch.no_grad()
    def scgpt_pass():
        out = np.empty((n, args.hidden), np.float32)
        for b in batches:
            h = ref._encode(b["input_ids"], b["values"], src_key_padding_mask=~b["attention_mask"])
            out[b["cell_index"].numpy()] = h[:, 0].numpy()
        return out

    t, theirs = best(scgpt_pass)
    rows["scgpt_encode_padded64"] = n / t

    config = build_model_config(store, "debug", None)
    config.hidden_size, config.num_hidden_layers, config.num_attention_heads = args.hidden, args.layers, args.heads
    config.intermediate_size = args.hidden * 2
    torch.manual_seed(0)
    graph_model = GRNFormerForMaskedLM(config)
    save_hf_folder(graph_model, vocab, os.path.join(work, "graph_model"))
    graph_model = load_model(os.path.join(work, "graph_model"), device="cpu")
    t, _ = best(lambda: embed(graph_model, store_path))
    rows["ours_packed_graphs"] = n / t
    report = machine_info(cells=n, model=f"{args.hidden} x {args.layers}, {args.heads} heads", cells_per_s=rows,
                          max_abs_diff_vs_scgpt=float(np.abs(packed.cells - theirs).max()),
                          max_abs_diff_padded_vs_packed=float(np.abs(packed.cells - padded.cells).max()))
    write_report(report, args.out, show=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
