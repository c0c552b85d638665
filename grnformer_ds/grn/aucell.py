"""AUCell: per cell, the area under the recovery curve of each regulon's genes — pySCENIC/ctxcore's definition.

Definition (ctxcore 0.2 `recovery.aucs`, pySCENIC 0.12 `aucell.create_rankings`), for G genes and fraction `a`:

* **Ranking.** In each cell genes are ranked by expression, highest first, rank 0 … G-1. Ties are broken by one
  random permutation of the genes shared by all cells: pySCENIC shuffles the columns with
  `DataFrame.sample(frac=1, axis=1, random_state=seed)` and ranks with `method="first"`, so among equal values the
  gene that comes first in the permutation gets the smaller rank. `tie_break_order(G, seed)` reproduces that
  permutation exactly (pandas draws it with `np.random.RandomState(seed).choice(G, G, replace=False)`).
* **Cutoff.** `k = round(a * G) - 1` (`derive_rank_cutoff`, kept identical to R's AUCell, including its off-by-one).
* **AUC.** With regulon weights w (all 1 unless `weighted=True`):
  `AUC = Σ_{g in regulon, rank_g < k} w_g (k - rank_g) / ((k + 1) Σ_{g in regulon} w_g)`,
  which is the area under the step recovery curve up to rank k divided by the maximum for the set size.
  (ctxcore also returns 0 for a regulon with < 80 % of its genes in the matrix; our regulons only hold store genes,
  so that rule never applies.)

Why not call ctxcore: it materialises a dense cells × genes rank matrix (uint32, 80 GB for 1M × 20k) and loops over
regulons in Python. Here each block of cells is ranked sparsely (only nonzero genes are sorted; zeros are all tied,
so their order is the permutation's) and all regulons are scored with one sparse matrix product
(cells × genes "recovery weights" @ genes × regulons). Memory is O(block nnz + block × R); blocks run in worker
processes. The tests check equality with ctxcore/pySCENIC.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import scipy.sparse as sp


def rank_cutoff(n_genes: int, auc_threshold: float = 0.05) -> int:
    """ctxcore's `derive_rank_cutoff(auc_threshold, n_genes)`: round(a·G) - 1, with the same validity checks."""
    if not 0.0 < auc_threshold <= 1.0:
        raise ValueError(f"auc_threshold must be in (0, 1], got {auc_threshold}")
    cutoff = int(round(auc_threshold * n_genes))
    if not 0 < cutoff <= n_genes - 1:
        raise ValueError(f"auc_threshold {auc_threshold} keeps {cutoff} of {n_genes} genes; "
                         f"it must keep between 1 and {n_genes - 1}")
    return cutoff - 1


def tie_break_order(n_genes: int, seed: int | None) -> np.ndarray:
    """The column permutation pySCENIC's `create_rankings(ex_mtx, seed)` applies before ranking (int64, (G,))."""
    # pandas' DataFrame.sample(frac=1, random_state=seed) calls RandomState(seed).choice(n, n, replace=False).
    rng = np.random.RandomState(seed)
    return rng.choice(n_genes, size=n_genes, replace=False).astype(np.int64)


