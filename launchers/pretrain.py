#!/usr/bin/env python
"""Pretrain GRNFormer with DeepSpeed.

    deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero3.json

With no --data it trains on the embedded demo store (built with GRN graphs on first use under the cache dir) with
the `debug` preset and a short schedule: on CPU when there is no GPU, on every visible GPU otherwise. Run settings
(batch, accumulation, clipping, precision) may be given here or in the DeepSpeed JSON, never both with different
values. Everything the run writes goes to --output-dir: checkpoints/, metrics.jsonl, mlflow.db, hf_model/.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None) -> int:
    from grnformer_ds.plugins import load_plugins

    load_plugins(argv)  # before the parser: --backbone lists what they register
    from grnformer_ds.training.cli import pretrain_parser

    args = pretrain_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    from grnformer_ds.training.run import run_pretraining

    return run_pretraining(args)


if __name__ == "__main__":
    sys.exit(main())
