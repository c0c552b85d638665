"""Random per-cell GRN edges for dummy batches (`dummy_inputs.make_dummy_batch`): edges between the real gene slots
of each cell, indexed like the loader's (node n = b * L + l)."""
from __future__ import annotations

import torch


def random_edges(gen, real_slots, bsz, seqlen, edges_per_cell):
    src, dst = [], []
    for b in range(bsz):
        slots = real_slots[b]
        if len(slots) < 2:
            continue
        pick = torch.randint(0, len(slots), (2, edges_per_cell), generator=gen)
        keep = pick[0] != pick[1]
        src.append(slots[pick[0][keep]] + b * seqlen)
        dst.append(slots[pick[1][keep]] + b * seqlen)
    if not src:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    return edge_index, torch.rand(edge_index.shape[1], generator=gen)


def add_graphs(batch: dict, gen, mask: torch.Tensor, first_gene_slot: int, edges_per_cell: int) -> None:
    """Add both graph scales (+ PyG's batch / ptr) over the real gene slots of a padded (B, L) batch."""
    bsz, seqlen = mask.shape
    real_slots = [torch.nonzero(mask[b]).flatten() for b in range(bsz)]
    real_slots = [s[s >= first_gene_slot] for s in real_slots]
    ct_ei, ct_w = random_edges(gen, real_slots, bsz, seqlen, edges_per_cell)
    c_ei, c_w = random_edges(gen, real_slots, bsz, seqlen, max(2, edges_per_cell // 2))
    batch.update(celltype_edge_index=ct_ei, celltype_edge_weight=ct_w, cell_edge_index=c_ei,
                 cell_edge_weight=c_w, batch=torch.arange(bsz).repeat_interleave(seqlen),
                 ptr=torch.arange(bsz + 1) * seqlen)
