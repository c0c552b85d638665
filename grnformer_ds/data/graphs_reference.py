"""Reference (plain numpy) implementation of the graph stage: what ``graphs.GraphBuilder`` computes with numba
kernels, kept as the specification the kernels are tested against and as a readable statement of the rules.

Node ``n = b * L + l`` is token slot ``l`` of cell ``b`` (docs/design.md section 3). For every cell two graphs are built
from the store's GRN assets (``grnformer_ds.grn.GRNAssets``, gene references = store columns):

* cell-type scale: the GRN of the cell's type, restricted to edges whose TF and target are both tokens of the cell;
* cell scale: the union of the cell's active regulons (AUCell bitsets; an edge in several regulons is kept once, with
  its largest |weight|, the first such edge by regulon id on ties, as ``GRNAssets.cell_edges``), restricted the same
  way, then (training only) edge-perturbed (``perturb_reference.py``).

The whole batch is processed at once with numpy (a (B, G) gene -> slot table instead of a Python loop over cells),
~200 us a cell at 64 cells x 1,200 tokens; the numba kernels are ~10x faster.
"""
from __future__ import annotations

import numpy as np
import torch

from .perturb_reference import perturb_edges


def slot_table(slot_genes: np.ndarray, n_genes: int) -> np.ndarray:
    """(B, G) token slot of every store gene in every cell (-1 when the gene is not a token of that cell).

    slot_genes: (B, L) store gene column of each token slot (-1 for ``<cls>`` / padding)."""
    n_cells, seq_len = slot_genes.shape
    table = np.full((n_cells, n_genes), -1, dtype=np.int16 if seq_len < 2 ** 15 else np.int32)
    b, l = np.nonzero(slot_genes >= 0)
    table[b, slot_genes[b, l]] = l
    return table


def _gather_csr(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR rows ``rows`` (k,), return (which of the k each entry comes from, entry positions)."""
    lo = indptr[rows]
    lengths = (indptr[rows + 1] - lo).astype(np.int64)
    owner = np.repeat(np.arange(len(rows)), lengths)
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, pos + np.repeat(lo, lengths)


def celltype_edges(assets, cell_type: np.ndarray, table: np.ndarray):
    """Cell-type GRN of each cell restricted to its tokens -> (cell, src slot, dst slot, weight)."""
    parts = []
    for c in np.unique(cell_type):
        if c < 0 or c >= assets.n_celltypes:
            continue  # unknown type: no cell-type graph
        cells = np.flatnonzero(cell_type == c)
        lo, hi = assets.celltype_indptr[c], assets.celltype_indptr[c + 1]
        src, dst, w = assets.celltype_src[lo:hi], assets.celltype_dst[lo:hi], assets.celltype_weight[lo:hi]
        sub = table[cells]  # (cells of this type, G): column takes are much cheaper than 2-d fancy indexing
        s, d = np.take(sub, src, axis=1), np.take(sub, dst, axis=1)
        i, j = np.nonzero((s >= 0) & (d >= 0))
        parts.append((cells[i], s[i, j], d[i, j], w[j]))
    return _concat(parts)


def cell_specific_edges(assets, active: np.ndarray, table: np.ndarray, seq_len: int):
    """Union of each cell's active regulons restricted to its tokens -> (cell, src slot, dst slot, weight).

    active: (B, R) bool."""
    b, r = np.nonzero(active)
    tf_slot = table[b, assets.regulon_tf[r]]
    b, r, tf_slot = b[tf_slot >= 0], r[tf_slot >= 0], tf_slot[tf_slot >= 0]  # a regulon needs its TF as a token
    owner, pos = _gather_csr(assets.regulon_indptr, r)
    cell = b[owner]
    dst = table.reshape(-1)[cell * table.shape[1] + assets.regulon_target[pos]]  # flat take: cheaper than 2-d
    keep = np.flatnonzero(dst >= 0)  # one nonzero pass, then plain takes
    owner, pos = owner[keep], pos[keep]
    cell, src, dst = cell[keep], tf_slot[owner], dst[keep]
    w = assets.regulon_weight[pos]
    # union: one edge per (cell, src, dst), the one with the largest |weight|. Duplicates need two active regulons
    # with the same TF in one cell (e.g. TF(+) and TF(-)); without such a pair the edges are already unique.
    pair = b.astype(np.int64) * assets.n_genes + assets.regulon_tf[r]
    if len(np.unique(pair)) < len(pair):
        key = (cell.astype(np.int64) * seq_len + src) * seq_len + dst
        order = np.lexsort((-np.abs(w), key))
        key = key[order]
        order = order[np.r_[True, key[1:] != key[:-1]]]
        cell, src, dst, w = cell[order], src[order], dst[order], w[order]
    return cell, src.astype(np.int64), dst.astype(np.int64), w


def build_graphs(assets, slot_genes: np.ndarray, cell_type: np.ndarray, active_regulons: np.ndarray | None,
                 alpha: float, rng: np.random.Generator | None, perturb: bool) -> dict[str, torch.Tensor]:
    """Reference of ``GraphBuilder.__call__`` (same arguments and keys; perturbation draws differ)."""
    n_cells, seq_len = slot_genes.shape
    table = slot_table(slot_genes, int(assets.n_genes))
    ct = celltype_edges(assets, np.asarray(cell_type), table)
    if active_regulons is None or assets.n_regulons == 0:
        cell = _concat([])
    else:
        active = np.unpackbits(active_regulons, axis=1, count=assets.n_regulons, bitorder="little").astype(bool)
        cell = cell_specific_edges(assets, active, table, seq_len)
        if perturb and alpha > 0:
            cell = perturb_edges(*cell, table, slot_genes, assets.coexpr_indptr, assets.coexpr_indices,
                                 assets.coexpr_data, alpha, rng)
    ct_index, ct_weight = _to_pyg(ct, seq_len)
    cell_index, cell_weight = _to_pyg(cell, seq_len)
    return {
        "celltype_edge_index": ct_index,
        "celltype_edge_weight": ct_weight,
        "cell_edge_index": cell_index,
        "cell_edge_weight": cell_weight,
        "batch": torch.arange(n_cells, dtype=torch.int64).repeat_interleave(seq_len),
        "ptr": torch.arange(n_cells + 1, dtype=torch.int64) * seq_len,
    }


def _concat(parts):
    if not parts:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


def _to_pyg(edges, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell, src slot, dst slot, weight) -> edge_index (2, E) over nodes b * L + l, edge_weight (E,), grouped by
    cell."""
    cell, src, dst, w = edges
    order = np.argsort(cell, kind="stable")
    offset = cell[order].astype(np.int64) * seq_len
    index = np.stack([src[order].astype(np.int64) + offset, dst[order].astype(np.int64) + offset])
    return torch.from_numpy(index), torch.from_numpy(np.ascontiguousarray(w[order], dtype=np.float32))
