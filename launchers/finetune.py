#!/usr/bin/env python
"""Fine-tune a pretrained GRNFormer for a downstream task with DeepSpeed.

    deepspeed launchers/finetune.py --deepspeed_config ds_configs/zero2.json --task cell-type --model HF_DIR
    deepspeed launchers/finetune.py --task sc-drug-response --model HF_DIR --data cells.h5ad --label-key response

The same engine as pretraining (checkpoints, --resume, MLflow, export): the task's head is put on the folder's
model (`GRNFormerForCellClassification`, ...), the labelled cells are split by a seeded, stratified train / val /
test split (or k folds), the validation metric stops training early and picks the checkpoint that is scored on the
test split (test_metrics.json, MLflow test_* metrics) and exported to hf_model/. --no-graph and --freeze-backbone
give the comparisons of docs/after_pretraining.md. Tasks: see --task (docs/after_pretraining.md).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import cli_main  # noqa: E402


def _task_name(argv) -> str | None:
    """--task from the command line before parsing it (the task adds its own options)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


@cli_main
def main(argv=None) -> int:
    from grnformer_ds.plugins import load_plugins

    load_plugins(argv)
    from grnformer_ds.training.cli import finetune_parser

    args = finetune_parser(__doc__.split("\n\n")[0], _task_name(argv)).parse_args(argv)
    from grnformer_ds.training.run import run_finetuning

    return run_finetuning(args)


if __name__ == "__main__":
    sys.exit(main())
