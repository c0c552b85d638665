"""Reference (plain numpy) edge perturbation of a batch's cell-specific GRNs (GRNFormer, training only): the same
rules as ``perturb.py`` (numba, per cell) with another random-draw scheme; kept as a readable specification and
checked by the same property tests.

In every cell a fraction ``alpha`` (paper default 0.2) of its GRN edges is replaced by co-expression links between
genes that are tokens of that cell (hence expressed in it), drawn from the store's gene co-expression graph
(``STORE/grn/coexpr``). The edge count of each cell is kept: ``k = min(round(alpha * E_cell), #candidates)`` edges are
removed uniformly at random and ``k`` distinct candidate links (co-expression edges u -> v between two different token
genes of the cell, not already an edge of its graph) are added uniformly at random, with their co-expression weight.

Sampling, vectorised over the batch. Enumerating every candidate costs (tokens x co-expression degree) per cell, far
more than the ~alpha * E links needed, so candidates are drawn by rejection: a uniformly random entry of the
co-expression rows of the cell's tokens is a uniformly random (u, v) link; it is accepted when v is a token, v != u and
the link is new. The first k distinct accepted proposals are a uniform k-subset of the candidates. Cells still short
after a few rounds (few candidates) fall back to full enumeration, which also gives the exact candidate count.
"""
from __future__ import annotations

import numpy as np

_ROUNDS = 3


def _in_sorted(keys: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    if len(sorted_ref) == 0:
        return np.zeros(len(keys), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_ref, keys), len(sorted_ref) - 1)
    return sorted_ref[i] == keys


def _first_per_cell(cell: np.ndarray, keys: np.ndarray, order_key: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Indices of distinct ``keys`` (first occurrence by ``order_key``), at most quota[cell] per cell, by cell."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(keys, return_index=True)
    first = first[np.lexsort((order_key[first], cell[first]))]
    c = cell[first]
    counts = np.bincount(c, minlength=len(quota))
    rank = np.arange(len(first)) - np.repeat(np.cumsum(counts) - counts, counts)
    return first[rank < quota[c]]


def sample_coexpr_links(need: np.ndarray, table: np.ndarray, slot_genes: np.ndarray, indptr: np.ndarray,
                        indices: np.ndarray, data: np.ndarray, existing_sorted: np.ndarray,
                        rng: np.random.Generator):
    """Up to need[b] new co-expression links per cell b -> (cell, src slot, dst slot, weight), grouped by cell.

    table: (B, G) slot of each gene per cell; slot_genes: (B, L); existing_sorted: sorted keys
    ``(cell * L + src) * L + dst`` of the edges the cells already have."""
    n_cells, seq_len = slot_genes.shape
    b, l = np.nonzero(slot_genes >= 0)  # tokens, grouped by cell
    genes = slot_genes[b, l]
    deg = (indptr[genes + 1] - indptr[genes]).astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(deg)])
    tok_lo = np.searchsorted(b, np.arange(n_cells), "left")
    tok_hi = np.searchsorted(b, np.arange(n_cells), "right")
    entry_lo, n_entries = cum[tok_lo], cum[tok_hi] - cum[tok_lo]
    remaining = np.where(n_entries > 0, need, 0).astype(np.int64)

    got = []  # (cell, src, dst, weight, key)
    taken = np.zeros(0, dtype=np.int64)

    def accept(cell, src, dst, w, order_key):
        nonlocal taken
        key = (cell.astype(np.int64) * seq_len + src) * seq_len + dst
        ok = ~_in_sorted(key, existing_sorted) & ~_in_sorted(key, taken)  # taken is kept sorted
        cell, src, dst, w, key, order_key = cell[ok], src[ok], dst[ok], w[ok], key[ok], order_key[ok]
        pick = _first_per_cell(cell, key, order_key, remaining)
        got.append((cell[pick], src[pick], dst[pick], w[pick]))
        taken = np.sort(np.concatenate([taken, key[pick]]))
        remaining[:] -= np.bincount(cell[pick], minlength=n_cells)

    for r in range(_ROUNDS):
        if not remaining.any():
            break
        n_prop = np.where(remaining > 0, (4 * remaining + 16) << r, 0)
        pcell = np.repeat(np.arange(n_cells), n_prop)
        entry = entry_lo[pcell] + (rng.random(len(pcell)) * n_entries[pcell]).astype(np.int64)
        tok = np.searchsorted(cum, entry, "right") - 1
        pos = indptr[genes[tok]] + (entry - cum[tok])
        nbr = indices[pos]
        dst = table.reshape(-1)[pcell * table.shape[1] + nbr].astype(np.int64)  # flat take: cheaper than 2-d
        valid = (dst >= 0) & (nbr != genes[tok])
        accept(pcell[valid], l[tok][valid].astype(np.int64), dst[valid], data[pos][valid],
               np.arange(len(pcell))[valid])

    short = np.flatnonzero(remaining > 0)
    if len(short):  # few candidates (or unlucky): enumerate them all for these cells, random order
        in_short = np.isin(b, short)
        t = np.flatnonzero(in_short)
        deg_t = deg[t]
        owner = np.repeat(t, deg_t)
        pos = np.arange(int(deg_t.sum()), dtype=np.int64) - np.repeat(np.cumsum(deg_t) - deg_t, deg_t)
        pos += np.repeat(indptr[genes[t]], deg_t)
        cell, nbr = b[owner], indices[pos]
        dst = table[cell, nbr].astype(np.int64)
        valid = (dst >= 0) & (nbr != genes[owner])
        accept(cell[valid], l[owner][valid].astype(np.int64), dst[valid], data[pos][valid],
               rng.random(int(valid.sum())))
    return tuple(np.concatenate([g[k] for g in got]) if got else np.zeros(0) for k in range(4))


