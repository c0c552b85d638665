"""`make_dummy_batch`: a small random batch with exactly the keys, shapes and dtypes the config's backbone takes
(docs/design.md section 3).

For smoke tests, benchmarks and the GPU check script; not used by the model itself. Token ids of store gene column
j are `j + first_gene_id` (the default union vocabulary: `<pad>`, `<cls>`, `<eoc>` = 0, 1, 2). Each backbone makes its
own keys (`Backbone.dummy_batch`); the shared bookkeeping keys are added here.
"""
from __future__ import annotations

import torch

from .backbones import get_backbone


def make_dummy_batch(config, batch_size: int = 4, seq_len: int = 16, n_genes: int | None = None,
                     mask_ratio: float = 0.25, graphs: bool = True, edges_per_cell: int = 12, seed: int = 0,
                     first_gene_id: int = 3, lengths: list[int] | None = None,
                     device: str | torch.device = "cpu") -> dict:
    """Random batch for `config.backbone`. The last cell is shorter (padding) so masks are exercised.

    `lengths` sets each cell's number of real slots (default: seq_len, the last cell seq_len // 2). seq_len: input
    slots per cell (scgpt: with `<cls>` at 0; scfoundation: nonzero unmasked genes; n_genes: the decoder's G genes,
    default vocab_size - first_gene_id).
    """
    gen = torch.Generator().manual_seed(seed)
    bsz, seqlen = batch_size, seq_len
    n_genes = n_genes or (config.vocab_size - first_gene_id)
    if n_genes < seqlen * 2:
        raise ValueError(f"make_dummy_batch: n_genes={n_genes} is too small for seq_len={seqlen}")
    if lengths is None:
        lengths = [seqlen] * bsz
        lengths[-1] = max(3, seqlen // 2)
    if len(lengths) != bsz or min(lengths) < 3 or max(lengths) > seqlen:
        raise ValueError(f"make_dummy_batch: lengths must be {bsz} values in [3, {seqlen}]")
    spec = get_backbone(config.backbone, getattr(config, "backbone_module", None))
    batch = spec.dummy_batch(config, gen, bsz, seqlen, n_genes, list(lengths), mask_ratio, first_gene_id, graphs,
                             edges_per_cell)
    batch.update(cell_index=torch.arange(bsz, dtype=torch.long) * 7,
                 cell_type_ids=torch.randint(-1, 3, (bsz,), generator=gen))
    return {k: v.to(device) for k, v in batch.items()}