@dataclass(frozen=True)
class RegulonMatrix:
    """Regulons as a genes × regulons sparse weight matrix plus the AUC normalisers.

    `weights`: (G, R) CSR float64, w[g, r] = weight of gene g in regulon r; `max_auc`: (R,) = (k + 1) Σ_g w[g, r].
    """

    weights: sp.csr_matrix
    max_auc: np.ndarray
    cutoff: int

    @classmethod
    def from_csr(cls, indptr: np.ndarray, genes: np.ndarray, n_genes: int, *, weights: np.ndarray | None = None,
                 auc_threshold: float = 0.05) -> "RegulonMatrix":
        """Regulon r holds genes `genes[indptr[r]:indptr[r+1]]` (unique within a regulon) with optional weights.

        With `weights=None` every gene weighs 1 (pySCENIC's `aucell` CLI default, `noweights=True`).
        """
        indptr = np.asarray(indptr, np.int64)
        genes = np.asarray(genes, np.int64)
        n_reg = len(indptr) - 1
        w = np.ones(len(genes)) if weights is None else np.abs(np.asarray(weights, np.float64))
        mat = sp.csc_matrix((w, genes, indptr), shape=(n_genes, n_reg))
        mat.sum_duplicates()
        if mat.nnz != len(genes):
            raise ValueError("a regulon lists the same gene twice; merge duplicates first")
        cutoff = rank_cutoff(n_genes, auc_threshold)
        total = np.asarray(mat.sum(axis=0)).ravel()
        if np.any(total <= 0):
            raise ValueError(f"regulon {int(np.flatnonzero(total <= 0)[0])} has no gene with a positive weight")
        return cls(weights=mat.tocsr(), max_auc=(cutoff + 1) * total, cutoff=cutoff)

    @classmethod
    def from_assets(cls, assets, *, weighted: bool = False, include_tf: bool = False,
                    auc_threshold: float = 0.05) -> "RegulonMatrix":
        """From `GRNAssets` regulons (targets; the TF itself only with `include_tf=True`, as pySCENIC's
        `module_from_*` with `keep_only_activating`/`add TF` options do)."""
        indptr, genes, w = assets.regulon_indptr, assets.regulon_target, assets.regulon_weight
        if include_tf:
            n_reg = assets.n_regulons
            lengths = np.diff(indptr)
            rows = np.repeat(np.arange(n_reg), lengths)
            rows = np.concatenate([rows, np.arange(n_reg)])
            genes = np.concatenate([genes, assets.regulon_tf])
            w = np.concatenate([w, np.ones(n_reg, np.float32)])
            keep = np.ones(len(genes), bool)
            order = np.lexsort((genes, rows))
            rows, genes, w = rows[order], genes[order], w[order]
            keep[1:] = (rows[1:] != rows[:-1]) | (genes[1:] != genes[:-1])  # TF already a target: keep one
            rows, genes, w = rows[keep], genes[keep], w[keep]
            indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n_reg))]
        return cls.from_csr(indptr, genes, assets.n_genes, weights=w if weighted else None,
                            auc_threshold=auc_threshold)


def recovery_weights(block: sp.csr_matrix, cutoff: int, gene_position: np.ndarray,
                     order: np.ndarray) -> sp.csr_matrix:
    """Per cell, `k - rank` for the genes ranked above the cutoff k, as a sparse (n, G) matrix.

    `block`: (n, G) expression rows (non-negative); `gene_position[g]` = position of gene g in the tie-break
    permutation `order` (so `order[gene_position[g]] == g`).
    """
    n_cells, n_genes = block.shape
    block = block.tocsr(copy=True)
    block.eliminate_zeros()  # stored zeros tie with the implicit zeros
    if block.nnz and block.data.min() < 0:
        return _recovery_weights_dense(block, cutoff, gene_position)
    nnz_per_row = np.diff(block.indptr)
    row = np.repeat(np.arange(n_cells, dtype=np.int64), nnz_per_row)
    by = _row_major_order(row, block.data, gene_position[block.indices], n_cells, n_genes)
    rank = np.arange(block.nnz, dtype=np.int64) - block.indptr[row]  # rank of the by-th entry within its row
    genes_sorted = block.indices[by]
    top = rank < cutoff
    rows_out = [row[top]]
    cols_out = [genes_sorted[top].astype(np.int64)]
    vals_out = [(cutoff - rank[top]).astype(np.float64)]

    # Cells with fewer than k expressed genes: the next ranks go to zero-expression genes in permutation order.
    # Those all lie among the first k genes of the permutation (at most nnz of them are expressed).
    short = np.flatnonzero(nnz_per_row < cutoff)
    if short.size:
        head = order[:cutoff]
        expressed = block[short][:, head].toarray() != 0  # (n_short, k)
        zero = ~expressed
        zero_rank = nnz_per_row[short, None] + np.cumsum(zero, axis=1) - 1
        keep = zero & (zero_rank < cutoff)
        r_idx, c_idx = np.nonzero(keep)
        rows_out.append(short[r_idx])
        cols_out.append(head[c_idx])
        vals_out.append((cutoff - zero_rank[r_idx, c_idx]).astype(np.float64))
    rows_all, cols_all, vals_all = (np.concatenate(x) for x in (rows_out, cols_out, vals_out))
    return sp.csr_matrix((vals_all, (rows_all, cols_all)), shape=(n_cells, n_genes))


def _row_major_order(row: np.ndarray, value: np.ndarray, position: np.ndarray, n_rows: int,
                     n_genes: int) -> np.ndarray:
    """Order of the entries by (row asc, value desc, tie-break position asc) — the per-cell gene ranking.

    For non-negative float32 values the IEEE bit pattern is monotonic, so the three keys pack into one uint64
    (row | inverted value bits | position) and one argsort replaces a 3-key lexsort (≈ 3× faster). Keys never tie
    (positions are unique within a row), so an unstable sort is exact. Falls back to lexsort when they do not fit.
    """
    pos_bits = max(1, int(n_genes - 1).bit_length())
    row_bits = max(1, int(n_rows - 1).bit_length())
    if pos_bits + row_bits + 32 <= 64:
        bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
        key = (row.astype(np.uint64) << np.uint64(32 + pos_bits)) \
            | ((np.uint32(0xFFFFFFFF) - bits).astype(np.uint64) << np.uint64(pos_bits)) \
            | position.astype(np.uint64)
        return np.argsort(key)
    return np.lexsort((position, -value, row))  # np.lexsort's last key is primary


