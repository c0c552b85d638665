"""Edge perturbation of the cell-specific GRNs (GRNFormer, training only): numba, one cell at a time.

In every cell a fraction ``alpha`` (paper default 0.2) of its GRN edges is replaced by co-expression links between
genes that are tokens of that cell (hence expressed in it), drawn from the store's gene co-expression graph
(``STORE/grn/coexpr``, one CSR entry per (u, v) link). The edge count of each cell is kept:
``k = min(round(alpha * E_cell), #candidates)`` edges are removed uniformly at random and ``k`` distinct candidate links
(co-expression edges u -> v between two different token genes of the cell, not already an edge of its graph) are added
uniformly at random, with their co-expression weight. Added links take the places of the removed edges.

Random draws: one ``rng.integers`` call per batch gives a 63-bit seed; cell ``b`` then draws from its own splitmix64
stream seeded by (seed, b), so the result is a deterministic function of the generator passed in, and a cell's draws do
not depend on the other cells of the batch.

Sampling. Enumerating every candidate costs (tokens x co-expression degree) per cell (~20,000 entries at 1,000 tokens
x 20 neighbours), far more than the ~alpha * E links needed, so candidates are drawn by rejection: a uniformly random
entry of the co-expression rows of the cell's tokens is a uniformly random (u, v) link; it is accepted when v is a
token, v != u and the link is not yet in the cell's hash set of edges (existing + accepted). Proposals are made in
blocks (their memory loads overlap) and the token of an entry is found in O(1) with a guide table over the cumulative
degrees. The accepted proposals are a uniform subset of the candidates. When the rejection budget (1/16 of the
entries: beyond it enumerating is cheaper) runs out before k links, the remaining candidates are enumerated and a
uniform subset of the missing size is drawn (partial Fisher-Yates); a uniform subset completed by a uniform subset of
the rest is uniform, and the enumeration gives the exact candidate count when there are fewer than round(alpha * E).
Finally k uniformly random edge positions (partial Fisher-Yates) receive the added links.

Cell-type and union kernels live in ``graph_kernels.py``; the perturbation runs as its own pass over their output
(`perturb_cells`) rather than being called from them: numba's on-disk cache does not notice when a jitted function of
another file changes, so kernels call only functions of their own file.

``perturb_reference.py`` is the plain-numpy reference (vectorised over the batch, other draws, same rules).
"""
from __future__ import annotations

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_INV_2_53 = 1.0 / 9007199254740992.0
_BLOCK = 32  # rejection proposals drawn ahead (~4 accepted per block at the ~25% acceptance of 1,000 / 5,000 tokens)


@numba.njit(cache=True, nogil=True)
def _next(state):
    """splitmix64 step: state (1,) uint64 is advanced; returns 64 random bits."""
    z = state[0] + _GOLDEN
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _below(state, n):
    """Uniform integer in [0, n) (53-bit float scaling: the bias, < n / 2**53, is far below anything measurable)."""
    return np.int64(np.float64(np.int64(_next(state) >> np.uint64(11))) * _INV_2_53 * n)


@numba.njit(cache=True, nogil=True)
def cell_state(seed, b):
    """(1,) uint64 generator state of cell b for batch seed ``seed`` (uint64)."""
    state = np.empty(1, np.uint64)
    state[0] = seed ^ (np.uint64(b + 1) * _GOLDEN)
    _next(state)  # decorrelate neighbouring cells' streams
    return state


@numba.njit(cache=True, nogil=True)
def _hash_add(table, bits, key):
    """Insert key (>= 0) into the open-addressing set ``table`` (2**bits slots, -1 = empty); False when present."""
    mask = (1 << bits) - 1
    h = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))  # Fibonacci hashing: top bits of the product
    while True:
        k = table[h]
        if k == key:
            return False
        if k < 0:
            table[h] = key
            return True
        h = (h + 1) & mask


@numba.njit(cache=True, nogil=True)
def _hash_has(table, bits, key):
    mask = (1 << bits) - 1
    h = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))
    while True:
        k = table[h]
        if k == key:
            return True
        if k < 0:
            return False
        h = (h + 1) & mask