def perturb_edges(cell: np.ndarray, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, table: np.ndarray,
                  slot_genes: np.ndarray, coexpr_indptr: np.ndarray, coexpr_indices: np.ndarray,
                  coexpr_data: np.ndarray, alpha: float, rng: np.random.Generator):
    """Perturb the cell graphs of a batch. Edges are (cell, src slot, dst slot, weight) arrays; table: (B, G) slot of
    each gene per cell (`graphs.slot_table`); slot_genes: (B, L). Returns new (cell, src, dst, weight) arrays, grouped
    by cell, with the same number of edges per cell."""
    n_cells, seq_len = slot_genes.shape
    if len(cell) == 0 or alpha <= 0:
        return cell, src, dst, weight
    n_edges = np.bincount(cell, minlength=n_cells)
    need = np.floor(alpha * n_edges + 0.5).astype(np.int64)
    if not need.any():
        return cell, src, dst, weight
    existing = np.sort((cell.astype(np.int64) * seq_len + src) * seq_len + dst)
    ab, a_src, a_dst, a_w = sample_coexpr_links(need, table, slot_genes, coexpr_indptr, coexpr_indices,
                                                coexpr_data, existing, rng)
    k = np.bincount(ab.astype(np.int64), minlength=n_cells)
    # drop k[b] uniformly random edges of each cell b: rank edges by a random key within their cell
    order = np.argsort(cell + rng.random(len(cell)), kind="stable")
    starts = np.cumsum(n_edges) - n_edges
    rank = np.empty(len(cell), dtype=np.int64)
    rank[order] = np.arange(len(cell)) - starts[cell[order]]
    keep = rank >= k[cell]
    out = (np.concatenate([cell[keep], ab.astype(cell.dtype)]), np.concatenate([src[keep], a_src.astype(src.dtype)]),
           np.concatenate([dst[keep], a_dst.astype(dst.dtype)]),
           np.concatenate([weight[keep], a_w]).astype(np.float32))
    order = np.argsort(out[0], kind="stable")
    return tuple(a[order] for a in out)
