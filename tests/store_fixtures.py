"""Small synthetic .h5ad inputs for the store tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_counts(n_cells: int, n_genes: int, seed: int, density: float = 0.3, zero_rows: tuple = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32) * (rng.random((n_cells, n_genes)) < density)
    for r in zero_rows:
        X[r] = 0
    return X


def write_h5ad(path: Path, X: np.ndarray, genes: list[str], fmt: str = "csr", cell_prefix: str = "c",
               cell_types: list[str] | None = None, gene_ids: list[str] | None = None, layer: str | None = None,
               seed: int = 0) -> Path:
    """Write X (cells × genes, dense numpy) as an h5ad in `fmt` (csr / csc / dense), optionally into a layer."""
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(index=[f"{cell_prefix}{i}" for i in range(n)])
    cats = cell_types or ["B", "T", "NK"]
    obs["cell_type"] = pd.Categorical(rng.choice(cats, size=n), categories=cats)
    var = pd.DataFrame(index=list(genes))
    if gene_ids is not None:
        var["gene_ids"] = gene_ids
    M = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](X)
    if layer:
        a = ad.AnnData(X=np.log1p(X) if fmt == "dense" else sp.csr_matrix(np.log1p(X)), obs=obs, var=var,
                       layers={layer: M})
    else:
        a = ad.AnnData(X=M, obs=obs, var=var)
    a.write_h5ad(path)
    return path


def store_rows_by_name(store) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{cell name: (store columns, counts)} over all shards of an opened store, read with anndata.read_zarr."""
    out = {}
    for i in range(len(store.shards)):
        a = store.read_shard(i)
        X = a.X.tocsr()
        for r, name in enumerate(a.obs_names):
            s = slice(X.indptr[r], X.indptr[r + 1])
            out[name] = (X.indices[s].copy(), X.data[s].copy())
    return out
