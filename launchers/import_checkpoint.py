#!/usr/bin/env python
"""Import a checkpoint of another project (scGPT, scFoundation, ...) as a GRNFormer Hugging Face folder.

    python launchers/import_checkpoint.py --from scgpt path/to/scGPT_human --out scgpt_human_hf
    python launchers/import_checkpoint.py --from scfoundation path/to/models.ckpt --variant cell \
        --gene-list path/to/OS_scRNA_gene_index.19264.tsv --out scfoundation_hf

The output is the folder `export_hf.py` writes (safetensors, config.json with auto_map, the modeling code, vocab.json =
the checkpoint's gene vocabulary); it loads offline with AutoModelForMaskedLM.from_pretrained(OUT,
trust_remote_code=True) and continued pretraining starts from it with `pretrain.py --init-from OUT`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from grnformer_ds.modeling import backbone_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="backbone", required=True, metavar="BACKBONE", choices=backbone_names(),
                   help="the checkpoint's project: scgpt (a folder with best_model.pt, args.json, vocab.json), "
                        "scfoundation (models.ckpt)")
    p.add_argument("source", help="the checkpoint (folder or file, as the project writes it)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--variant", default=None,
                   help="which model of a multi-model checkpoint (scfoundation: cell (default), gene, rde)")
    p.add_argument("--gene-list", default=None, metavar="FILE",
                   help="the checkpoint's gene order where it does not store one (scfoundation: "
                        "OS_scRNA_gene_index.19264.tsv, looked for next to the checkpoint by default)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module (name or .py path) that registers a plug-in backbone with an importer")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    from grnformer_ds.plugins import load_plugins

    load_plugins(argv)
    args = parse_args(argv)
    from grnformer_ds.training.importing import import_checkpoint

    import_checkpoint(args.backbone, args.source, args.out, args.variant, gene_list=args.gene_list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
