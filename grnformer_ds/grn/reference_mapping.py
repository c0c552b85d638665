"""GRNs for RNA-only data by reference mapping (the paper's route when a dataset has no ATAC).

`build_grn.py --store QUERY --reference-store REF --reference-model MODEL [--k 15]`:

1. embed the reference's and the query's cells with the model (`inference.embed`; both stores on the model's
   vocabulary, as `build_store.py --gene-vocab MODEL/vocab.json` makes them);
2. give each query cell the majority cell type of its k nearest reference cells (cosine distance on the embeddings;
   ties go to the type whose voters are closer in total) and store the vote share as `obs["cell_type_confidence"]`;
   the query's cell-type categories become the reference's (a query's own previous labels are kept as
   `obs["cell_type_before_mapping"]`);
3. hand the reference's cell-type GRNs to the usual build as a TF–target table with a cell_type column, so the
   query's regulons, AUCell scores, thresholds (cell-specific GRNs) and co-expression graph are computed on its own
   expression as for any other prior.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import UserInputError


def knn_majority(query: np.ndarray, reference: np.ndarray, ref_labels: np.ndarray, k: int = 15
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (Nq,) int64, confidence (Nq,) float32 = the winning type's share of the k votes). Cosine distance;
    a tie goes to the type whose voters have the smaller summed distance."""
    from sklearn.neighbors import NearestNeighbors

    k = min(int(k), len(reference))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(reference)
    dist, idx = nn.kneighbors(query)
    votes = ref_labels[idx]  # (Nq, k)
    n_types = int(ref_labels.max()) + 1
    counts = np.zeros((len(query), n_types))
    dsum = np.zeros((len(query), n_types))
    rows = np.repeat(np.arange(len(query)), k)
    np.add.at(counts, (rows, votes.ravel()), 1.0)
    np.add.at(dsum, (rows, votes.ravel()), dist.ravel())
    score = counts - dsum / (dsum.max() + k + 1.0)  # counts first; summed distance < 1 only breaks ties
    labels = score.argmax(1).astype(np.int64)
    return labels, (counts[np.arange(len(query)), labels] / k).astype(np.float32)


def write_cell_types(store, names: list[str], labels: np.ndarray, confidence: np.ndarray) -> None:
    """Set the store's cell types (store order) to `names[labels]`, with `obs["cell_type_confidence"]`, in every
    shard's obs and in the manifest."""
    import anndata as ad
    import zarr

    from ..store.manifest import read_manifest, write_manifest
    from .assets import _has_consolidated

    offsets = store.cell_offsets
    for i, path in enumerate(store.shard_paths):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
        was_consolidated = _has_consolidated(path)
        obs = ad.io.read_elem(group["obs"])
        if "cell_type" in obs and "cell_type_before_mapping" not in obs:
            obs["cell_type_before_mapping"] = obs["cell_type"]
        order = np.argsort(obs["cell_index"].to_numpy()) if "cell_index" in obs else np.arange(hi - lo)
        codes = np.empty(hi - lo, np.int64)
        codes[order] = labels[lo:hi]
        conf = np.empty(hi - lo, np.float32)
        conf[order] = confidence[lo:hi]
        obs["cell_type"] = pd.Categorical.from_codes(codes, categories=list(names))
        obs["cell_type_confidence"] = conf
        del group["obs"]
        with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
            ad.io.write_elem(group, "obs", obs)
        if was_consolidated:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(path))
    manifest = read_manifest(store.path)
    manifest["cell_types"] = list(names)
    write_manifest(store.path, manifest)


def reference_network_table(reference_path: str, out: str) -> str:
    """The reference store's cell-type GRNs as a TSV (source, target, weight, sign, cell_type) by gene symbol."""
    from .assets import read_grn_assets

    a = read_grn_assets(reference_path)
    rows = []
    for c, name in enumerate(a.celltype_names.tolist()):
        lo, hi = int(a.celltype_indptr[c]), int(a.celltype_indptr[c + 1])
        rows.append(pd.DataFrame({"source": a.genes[a.celltype_src[lo:hi]], "target": a.genes[a.celltype_dst[lo:hi]],
                                  "weight": a.celltype_weight[lo:hi], "sign": a.celltype_sign[lo:hi],
                                  "cell_type": name}))
    table = pd.concat(rows) if rows else pd.DataFrame(columns=["source", "target", "weight", "sign", "cell_type"])
    table.to_csv(out, sep="\t", index=False)
    return out


def map_to_reference(query_path: str, reference_path: str, model_dir: str, k: int, table_out: str,
                     log: Callable[[str], None] = print) -> dict:
    """Steps 1-2 of the module docstring, and the reference's GRN table for step 3 (`table_out`). Returns a summary."""
    from ..errors import load_json_object
    from ..inference import embed, load_model
    from ..inference.probe import store_cell_types
    from ..store import open_store
    from .assets import has_grn_assets

    if not os.path.isdir(reference_path):
        raise UserInputError("reference store directory not found", reference_path)
    if not has_grn_assets(reference_path):
        raise UserInputError("the reference store has no GRN assets (build them first)", reference_path)
    ref, query = open_store(reference_path), open_store(query_path)
    ref_labels = store_cell_types(ref)
    known = ref_labels >= 0
    if known.sum() < 1 or not ref.cell_types:
        raise UserInputError("the reference store has no cell types (build it with --cell-type-key)", reference_path)
    if k < 1:
        raise UserInputError(f"--k must be >= 1, got {k}")
    model = load_model(model_dir)  # checks the folder's files first
    vocab = {t: int(i) for t, i in load_json_object(os.path.join(model_dir, "vocab.json"), "vocabulary").items()}
    log(f"reference mapping: embedding {ref.n_cells:,} reference and {query.n_cells:,} query cells with {model_dir}")
    ref_emb = embed(model, ref, vocab=vocab, graphs=False).cells
    query_emb = embed(model, query, vocab=vocab, graphs=False).cells
    labels, confidence = knn_majority(query_emb, ref_emb[known], ref_labels[known], k)
    names = list(ref.cell_types)
    write_cell_types(query, names, labels, confidence)
    reference_network_table(reference_path, table_out)
    counts = np.bincount(labels, minlength=len(names))
    summary = {"k": int(k), "mean_confidence": float(confidence.mean()),
               "cells_per_type": {n: int(c) for n, c in zip(names, counts) if c}}
    log(f"reference mapping: {query.n_cells:,} query cells typed by their {k} nearest reference cells (mean vote "
        f"share {confidence.mean():.2f}): " + ", ".join(f"{n} {c}" for n, c in summary["cells_per_type"].items()))
    return summary
