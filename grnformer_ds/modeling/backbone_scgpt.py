"""The scGPT-style backbone (Cui et al., Nat Methods 2024): one token per expressed gene, `<cls>` first.

Token = LayerNorm(gene embedding) + value embedding of the binned expression (continuous MLP by default, or one
embedding per bin); cell embedding = the `<cls>` state; head = scGPT's MLP expression decoder per token (+ the
optional GEPC/MVC loss from the cell embedding, `use_mvc`). Everything here is `Backbone`'s default layout, so this
file only names it and makes its dummy batch. Tokenization: `grnformer_ds.data.scgpt_collator`.
"""
from __future__ import annotations

import torch

from .backbone_base import Backbone, register_backbone
from .dummy_graphs import add_graphs


def scgpt_like_dummy_batch(config, gen, bsz, seqlen, n_genes, lengths, mask_ratio, first_gene_id):
    """<cls> + binned gene values, masked slots at mask_value with a label (at least one per cell)."""
    mask = torch.zeros(bsz, seqlen, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    cols = torch.stack([torch.randperm(n_genes, generator=gen)[:seqlen] for _ in range(bsz)])
    input_ids = cols + first_gene_id
    input_ids[:, 0] = config.cls_token_id
    values = torch.randint(1, config.n_bins, (bsz, seqlen), generator=gen).float()
    values[:, 0] = 0.0
    labels = torch.full((bsz, seqlen), -100.0)
    is_masked = (torch.rand(bsz, seqlen, generator=gen) < mask_ratio) & mask
    is_masked[:, 0] = False
    is_masked[:, 1] = True  # at least one masked position per cell
    labels[is_masked] = values[is_masked]
    values[is_masked] = config.mask_value
    input_ids[~mask] = config.pad_token_id
    values[~mask] = config.pad_value
    return dict(input_ids=input_ids, values=values, attention_mask=mask, labels=labels)


@register_backbone
class ScGPTBackbone(Backbone):
    name = "scgpt"
    uses_mvc = True

    def dummy_batch(self, config, gen, bsz, seqlen, n_genes, lengths, mask_ratio, first_gene_id, graphs,
                    edges_per_cell):
        batch = scgpt_like_dummy_batch(config, gen, bsz, seqlen, n_genes, lengths, mask_ratio, first_gene_id)
        if graphs:
            add_graphs(batch, gen, batch["attention_mask"], 1, edges_per_cell)
        return batch