def _recovery_weights_dense(block: sp.csr_matrix, cutoff: int, gene_position: np.ndarray) -> sp.csr_matrix:
    """Same as `recovery_weights` for data with negative values (e.g. scaled): rank the dense rows."""
    dense = block.toarray()
    order = np.argsort(gene_position)
    # Stable sort of -value over genes laid out in permutation order == pandas rank(method="first") on them.
    by = np.argsort(-dense[:, order], axis=1, kind="stable")[:, :cutoff]
    genes = order[by]
    n_cells = dense.shape[0]
    vals = np.broadcast_to(cutoff - np.arange(cutoff, dtype=np.float64), genes.shape)
    rows = np.repeat(np.arange(n_cells), cutoff)
    return sp.csr_matrix((vals.ravel(), (rows, genes.ravel())), shape=block.shape)


def aucell_block(block: sp.csr_matrix | np.ndarray, regulons: RegulonMatrix, order: np.ndarray) -> np.ndarray:
    """AUCell of one block of cells: (n, G) expression → (n, R) float32 AUCs."""
    block = sp.csr_matrix(block)
    gene_position = np.empty_like(order)
    gene_position[order] = np.arange(len(order))
    rec = recovery_weights(block, regulons.cutoff, gene_position, order)
    auc = (rec @ regulons.weights).toarray() / regulons.max_auc[None, :]
    return auc.astype(np.float32)


# ---------------------------------------------------------------------- parallel streaming driver
_WORKER_STATE: dict = {}


def _init_worker(regulons: RegulonMatrix, order: np.ndarray) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_STATE["args"] = (regulons, order)


def _materialize(block):
    """A block is a matrix or a lazy reference with `.load()` (e.g. `store_io.ShardRows`): workers then read their
    own rows from disk instead of receiving pickled matrices from the parent."""
    return block.load() if hasattr(block, "load") else block


def _score_in_worker(block) -> np.ndarray:
    regulons, order = _WORKER_STATE["args"]
    return aucell_block(_materialize(block), regulons, order)


def aucell_stream(blocks: Iterable[sp.csr_matrix], regulons: RegulonMatrix, *, seed: int | None = 0,
                  n_workers: int = 1, max_in_flight: int | None = None) -> Iterator[np.ndarray]:
    """Score an iterable of (n_i, G) cell blocks, yielding (n_i, R) float32 AUCs in the same order.

    A block is a CSR/dense matrix or a lazy reference with `.load()` (read inside the worker).
    At most `max_in_flight` blocks (default 2 × n_workers) are pending at once, so memory stays bounded by a few
    blocks whatever the number of cells. The tie-break permutation depends only on (G, seed), so the result does not
    depend on the block size or the number of workers.
    """
    n_genes = regulons.weights.shape[0]
    order = tie_break_order(n_genes, seed)
    if n_workers <= 1:
        for block in blocks:
            yield aucell_block(_materialize(block), regulons, order)
        return
    import multiprocessing as mp
    from collections import deque

    max_in_flight = max_in_flight or 2 * n_workers
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(regulons, order)) as pool:
        pending: deque = deque()
        for block in blocks:
            pending.append(pool.submit(_score_in_worker, block))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def iter_row_blocks(matrix, block_size: int) -> Iterator[sp.csr_matrix]:
    """Row blocks of an in-memory matrix (CSR or dense) as CSR."""
    for start in range(0, matrix.shape[0], block_size):
        yield sp.csr_matrix(matrix[start:start + block_size])


def aucell(matrix, regulons: RegulonMatrix, *, seed: int | None = 0, block_size: int = 4096,
           n_workers: int = 1) -> np.ndarray:
    """AUCell of an in-memory (n_cells, G) matrix (CSR or dense): (n_cells, R) float32."""
    parts = list(aucell_stream(iter_row_blocks(matrix, block_size), regulons, seed=seed, n_workers=n_workers))
    if not parts:
        return np.zeros((0, regulons.weights.shape[1]), np.float32)
    return np.concatenate(parts, axis=0)
