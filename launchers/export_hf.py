#!/usr/bin/env python
"""Export a pretraining checkpoint (ZeRO stage 1/2/3, any world size) to a Hugging Face folder.

    python launchers/export_hf.py --checkpoint runs/demo --out hf_model

`--checkpoint` is a run's output dir, its `checkpoints/` dir, one `global_stepN` dir, or a runs root such as
`runs/demo` (its `latest` run). The folder then loads with
`AutoModelForMaskedLM.from_pretrained("hf_model", trust_remote_code=True)` — offline, without grnformer_ds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run output dir, its checkpoints/ dir, a global_stepN dir, or a runs root (its latest run)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module (name or .py path) that registers the run's plug-in backbone")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from grnformer_ds.plugins import import_plugin
    from grnformer_ds.training.export import export_checkpoint

    for plugin in args.plugin:
        import_plugin(plugin)
    out = export_checkpoint(args.checkpoint, args.out, tag=args.tag)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
