#!/usr/bin/env python
"""The GRN ablation: the same pretraining and fine-tuning budgets on the same data per arm and seed, one table.

    python launchers/ablation.py --data demo_store --arms no-grn,random-grn,hybrid --seeds 0,1,2 --out-dir ablation

Arms (grnformer_ds/training/ablation.py says what each compares): no-grn, random-grn (degree-preserving shuffle of
the GRNs), celltype, cell, hybrid (both scales), no-perturbation (no co-expression edge perturbation), gnn-gcn,
gnn-gat, gnn-gin. Every GRN arm puts the fusion after the last layer, so each arm runs the same transformer layers as
no-grn. Writes ablation.json and ablation.md (held-out masked-value loss, mean ± sd over seeds, beside the trivial
baselines: each gene's training mean and the global mean; the downstream metric: each run fine-tuned for cell-type
annotation by finetune.py, test accuracy and macro-F1 on the same test cells for every arm of a seed, beside logistic
regression on PCA of the expression; a linear probe of each run's frozen cell embeddings beside the same probe on
PCA). Extra pretrain.py flags go after `--`; extra finetune.py flags in --finetune-args.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import UserInputError, cli_main  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a store with GRN assets")
    p.add_argument("--arms", default="no-grn,random-grn,hybrid", help="comma-separated arms")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data order, masking, weights)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model-preset", default="debug")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--no-finetune", action="store_true",
                   help="skip fine-tuning each run for cell-type annotation (the downstream column)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs per run (3; early stopping "
                                                                  "on validation macro-F1 within them)")
    p.add_argument("--finetune-args", default="",
                   help="extra finetune.py flags for every fine-tuning run, one string (e.g. "
                        "--finetune-args='--lr 1e-3 --patience 5')")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe of each run's cell embeddings")
    p.add_argument("--launcher", default="", help="command before pretrain.py (default: this python; e.g. "
                                                  "'deepspeed --num_gpus 8')")
    return p.parse_args(argv), extra


@cli_main
def main(argv=None) -> int:
    args, extra = parse_args(argv)
    from grnformer_ds.training.ablation import run_ablation

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserInputError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or not seeds or args.max_steps < 1 or args.finetune_epochs < 1:
        raise UserInputError("give at least one arm, one seed, --max-steps >= 1 and --finetune-epochs >= 1")
    try:
        finetune_args = shlex.split(args.finetune_args)
    except ValueError as e:
        raise UserInputError(f"--finetune-args: {e}") from None
    summary = run_ablation(args.data, arms, seeds, args.out_dir, preset=args.model_preset, max_steps=args.max_steps,
                           extra_args=extra, launcher=args.launcher, probe=not args.no_probe,
                           finetune=not args.no_finetune, finetune_epochs=args.finetune_epochs,
                           finetune_args=finetune_args)
    from grnformer_ds.training.ablation import ablation_table

    print(ablation_table(summary), end="")
    print(f"wrote {os.path.join(args.out_dir, 'ablation.json')} and ablation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
