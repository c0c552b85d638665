#!/usr/bin/env python
"""Cell embeddings of a trained or imported GRNFormer, written as an AnnData.

    python launchers/embed.py --model my_model --data my_store --out cells.h5ad
    python launchers/embed.py --model my_model --data my_cells.h5ad --out cells.h5ad     # mapped on the fly
    torchrun --nproc_per_node 8 launchers/embed.py --model my_model --data my_store --out cells.h5ad   # every GPU

The output holds one row per cell, each exactly once: in store order for a store, in the file's order for an .h5ad
(its own obs kept), with `obs` cell_index / cell_type / source_file, `obsm["X_grnformer"]` the cell embeddings and,
with --gene-embeddings, `varm["X_grnformer_gene"]` the model's gene-token embeddings of the store's genes. An .h5ad
is first converted to a temporary store on the model's vocabulary (`build_store.py --gene-vocab`: the mapping report
is printed; no GRN graphs then). Under torchrun each rank embeds its share and rank 0 writes the file.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from grnformer_ds.errors import UserInputError, cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a folder written by export_hf.py or import_checkpoint.py")
    p.add_argument("--data", required=True, help="a store (build_store.py) or an .h5ad of counts")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget of a packed micro-batch")
    p.add_argument("--batch-size", type=int, default=None, help="padded batches of this many cells instead")
    p.add_argument("--no-graph", action="store_true", help="embed without the GRN graphs")
    p.add_argument("--gene-embeddings", action="store_true", help="also write varm['X_grnformer_gene']")
    p.add_argument("--cell-type-key", default=None, help=".h5ad input: obs column with cell types")
    p.add_argument("--layer", default=None, help=".h5ad input: count layer (default X)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when visible)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _distributed():
    """(rank, world_size, local_rank) under torchrun / deepspeed, initialising the process group."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from grnformer_ds.training.console import quiet_libraries

    quiet_libraries(verbose=False)  # no transformers load report / progress bars around our lines
    import numpy as np
    import torch

    from grnformer_ds.errors import load_json_object
    from grnformer_ds.inference import embed, gather_embeddings, load_model
    from grnformer_ds.inference.output import cells_anndata, h5ad_store

    if not args.out.endswith(".h5ad"):
        raise UserInputError("--out must end in .h5ad", args.out)
    if not os.path.exists(args.data):
        raise UserInputError("not found (a store directory or an .h5ad)", args.data)
    rank, world, local = _distributed()
    say = print if rank == 0 else (lambda line: None)
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device=device)
    vocab = {k: int(v) for k, v in load_json_object(os.path.join(args.model, "vocab.json"), "vocabulary").items()}
    say(f"model: {args.model}: backbone {model.config.backbone}, {model.config.num_hidden_layers} layers x "
        f"{model.config.hidden_size}, GRN parts {'yes' if model.config.use_graph else 'no'}")
    # an .h5ad becomes a store next to the output (one path every rank sees), removed at the end
    tmp_store = os.path.abspath(args.out) + ".store.tmp"
    try:
        if os.path.isfile(args.data):
            store = h5ad_store(args.data, tmp_store, os.path.join(args.model, "vocab.json"), args.cell_type_key,
                               args.layer, rank, world, say)
        else:
            store = args.data
        result = embed(model, store, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       graphs=False if args.no_graph else None, rank=rank, world_size=world, vocab=vocab,
                       progress=not args.no_progress, say=say)
        from grnformer_ds.store import open_store

        opened = open_store(store)
        if world > 1:
            import torch.distributed as dist

            parts = [None] * world
            dist.all_gather_object(parts, result)
        else:
            parts = [result]
        if rank == 0:
            full = gather_embeddings(parts, opened.n_cells)
            genes = None
            if args.gene_embeddings:
                with torch.no_grad():
                    ids = torch.as_tensor(opened.token_ids, device=model.device)
                    genes = model.grnformer.gene_encoder(ids).float().cpu().numpy()
            adata = cells_anndata(opened, full, genes, args.data if os.path.isfile(args.data) else None)
            out_dir = os.path.dirname(os.path.abspath(args.out))
            os.makedirs(out_dir, exist_ok=True)
            adata.write_h5ad(args.out + ".tmp")
            os.replace(args.out + ".tmp", args.out)
            say(f"wrote {args.out}: {adata.n_obs:,} cells x {full.cells.shape[1]} (obsm['X_grnformer'])"
                + (f", varm['X_grnformer_gene'] {genes.shape[1]}-d" if genes is not None else "")
                + f"; embedding norm mean {float(np.linalg.norm(full.cells, axis=1).mean()):.3g}")
        if world > 1:
            torch.distributed.barrier()
    finally:
        if rank == 0 and os.path.isdir(tmp_store):
            import shutil

            shutil.rmtree(tmp_store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
