"""Cell-type GRNs for RNA-only data (`--infer`): a prior network filtered by each cell type's own expression.

Method "correlation" (default; no extra dependency). Per cell type, on log1p-normalised expression of at most
`max_cells` sampled cells, a prior edge TF → target is kept when

* the TF and the target are both expressed (value > 0) in at least `min_expr_frac` of the cells (default 0.05), and
* they co-vary: |Pearson r(TF, target)| ≥ `min_abs_corr` (default 0.1).

The kept edge's weight is |r|. Its sign is the prior's sign when the prior is signed (has any negative edge or an
explicit sign column), otherwise the sign of r.

Method "grnboost2" (when `arboreto` is installed): per cell type, each target gene is regressed on the candidate TFs
(the prior's TFs, or `--tf-list`) with arboreto's `infer_partial_network` (GRNBoost2's stochastic gradient boosting;
`arboreto.grnboost2` itself needs an old dask). Each TF keeps its `top_targets` most important targets
(pySCENIC's "top50" module rule); with a prior, only prior edges are kept. Weight = importance, sign = sign of r.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

INFER_METHODS = ("correlation", "grnboost2")


def _standardized_columns(matrix: sp.csr_matrix, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense z-scored columns (n, len(cols)) and their std (0 → column left at 0)."""
    dense = sp.csc_matrix(matrix)[:, cols].toarray().astype(np.float64)
    mean = dense.mean(axis=0)
    sd = dense.std(axis=0)
    z = np.divide(dense - mean, sd, out=np.zeros_like(dense), where=sd > 0)
    return z, sd


def pair_correlations(matrix: sp.spmatrix, src: np.ndarray, dst: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """Pearson r between columns src[e] and dst[e] of `matrix` (n, G) for each edge e; 0 where a gene is constant."""
    genes = np.unique(np.concatenate([src, dst]))
    z, _ = _standardized_columns(sp.csr_matrix(matrix), genes)
    pos = np.searchsorted(genes, src), np.searchsorted(genes, dst)
    n = max(1, z.shape[0])
    out = np.empty(len(src))
    for lo in range(0, len(src), chunk):
        hi = min(len(src), lo + chunk)
        out[lo:hi] = np.einsum("ne,ne->e", z[:, pos[0][lo:hi]], z[:, pos[1][lo:hi]]) / n
    return np.clip(out, -1.0, 1.0)


def expressed_fraction(matrix: sp.spmatrix) -> np.ndarray:
    """(G,) fraction of cells with a value > 0."""
    m = sp.csr_matrix(matrix)
    return np.asarray((m > 0).sum(axis=0)).ravel() / max(1, m.shape[0])


def filter_prior_by_expression(matrix: sp.spmatrix, prior: pd.DataFrame, *, min_expr_frac: float = 0.05,
                               min_abs_corr: float = 0.1, signed_prior: bool | None = None) -> pd.DataFrame:
    """Prior edges (src, dst, weight, sign) kept in one cell type (see module docstring); weight = |r|.

    Returns columns src, dst, weight, sign, corr.
    """
    src = prior["src"].to_numpy(np.int64)
    dst = prior["dst"].to_numpy(np.int64)
    frac = expressed_fraction(matrix)
    expressed = (frac[src] >= min_expr_frac) & (frac[dst] >= min_expr_frac)
    corr = np.zeros(len(src))
    if expressed.any():
        corr[expressed] = pair_correlations(matrix, src[expressed], dst[expressed])
    keep = expressed & (np.abs(corr) >= min_abs_corr)
    if signed_prior is None:
        signed_prior = bool((prior["sign"] < 0).any())
    sign = prior["sign"].to_numpy(np.int8) if signed_prior else np.where(corr < 0, -1, 1).astype(np.int8)
    return pd.DataFrame({"src": src[keep].astype(np.int32), "dst": dst[keep].astype(np.int32),
                         "weight": np.abs(corr[keep]), "sign": sign[keep], "corr": corr[keep]})


def grnboost2_edges(matrix: sp.spmatrix, tf_cols: np.ndarray, gene_names, *, targets: np.ndarray | None = None,
                    top_targets: int = 50, seed: int = 0, prior: pd.DataFrame | None = None) -> pd.DataFrame:
    """GRNBoost2 (arboreto `infer_partial_network`, SGBM) on one cell type; returns src, dst, weight, sign."""
    try:
        from arboreto.core import SGBM_KWARGS, infer_partial_network
    except ImportError as exc:  # optional dependency
        from ..errors import UserInputError

        raise UserInputError(f"--infer-method grnboost2 needs the arboreto package ({exc})") from None
    dense = sp.csr_matrix(matrix).toarray().astype(np.float32)
    names = np.asarray(gene_names, dtype=object)
    tf_cols = np.asarray(sorted(set(int(t) for t in tf_cols)))
    tf_cols = tf_cols[dense[:, tf_cols].std(axis=0) > 0]
    targets = np.arange(dense.shape[1]) if targets is None else np.asarray(targets)
    targets = targets[dense[:, targets].std(axis=0) > 0]
    if tf_cols.size == 0 or targets.size == 0:
        return pd.DataFrame({"src": [], "dst": [], "weight": [], "sign": []})
    tf_matrix = dense[:, tf_cols]
    tf_names = [str(n) for n in names[tf_cols]]
    frames = []
    for t in targets:
        if tf_cols.size == 1 and tf_cols[0] == t:
            continue
        links = infer_partial_network("GBM", SGBM_KWARGS, tf_matrix, tf_names, str(names[t]), dense[:, t],
                                      include_meta=False, seed=seed)
        frames.append(links)
    if not frames:
        return pd.DataFrame({"src": [], "dst": [], "weight": [], "sign": []})
    links = pd.concat(frames, ignore_index=True)
    col_of = {str(n): i for i, n in enumerate(names)}
    links["src"] = links["TF"].map(col_of).astype(np.int64)
    links["dst"] = links["target"].map(col_of).astype(np.int64)
    links = links[links["importance"] > 0]
    if prior is not None:
        allowed = set(zip(prior["src"].to_numpy().tolist(), prior["dst"].to_numpy().tolist()))
        links = links[[(s, d) in allowed for s, d in zip(links["src"], links["dst"])]]
    links = links.sort_values("importance", ascending=False, kind="stable").groupby("src").head(top_targets)
    corr = pair_correlations(matrix, links["src"].to_numpy(), links["dst"].to_numpy()) if len(links) else np.zeros(0)
    return pd.DataFrame({"src": links["src"].to_numpy(np.int32), "dst": links["dst"].to_numpy(np.int32),
                         "weight": links["importance"].to_numpy(np.float64),
                         "sign": np.where(corr < 0, -1, 1).astype(np.int8)})
