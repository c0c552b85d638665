"""numba kernels of the graph stage: cell-type restriction (written straight into the PyG layout, edges grouped by
cell; docs/design.md section 3), regulon union (token slots grouped by cell, for ``perturb.perturb_cells`` to edit in
place), its PyG layout, and the undirected, destination-sorted form of both. Rules: ``graphs_reference.py``.

Token slots are flat: cell ``b`` owns slots ``[cell_ptr[b], cell_ptr[b+1])`` of ``slot_genes`` and graph node ``n`` is
slot ``n`` (padded layout: ``cell_ptr = b * L``, node ``b * L + l``; packed layout: ``cell_ptr`` = the segment offsets,
node = packed position).

Why per cell instead of the (B, G) slot table of the numpy reference: a cell touches only its ~1,000 tokens and the
edges of the TFs among them, so each cell fills a (G,) gene -> slot scratch for its tokens, walks the GRN grouped by
TF (an absent TF skips its whole group with one lookup), and clears the scratch again: O(tokens + edges of present
TFs) per cell instead of O(G + all edges) passes of sorts and fancy indexing over the batch.

Outputs grow by doubling (edge counts are not known before the walk) and are trimmed once at the end.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _fill_slots(genes, slot, value):
    """slot[g] = l (value=True) or -1 (value=False) for the gene tokens ``genes`` (L,) of one cell."""
    for l in range(genes.shape[0]):
        g = genes[l]
        if g >= 0:
            slot[g] = l if value else -1


@numba.njit(cache=True, nogil=True)
def _grow(a, n):
    """``a`` with room for at least n entries (doubling, contents kept)."""
    if n <= a.shape[0]:
        return a
    out = np.empty(max(n, 2 * a.shape[0]), a.dtype)
    out[:a.shape[0]] = a
    return out


@numba.njit(cache=True, nogil=True)
def _pyg(src, dst, n):
    """(2, n) int64 edge_index from node-id buffers."""
    index = np.empty((2, n), np.int64)
    index[0, :] = src[:n]
    index[1, :] = dst[:n]
    return index


@numba.njit(cache=True, nogil=True)
def to_pyg(ptr, src, dst, cell_ptr):
    """(2, E) int64 edge_index over nodes ``cell_ptr[b] + slot`` from slot edges grouped by cell (cell b =
    ptr[b]:ptr[b+1])."""
    index = np.empty((2, src.shape[0]), np.int64)
    for b in range(ptr.shape[0] - 1):
        off = cell_ptr[b]
        for i in range(ptr[b], ptr[b + 1]):
            index[0, i] = off + src[i]
            index[1, i] = off + dst[i]
    return index


@numba.njit(cache=True, nogil=True)
def celltype_graph(slot_genes, cell_ptr, cell_type, type_groups, group_tf, group_ptr, edge_dst, edge_weight,
                   n_genes):
    """Cell-type GRN of each cell restricted to its tokens -> (edge_index (2, E) int64, edge_weight (E,) float32).

    slot_genes: (T,) store gene per slot (-1 none); cell_ptr (B+1,) slots of each cell; cell_type: (B,) (-1 / out of
    range = unknown: no edges).
    The GRN grouped by (type, TF) (`tf_groups`): type_groups (C+1,) group range of each type; group_tf (n_groups,)
    the TF gene; group_ptr (n_groups+1,) edge range of each group in edge_dst / edge_weight (E_c,)."""
    n_cells = cell_ptr.shape[0] - 1
    n_types = type_groups.shape[0] - 1
    slot = np.full(n_genes, -1, np.int32)
    out_src = np.empty(256 * n_cells + 16, np.int64)
    out_dst = np.empty(out_src.shape[0], np.int64)
    out_w = np.empty(out_src.shape[0], np.float32)
    n = 0
    for b in range(n_cells):
        c = cell_type[b]
        if c < 0 or c >= n_types:
            continue
        # room for all the type's edges, checked once per cell: a reallocation inside the loops below would stop
        # LLVM from keeping the output pointers in registers (~2x slower)
        room = n + group_ptr[type_groups[c + 1]] - group_ptr[type_groups[c]]
        if room > out_src.shape[0]:
            out_src, out_dst, out_w = _grow(out_src, room), _grow(out_dst, room), _grow(out_w, room)
        genes = slot_genes[cell_ptr[b]:cell_ptr[b + 1]]
        _fill_slots(genes, slot, True)
        off = cell_ptr[b]
        for q in range(type_groups[c], type_groups[c + 1]):
            s = slot[group_tf[q]]
            if s < 0:
                continue
            for e in range(group_ptr[q], group_ptr[q + 1]):
                # branch-free: write every edge, advance only over kept ones (a ~20%-taken data-dependent branch
                # mispredicts often enough to double the cost of this loop)
                d = slot[edge_dst[e]]
                out_src[n], out_dst[n], out_w[n] = off + s, off + d, edge_weight[e]
                n += d >= 0
        _fill_slots(genes, slot, False)
    return _pyg(out_src, out_dst, n), out_w[:n].copy()


@numba.njit(cache=True, nogil=True)
def cell_union(slot_genes, cell_ptr, active_bits, reg_group_tf, reg_group_ptr, reg_order, reg_indptr, reg_target,
               reg_weight, n_genes):
    """Union of each cell's active regulons restricted to its tokens -> (ptr (B+1,) int64, src slot (E,) int64,
    dst slot (E,) int64, weight (E,) float32), grouped by cell (cell b = ptr[b]:ptr[b+1]); `to_pyg` makes the
    edge_index after the (in place) perturbation.

    active_bits: (B, ceil(R/8)) uint8, bit r of cell b = (active_bits[b, r >> 3] >> (r & 7)) & 1. Regulons grouped
    by TF (`tf_groups`): reg_group_tf (n_groups,), reg_group_ptr (n_groups+1,) ranges of reg_order (R,) = regulon ids
    sorted by (TF, id). An edge (TF, target) in several active regulons is kept once with its largest |weight|, the
    lowest regulon id on ties (as ``GRNAssets.cell_edges``): all its copies sit in one TF group, so only groups with
    several active regulons need the dedup. The targets of one regulon must be distinct (`GraphBuilder` ensures it)."""
    n_cells = cell_ptr.shape[0] - 1
    longest = 0
    for b in range(n_cells):
        longest = max(longest, cell_ptr[b + 1] - cell_ptr[b])
    slot = np.full(n_genes, -1, np.int32)
    where = np.full(longest, -1, np.int64)  # dst slot -> position of its edge in the current TF group
    # this cell's edges (slots): at most every regulon edge, so no reallocation inside the loops (see celltype_graph)
    es = np.empty(reg_target.shape[0], np.int64)
    ed = np.empty(reg_target.shape[0], np.int64)
    ew = np.empty(reg_target.shape[0], np.float32)
    out_src = np.empty(512 * n_cells + 16, np.int64)
    out_dst = np.empty(out_src.shape[0], np.int64)
    out_w = np.empty(out_src.shape[0], np.float32)
    ptr = np.zeros(n_cells + 1, np.int64)
    n = 0
    for b in range(n_cells):
        genes = slot_genes[cell_ptr[b]:cell_ptr[b + 1]]
        _fill_slots(genes, slot, True)
        m = 0
        for q in range(reg_group_tf.shape[0]):
            s = slot[reg_group_tf[q]]
            if s < 0:
                continue  # a regulon needs its TF as a token
            n_active, last = 0, -1
            for i in range(reg_group_ptr[q], reg_group_ptr[q + 1]):
                r = reg_order[i]
                if (active_bits[b, r >> 3] >> (r & 7)) & 1:
                    n_active += 1
                    last = r
            if n_active == 0:
                continue
            if n_active == 1:  # the common case: one regulon per TF, targets distinct -> no dedup, branch-free
                for e in range(reg_indptr[last], reg_indptr[last + 1]):
                    d = slot[reg_target[e]]
                    es[m], ed[m], ew[m] = s, d, reg_weight[e]
                    m += d >= 0
                continue
            first = m
            for i in range(reg_group_ptr[q], reg_group_ptr[q + 1]):
                r = reg_order[i]
                if not (active_bits[b, r >> 3] >> (r & 7)) & 1:
                    continue
                for e in range(reg_indptr[r], reg_indptr[r + 1]):
                    d = slot[reg_target[e]]
                    if d < 0:
                        continue
                    w = reg_weight[e]
                    p = where[d]
                    if p >= 0:
                        if abs(w) > abs(ew[p]):
                            ew[p] = w
                    else:
                        where[d] = m
                        es[m], ed[m], ew[m] = s, d, w
                        m += 1
            for i in range(first, m):
                where[ed[i]] = -1
        _fill_slots(genes, slot, False)
        if n + m > out_src.shape[0]:
            out_src, out_dst, out_w = _grow(out_src, n + m), _grow(out_dst, n + m), _grow(out_w, n + m)
        out_src[n:n + m], out_dst[n:n + m], out_w[n:n + m] = es[:m], ed[:m], ew[:m]
        n += m
        ptr[b + 1] = n
    return ptr, out_src[:n].copy(), out_dst[:n].copy(), out_w[:n].copy()


def tf_groups(tf: np.ndarray, groups: np.ndarray, n_groups: int):
    """Group items by (group, TF), keeping item order within a group (stable).

    tf: (N,) TF gene of each item; groups: (N,) group id in [0, n_groups) of each item (all zero for a single group).
    Returns (order (N,) int64 item ids sorted by (group, TF, id), group_ptr (n_groups+1,) int64 range of TF groups of
    each group, tf_of (T,) int64 TF gene of each TF group, tf_ptr (T+1,) int64 range of each TF group in ``order``)."""
    tf, groups = np.asarray(tf, np.int64), np.asarray(groups, np.int64)
    order = np.lexsort((np.arange(len(tf)), tf, groups)).astype(np.int64)
    key_g, key_t = groups[order], tf[order]
    new = np.r_[True, (key_g[1:] != key_g[:-1]) | (key_t[1:] != key_t[:-1])] if len(order) else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    tf_ptr = np.r_[starts, len(order)].astype(np.int64)
    tf_of = key_t[starts]
    group_ptr = np.searchsorted(key_g[starts], np.arange(n_groups + 1)).astype(np.int64)
    return order, group_ptr, tf_of, tf_ptr


@numba.njit(cache=True, nogil=True)
def sorted_by_destination(edge_index, weight, cell_ptr, undirected):
    """The batch's graph in the structure encoder's final form: with ``undirected``, every edge also in reverse and
    each (src, dst) pair once with the mean of its copies' weights (what `torch_geometric.utils.to_undirected(...,
    reduce="mean")` gives); edges sorted by (destination, source), so that node ``n``'s incoming edges are one
    contiguous run (CSR by destination). Without ``undirected`` the edges are only sorted (and merged).

    edge_index (2, E) int64 over nodes ``[cell_ptr[0], cell_ptr[-1])``, edges grouped by cell in cell order (as the
    kernels above emit them); weight (E,) float32. Two stable counting sorts per cell (by source, then by
    destination) over its own slots: O(edges + tokens) per cell. Returns (edge_index (2, E') int64, weight (E',)
    float32)."""
    n_cells = cell_ptr.shape[0] - 1
    n_edges = edge_index.shape[1]
    copies = 2 if undirected else 1
    longest = 0
    for b in range(n_cells):
        longest = max(longest, cell_ptr[b + 1] - cell_ptr[b])
    count = np.zeros(longest + 1, np.int64)
    out_src = np.empty(copies * n_edges, np.int64)
    out_dst = np.empty(copies * n_edges, np.int64)
    out_w = np.empty(copies * n_edges, np.float32)
    a_src = np.empty(copies * n_edges, np.int64)  # scratch: this cell's entries, before / between the two sorts
    a_dst = np.empty(copies * n_edges, np.int64)
    a_w = np.empty(copies * n_edges, np.float32)
    t_src = np.empty(copies * n_edges, np.int64)
    t_dst = np.empty(copies * n_edges, np.int64)
    t_w = np.empty(copies * n_edges, np.float32)
    n = 0
    e = 0
    for b in range(n_cells):
        lo, hi = cell_ptr[b], cell_ptr[b + 1]
        size = hi - lo
        m = 0
        while e < n_edges and edge_index[0, e] < hi:
            s, d, w = edge_index[0, e] - lo, edge_index[1, e] - lo, weight[e]
            a_src[m], a_dst[m], a_w[m] = s, d, w
            m += 1
            if undirected:
                a_src[m], a_dst[m], a_w[m] = d, s, w
                m += 1
            e += 1
        if m == 0:
            continue
        # stable counting sort by source (a -> t), then by destination (t -> a): sorted by (dst, src)
        for key_is_dst in (False, True):
            count[:size + 1] = 0
            for i in range(m):
                k = a_dst[i] if key_is_dst else a_src[i]
                count[k + 1] += 1
            for k in range(size):
                count[k + 1] += count[k]
            for i in range(m):
                k = a_dst[i] if key_is_dst else a_src[i]
                p = count[k]
                count[k] = p + 1
                t_src[p], t_dst[p], t_w[p] = a_src[i], a_dst[i], a_w[i]
            a_src[:m], a_dst[:m], a_w[:m] = t_src[:m], t_dst[:m], t_w[:m]
        # merge runs of the same (dst, src): mean weight
        i = 0
        while i < m:
            j = i + 1
            total = np.float64(a_w[i])
            while j < m and a_dst[j] == a_dst[i] and a_src[j] == a_src[i]:
                total += a_w[j]
                j += 1
            out_src[n], out_dst[n], out_w[n] = a_src[i] + lo, a_dst[i] + lo, np.float32(total / (j - i))
            n += 1
            i = j
    return _pyg(out_src, out_dst, n), out_w[:n].copy()
