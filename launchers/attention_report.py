#!/usr/bin/env python
"""Do the fusion's queries attend to transcription factors? The paper's TF-attention statistic (rho) on a store.

    python launchers/attention_report.py --model my_model --data my_store --out-dir tf_attention

rho = mean attention received per TF key / mean per non-TF key (each cell's keys normalised by their mean), over the
first --max-cells cells, with a permutation p-value (TF labels shuffled among each cell's keys) and the same per cell
type; writes tf_attention.json and tf_attention.png (grnformer_ds/inference/tf_attention.py has the definitions).
The store needs GRN assets (they say which genes are TFs) and the model its GRN parts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import UserInputError, cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a folder written by export_hf.py")
    p.add_argument("--data", required=True, help="a store with GRN assets")
    p.add_argument("--out-dir", required=True, help="where tf_attention.json and tf_attention.png go")
    p.add_argument("--max-cells", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when visible)")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from grnformer_ds.training.console import quiet_libraries

    quiet_libraries(verbose=False)  # no transformers load report / progress bars around our lines
    from grnformer_ds.grn import has_grn_assets
    from grnformer_ds.inference import load_model
    from grnformer_ds.inference.tf_attention import collect_key_attention, plot_tf_attention, tf_attention_summary
    from grnformer_ds.store import open_store

    if not os.path.isdir(args.data):
        raise UserInputError("store directory not found", args.data)
    store = open_store(args.data)
    if not has_grn_assets(args.data):
        raise UserInputError("the store has no GRN assets (data_prep/build_grn.py adds them): no TFs to report on",
                             args.data)
    if args.max_cells < 1 or args.permutations < 1:
        raise UserInputError("--max-cells and --permutations must be >= 1")
    model = load_model(args.model, device=args.device)
    keys = collect_key_attention(model, store, max_cells=args.max_cells, batch_size=args.batch_size)
    summary = tf_attention_summary(keys, list(store.cell_types), args.permutations, args.seed)
    summary.update(model=os.path.abspath(args.model), store=os.path.abspath(args.data))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "tf_attention.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    plot_tf_attention(summary, keys, os.path.join(args.out_dir, "tf_attention.png"))
    print(f"rho = {summary['rho']:.3f} (TF keys receive {summary['rho']:.2f}x the attention of non-TF keys), "
          f"permutation p = {summary['p_value']:.3g} ({args.permutations} permutations), {summary['cells']} cells, "
          f"{summary['tf_keys']:,} TF / {summary['non_tf_keys']:,} non-TF keys; wrote {args.out_dir}/tf_attention.json "
          f"and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