@numba.njit(cache=True, nogil=True)
def perturb_cell(src, dst, weight, n_edges, slot, genes, co_indptr, co_indices, co_data, alpha, state):
    """Perturb one cell's graph in place: edges ``src/dst/weight[:n_edges]`` (token slots, no duplicate (src, dst));
    slot: (G,) token slot of every gene in this cell (-1 = not a token); genes: (L,) store gene of each slot (-1 =
    none); state: the cell's generator (`cell_state`). Returns k, the number of edges replaced."""
    need = np.int64(np.floor(alpha * n_edges + 0.5))
    if need == 0:
        return 0
    seq_len = genes.shape[0]
    # the cell's tokens, where their co-expression rows start, and the cumulative row lengths: entry u of the
    # concatenated rows belongs to token t with cum[t] <= u < cum[t + 1]
    tok_slot = np.empty(seq_len, np.int64)
    tok_gene = np.empty(seq_len, np.int64)
    tok_row = np.empty(seq_len, np.int64)
    cum = np.empty(seq_len + 1, np.int64)
    cum[0] = 0
    n_tok = 0
    for l in range(seq_len):
        g = genes[l]
        if g >= 0:
            tok_slot[n_tok], tok_gene[n_tok], tok_row[n_tok] = l, g, co_indptr[g]
            cum[n_tok + 1] = cum[n_tok] + co_indptr[g + 1] - co_indptr[g]
            n_tok += 1
    n_entries = cum[n_tok]
    if n_entries == 0:
        return 0
    # guide table: guide[j] = the token of entry ceil(j * n_entries / n_tok), so the token of entry u is guide[u *
    # n_tok // n_entries] or a few after it (none after it when all degrees are equal): O(1) per draw instead of a
    # binary search
    guide = np.empty(n_tok, np.int64)
    t = 0
    for j in range(n_tok):
        while cum[t + 1] * n_tok <= j * n_entries:
            t += 1
        guide[j] = t
    # set of the cell's links (existing, then accepted), key = src slot * L + dst slot; load <= 1/2
    bits = 4
    while (1 << bits) < 2 * (n_edges + need):
        bits += 1
    table = np.full(1 << bits, -1, np.int64)
    for i in range(n_edges):
        _hash_add(table, bits, np.int64(src[i]) * seq_len + dst[i])
    add_src = np.empty(need, np.int64)
    add_dst = np.empty(need, np.int64)
    add_w = np.empty(need, np.float32)
    prop_tok = np.empty(_BLOCK, np.int64)
    prop_pos = np.empty(_BLOCK, np.int64)
    prop_nbr = np.empty(_BLOCK, np.int64)
    k = 0
    tries = 0
    budget = n_entries >> 4
    while k < need and tries < budget:
        # a block of proposals first: their co-expression entries are independent (mostly cache-missing) loads that
        # overlap, instead of one miss at a time behind the accept/reject branch
        n_prop = min(_BLOCK, budget - tries)
        for i in range(n_prop):
            u = _below(state, n_entries)
            t = guide[u * n_tok // n_entries]
            while cum[t + 1] <= u:
                t += 1
            pos = tok_row[t] + (u - cum[t])
            prop_tok[i], prop_pos[i], prop_nbr[i] = t, pos, co_indices[pos]
        for i in range(n_prop):
            tries += 1
            t, v = prop_tok[i], prop_nbr[i]
            d = slot[v]
            if d < 0 or v == tok_gene[t]:
                continue
            if not _hash_add(table, bits, tok_slot[t] * seq_len + d):
                continue  # already an edge or already drawn
            add_src[k], add_dst[k], add_w[k] = tok_slot[t], d, co_data[prop_pos[i]]
            k += 1
            if k == need:
                break
    if k < need:  # few candidates or unlucky: enumerate the rest, draw the missing ones among them
        cand_tok = np.empty(n_entries, np.int64)
        cand_pos = np.empty(n_entries, np.int64)
        n_cand = 0
        for t in range(n_tok):
            g = tok_gene[t]
            for pos in range(tok_row[t], tok_row[t] + cum[t + 1] - cum[t]):
                v = co_indices[pos]
                d = slot[v]
                if d >= 0 and v != g and not _hash_has(table, bits, tok_slot[t] * seq_len + d):
                    cand_tok[n_cand], cand_pos[n_cand] = t, pos
                    n_cand += 1
        for i in range(min(need - k, n_cand)):
            j = i + _below(state, n_cand - i)
            cand_tok[i], cand_tok[j] = cand_tok[j], cand_tok[i]
            cand_pos[i], cand_pos[j] = cand_pos[j], cand_pos[i]
            t, pos = cand_tok[i], cand_pos[i]
            add_src[k], add_dst[k], add_w[k] = tok_slot[t], slot[co_indices[pos]], co_data[pos]
            k += 1
    # k uniformly random edges (partial Fisher-Yates over positions) give their places to the added links
    perm = np.arange(n_edges)
    for i in range(k):
        j = i + _below(state, n_edges - i)
        perm[i], perm[j] = perm[j], perm[i]
        p = perm[i]
        src[p], dst[p], weight[p] = add_src[i], add_dst[i], add_w[i]
    return k


@numba.njit(cache=True, nogil=True)
def perturb_cells(ptr, src, dst, weight, slot_genes, cell_ptr, co_indptr, co_indices, co_data, alpha, seed):
    """Perturb every cell's graph of a batch in place. Edges grouped by cell (cell b = ptr[b]:ptr[b+1]) as token slots
    of the cell src, dst (E,) int64, weight (E,) float32; slot_genes (T,) int64 flat token slots, cell b owning
    ``[cell_ptr[b], cell_ptr[b+1])``; seed: uint64 (`batch_seed`). Returns the number of replaced edges of each cell
    (B,)."""
    n_cells = cell_ptr.shape[0] - 1
    slot = np.full(co_indptr.shape[0] - 1, -1, np.int32)  # gene -> slot of the current cell
    replaced = np.zeros(n_cells, np.int64)
    for b in range(n_cells):
        lo, hi = ptr[b], ptr[b + 1]
        if hi == lo:
            continue
        genes = slot_genes[cell_ptr[b]:cell_ptr[b + 1]]
        for l in range(genes.shape[0]):
            if genes[l] >= 0:
                slot[genes[l]] = l
        replaced[b] = perturb_cell(src[lo:hi], dst[lo:hi], weight[lo:hi], hi - lo, slot, genes, co_indptr,
                                   co_indices, co_data, alpha, cell_state(seed, b))
        for l in range(genes.shape[0]):
            if genes[l] >= 0:
                slot[genes[l]] = -1
    return replaced


def batch_seed(rng: np.random.Generator) -> np.uint64:
    """The one draw a batch takes from its generator (seed of the per-cell streams)."""
    return np.uint64(rng.integers(0, 2 ** 63, dtype=np.int64))


def perturb_edges(cell: np.ndarray, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, slot_genes: np.ndarray,
                  coexpr_indptr: np.ndarray, coexpr_indices: np.ndarray, coexpr_data: np.ndarray, alpha: float,
                  rng: np.random.Generator):
    """Perturb the cell graphs of a batch given as edge arrays (`GraphBuilder` calls `perturb_cells` directly).

    cell, src, dst, weight: (E,) cell, src slot, dst slot, weight of each edge, no duplicate edge in a cell;
    slot_genes: (B, L) store gene of each slot (-1 none); coexpr_*: the co-expression CSR (G+1,), (E_x,), (E_x,),
    one entry per (u, v). Returns new (cell, src, dst, weight) arrays, grouped by cell, with the same number of edges
    per cell."""
    n_cells = slot_genes.shape[0]
    if len(cell) == 0 or alpha <= 0:
        return cell, src, dst, weight
    order = np.argsort(cell, kind="stable")
    cell = cell[order]
    s, d = src[order].astype(np.int64), dst[order].astype(np.int64)
    w = weight[order].astype(np.float32)
    ptr = np.searchsorted(cell, np.arange(n_cells + 1)).astype(np.int64)
    slot_genes = np.ascontiguousarray(slot_genes, dtype=np.int64)
    cell_ptr = np.arange(n_cells + 1, dtype=np.int64) * slot_genes.shape[1]
    perturb_cells(ptr, s, d, w, slot_genes.reshape(-1), cell_ptr, np.asarray(coexpr_indptr, np.int64),
                  coexpr_indices, np.asarray(coexpr_data, np.float32), float(alpha), batch_seed(rng))
    return cell, s.astype(src.dtype), d.astype(dst.dtype), w
