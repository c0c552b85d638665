"""Where embeddings come from and go to: an .h5ad turned into a store on the model's vocabulary, and the AnnData that
`launchers/embed.py` writes (one row per cell, `obsm["X_grnformer"]`)."""
from __future__ import annotations

import os
import shutil
from typing import Callable

import numpy as np
import pandas as pd

from grnformer_ds.errors import UserInputError

from .embed import Embeddings


def h5ad_store(h5ad: str, out: str, vocab_path: str, cell_type_key: str | None, layer: str | None, rank: int,
               world_size: int, say: Callable[[str], None]) -> str:
    """A store at `out` with the .h5ad's cells on the model's vocabulary (rank 0 builds it, the others wait). The
    builder prints which fraction of the counts maps to the vocabulary and refuses a file that maps nothing."""
    from grnformer_ds.store.builder import build_store

    if rank == 0:
        if os.path.exists(out):
            shutil.rmtree(out)
        say(f"mapping {h5ad} onto the model's vocabulary (a store at {out})")
        store = build_store([h5ad], out, gene_vocab=vocab_path, cell_type_key=cell_type_key, layer=layer,
                            progress=False)
        for inp in (store.manifest.get("inputs") or []):
            frac = inp.get("count_fraction_mapped")
            say(f"{inp.get('n_genes_mapped', '?'):,} of the file's genes are in the model's vocabulary"
                + (f", {frac:.1%} of its counts" if frac is not None else ""))
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return out


def store_obs(store) -> pd.DataFrame:
    """The store's obs (cell names; cell_index, cell_type, source_file, library_size, n_genes), in store order."""
    import anndata as ad
    import zarr

    parts = [ad.io.read_elem(zarr.open_group(p, mode="r")["obs"]) for p in store.shard_paths]
    obs = pd.concat(parts) if parts else pd.DataFrame()
    return obs.sort_values("cell_index", kind="stable") if "cell_index" in obs else obs


def input_obs(h5ad: str) -> pd.DataFrame:
    import anndata as ad
    import h5py

    with h5py.File(h5ad, "r") as f:
        return ad.io.read_elem(f["obs"])


def cells_anndata(store, emb: Embeddings, gene_embeddings: np.ndarray | None, h5ad: str | None = None):
    """AnnData (n_cells x store genes, no X): obs from the store (cell_index, cell_type, source_file, ...),
    obsm["X_grnformer"], var = the store's genes (+ varm["X_grnformer_gene"]). For an .h5ad input the rows follow
    the file's order and keep its obs columns when its cell names are unique (else store order)."""
    import anndata as ad

    if len(emb.cell_index) != store.n_cells or not np.array_equal(emb.cell_index, np.arange(store.n_cells)):
        raise UserInputError(f"embeddings cover {len(emb.cell_index)} of the store's {store.n_cells} cells",
                             str(store.path))
    obs = store_obs(store)
    cells = emb.cells
    obs.index = obs.index.astype(str)
    if h5ad is not None:
        source = input_obs(h5ad)
        source.index = source.index.astype(str)
        if source.index.is_unique and obs.index.is_unique and set(obs.index) <= set(source.index):
            order = pd.Index(obs.index).get_indexer([n for n in source.index if n in set(obs.index)])
            kept = source.loc[obs.index[order]]
            extra = kept[[c for c in kept.columns if c not in obs.columns]]
            obs = pd.concat([obs.iloc[order], extra.set_axis(obs.index[order])], axis=1)
            cells = cells[order]
    var = store.var.copy()
    var.index = var.index.astype(str)
    adata = ad.AnnData(obs=obs, var=var)
    adata.obsm["X_grnformer"] = cells
    if gene_embeddings is not None:
        adata.varm["X_grnformer_gene"] = gene_embeddings.astype(np.float32)
    return adata
