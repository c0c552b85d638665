"""Per-cell multi-scale graphs indexed by token slot, batched in torch-geometric form (docs/design.md section 3).

Node ``n`` is token slot ``n`` of the batch: ``b * L + l`` in the padded (B, L) layout, the packed position in the THD
layout; ``<cls>``, padding, scFoundation's T / S slots and dummy segments are isolated nodes. For every cell
two graphs are built from the store's GRN assets (``grnformer_ds.grn.GRNAssets``, gene references = store columns):

* cell-type scale: the GRN of the cell's type, restricted to edges whose TF and target are both tokens of the cell;
* cell scale: the union of the cell's active regulons (AUCell bitsets; an edge in several regulons is kept once, with
  its largest |weight|, as ``GRNAssets.cell_edges``), restricted the same way, then (training only) edge-perturbed
  (``perturb.py``).

Graph layouts (``GraphBuilder(layout=...)``, the batch key ``graph_layout``): ``"coo"`` leaves the edges TF -> target,
grouped by cell (the model adds reverse edges itself when its config says so); ``"csr"`` gives them in the structure
encoder's final form: made undirected (when ``undirected``, with `torch_geometric.utils.to_undirected`'s mean merge)
and sorted by destination, so the encoder skips its own ``to_undirected`` and can aggregate over CSR rows.

The work is done by numba kernels that walk the cells of a batch once each (``graph_kernels.py``: cell-type
restriction, regulon union, PyG layout; ``perturb.py``: perturbation, in place), ~4-6x faster than the vectorised numpy
reference ``graphs_reference.py``, which stays the specification the tests compare against). The GRN is regrouped by TF
once, here, for those kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from .graph_kernels import cell_union, celltype_graph, sorted_by_destination, tf_groups, to_pyg
from .perturb import batch_seed, perturb_cells


def unique_per_row(indptr: np.ndarray, indices: np.ndarray, weight: np.ndarray):
    """A CSR matrix (indptr (n+1,), indices (nnz,), weight (nnz,)) with one entry per (row, column): the one with the
    largest |weight|, the first on ties (the union rule of ``GRNAssets.cell_edges``). Order within a row is kept.
    Returns contiguous (indptr int64, indices, weight float32); the input arrays themselves when already unique."""
    indptr = np.asarray(indptr, np.int64)
    weight = np.asarray(weight, np.float32)
    row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    key = row * (int(indices.max(initial=0)) + 1) + indices
    order = np.lexsort((np.arange(len(key)), -np.abs(weight), key))
    first = order[np.r_[True, key[order][1:] != key[order][:-1]]] if len(key) else order
    if len(first) == len(key):
        return indptr, np.ascontiguousarray(indices), np.ascontiguousarray(weight)
    keep = np.sort(first)
    new_ptr = np.zeros_like(indptr)
    np.cumsum(np.bincount(row[keep], minlength=len(indptr) - 1), out=new_ptr[1:])
    return new_ptr, indices[keep], weight[keep]


class GraphBuilder:
    """Builds ``celltype_edge_index/weight``, ``cell_edge_index/weight``, ``batch``, ``ptr`` (+ ``graph_layout`` with
    ``layout="csr"``) for a tokenized batch.

    assets: ``GRNAssets``. alpha: edge-perturbation fraction of the cell-scale graph (0 disables it). layout: ``"coo"``
    or ``"csr"`` (module docstring); undirected: with ``"csr"``, add reverse edges (the model's
    ``gnn_add_reverse_edges``).
    """

    LAYOUTS = ("coo", "csr")

    def __init__(self, assets, alpha: float = 0.2, layout: str = "coo", undirected: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"edge perturbation alpha must be in [0, 1], got {alpha}")
        if layout not in self.LAYOUTS:
            raise ValueError(f"graph layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.assets = assets
        self.alpha = float(alpha)
        self.layout, self.undirected = layout, bool(undirected)
        self.n_genes = int(assets.n_genes)
        self.n_regulons = int(assets.n_regulons)
        # cell-type GRN grouped by (type, TF): a cell walks only its type's TFs, and the edges of those present
        n_types = int(assets.n_celltypes)
        edge_type = np.repeat(np.arange(n_types), np.diff(assets.celltype_indptr))
        order, type_groups, group_tf, group_ptr = tf_groups(assets.celltype_src, edge_type, n_types)
        self._celltype = (type_groups, group_tf, group_ptr, np.ascontiguousarray(assets.celltype_dst[order]),
                          np.ascontiguousarray(assets.celltype_weight[order], dtype=np.float32))
        # regulons grouped by TF: duplicates of an edge (same TF, same target) can only come from one group
        reg_order, _, reg_tf, reg_ptr = tf_groups(assets.regulon_tf, np.zeros(self.n_regulons, np.int64), 1)
        self._regulons = (reg_tf, reg_ptr, reg_order,
                          *unique_per_row(assets.regulon_indptr, assets.regulon_target, assets.regulon_weight))
        # one entry per (u, v) link: the perturbation's uniform draw over entries is then uniform over links
        self._coexpr = unique_per_row(assets.coexpr_indptr, assets.coexpr_indices, assets.coexpr_data)

    def __call__(self, slot_genes: np.ndarray, cell_type: np.ndarray, active_regulons: np.ndarray | None,
                 rng: np.random.Generator | None, perturb: bool,
                 segments: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """slot_genes: store gene column per token slot (-1 = not a gene): (B, L) padded, or (T,) packed with
        ``segments`` (S+1,) the packed segment offsets (cell b = segment b for b < B; the segments after the cells
        are dummy padding). cell_type: (B,) (-1 unknown); active_regulons: (B, ceil(R/8)) uint8 packed bitsets (little
        bit order) or None; rng drives edge perturbation when ``perturb`` (one draw per batch, `perturb.batch_seed`).
        PyG's ``batch`` / ``ptr`` describe one graph per segment (per cell when padded)."""
        n_cells = len(cell_type)
        if segments is None:
            seq_len = slot_genes.shape[1]
            segments = np.arange(n_cells + 1, dtype=np.int64) * seq_len
        segments = np.ascontiguousarray(segments, dtype=np.int64)
        flat = np.ascontiguousarray(slot_genes, dtype=np.int64).reshape(-1)
        cell_ptr = segments[:n_cells + 1]
        ct_index, ct_weight = celltype_graph(flat, cell_ptr, np.asarray(cell_type, np.int64), *self._celltype,
                                             self.n_genes)
        if active_regulons is None or self.n_regulons == 0:
            cell_index, cell_weight = np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
        else:
            ptr, src, dst, cell_weight = cell_union(flat, cell_ptr, np.ascontiguousarray(active_regulons, np.uint8),
                                                    *self._regulons, self.n_genes)
            if perturb and self.alpha > 0:
                perturb_cells(ptr, src, dst, cell_weight, flat, cell_ptr, *self._coexpr, self.alpha, batch_seed(rng))
            cell_index = to_pyg(ptr, src, dst, cell_ptr)
        if self.layout == "csr":
            ct_index, ct_weight = sorted_by_destination(ct_index, ct_weight, cell_ptr, self.undirected)
            cell_index, cell_weight = sorted_by_destination(cell_index, cell_weight, cell_ptr, self.undirected)
        out = {
            "celltype_edge_index": torch.from_numpy(ct_index),
            "celltype_edge_weight": torch.from_numpy(ct_weight),
            "cell_edge_index": torch.from_numpy(cell_index),
            "cell_edge_weight": torch.from_numpy(cell_weight),
            "batch": torch.repeat_interleave(torch.arange(len(segments) - 1, dtype=torch.int64),
                                             torch.from_numpy(np.diff(segments)), output_size=int(segments[-1])),
            "ptr": torch.from_numpy(segments.copy()),
        }
        if self.layout == "csr":
            out["graph_layout"] = "csr"
        return out
