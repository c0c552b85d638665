"""Gene co-expression graph for GRNFormer's edge-perturbation augmentation.

Definition (documented in docs/grn.md):
* Expression is log1p(counts / library size × 1e4) (`store_io.normalize_log1p`), per cell type, on at most
  `max_cells` sampled cells of that type; cell types with fewer than `min_cells` cells are skipped (counted).
* Within a cell type, for every gene with nonzero variance, its Pearson correlation with every other gene is computed
  (in gene blocks, so memory is block × G) and its `top_k` partners with correlation ≥ `min_corr` are kept
  (positive correlation only: "co-expressed in the same cells").
* The graph is the union over cell types, made symmetric (co-expression is undirected); a pair's weight is its
  largest correlation over the cell types where it was kept. Stored as a G × G CSR (`grn/coexpr`).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp


def topk_correlations(matrix: sp.spmatrix | np.ndarray, *, top_k: int = 20, min_corr: float = 0.2,
                      gene_block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene, its `top_k` most correlated partners with r ≥ min_corr: (rows, cols, r) arrays.

    `matrix`: (n_cells, G) normalised expression. Pearson r from sufficient statistics:
    r_ij = (Σ x_i x_j / n - µ_i µ_j) / (σ_i σ_j).
    """
    X = sp.csr_matrix(matrix, dtype=np.float64)
    n, n_genes = X.shape
    mean = np.asarray(X.mean(axis=0)).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(sq - mean**2, 0.0))
    varying = sd > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0)))
    cols_v = np.flatnonzero(varying)
    if n < 2 or cols_v.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    Xv = X[:, cols_v].tocsc()
    k = min(top_k, cols_v.size - 1)
    rows_out, cols_out, vals_out = [], [], []
    XvT = Xv.T.tocsr()
    for lo in range(0, cols_v.size, gene_block):
        hi = min(cols_v.size, lo + gene_block)
        cross = (XvT[lo:hi] @ Xv).toarray() / n  # (b, g) E[x_i x_j]
        corr = (cross - np.outer(mean[cols_v[lo:hi]], mean[cols_v])) / np.outer(sd[cols_v[lo:hi]], sd[cols_v])
        corr[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # no self-partner
        part = np.argpartition(-corr, k - 1, axis=1)[:, :k]
        r = np.take_along_axis(corr, part, axis=1)
        keep = r >= min_corr
        rr, cc = np.nonzero(keep)
        rows_out.append(cols_v[lo + rr])
        cols_out.append(cols_v[part[rr, cc]])
        vals_out.append(np.minimum(r[rr, cc], 1.0))
    return np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(vals_out)


def union_symmetric_max(parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], n_genes: int) -> sp.csr_matrix:
    """Union of (rows, cols, weight) edge lists, symmetrised, duplicates keeping the max weight → CSR float32."""
    rows, cols, vals = [], [], []
    for r, c, v in parts:
        rows += [r, c]
        cols += [c, r]
        vals += [v, v]
    if not rows:
        return sp.csr_matrix((n_genes, n_genes), dtype=np.float32)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    key = r.astype(np.int64) * n_genes + c
    order = np.lexsort((-v, key))
    key, v = key[order], v[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, v = key[first], v[first]
    out = sp.csr_matrix((v.astype(np.float32), (key // n_genes, key % n_genes)), shape=(n_genes, n_genes))
    out.sort_indices()
    return out


def coexpression_graph(matrices_by_type: dict, n_genes: int, report=None, *, top_k: int = 20, min_corr: float = 0.2,
                       min_cells: int = 20, names: dict | None = None) -> sp.csr_matrix:
    """The store's co-expression graph from {cell type: (n, G) normalised expression}; see the module docstring."""
    parts = []
    skipped = []
    for code, matrix in matrices_by_type.items():
        if matrix.shape[0] < min_cells:
            skipped.append((names or {}).get(code, str(code)))
            continue
        parts.append(topk_correlations(matrix, top_k=top_k, min_corr=min_corr))
    if report is not None:
        report.warn("coexpr_celltypes_skipped", len(skipped), f"co-expression: {len(skipped)} cell types have fewer "
                    f"than {min_cells} cells and add no links ({', '.join(map(str, skipped[:5]))})")
    graph = union_symmetric_max(parts, n_genes)
    if report is not None and graph.nnz == 0:
        report.warn("coexpr_empty", 1, f"co-expression graph is EMPTY: no gene pair reached r ≥ {min_corr} "
                    f"(lower --coexpr-min-corr)")
    return graph
