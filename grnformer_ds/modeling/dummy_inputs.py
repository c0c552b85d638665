"""`make_dummy_batch`: a small random batch with exactly the keys, shapes and dtypes of docs/design.md section 3.

For smoke tests, benchmarks and the GPU check script; not used by the model itself. Token ids of store gene column
j are `j + first_gene_id` (the default union vocabulary: `<pad>`, `<cls>`, `<eoc>` = 0, 1, 2).
"""
from __future__ import annotations

import torch


def _random_edges(gen, real_slots, bsz, seqlen, edges_per_cell):
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


def make_dummy_batch(config, batch_size: int = 4, seq_len: int = 16, n_genes: int | None = None,
                     mask_ratio: float = 0.25, graphs: bool = True, edges_per_cell: int = 12, seed: int = 0,
                     first_gene_id: int = 3, lengths: list[int] | None = None,
                     device: str | torch.device = "cpu") -> dict:
    """Random batch for `config.backbone`. The last cell is shorter (padding) so masks are exercised.

    `lengths` sets each cell's number of real slots (default: seq_len, the last cell seq_len // 2).
    scgpt: L = seq_len slots with `<cls>` at 0, binned values in [0, n_bins), masked slots get mask_value and a label.
    scfoundation: L = seq_len encoder slots (nonzero unmasked genes), G = n_genes decoder genes (default
    vocab_size - first_gene_id), masked genes get mask_value in decoder_values and a label.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = config
    bsz, seqlen = batch_size, seq_len
    n_genes = n_genes or (cfg.vocab_size - first_gene_id)
    if n_genes < seqlen * 2:
        raise ValueError(f"make_dummy_batch: n_genes={n_genes} is too small for seq_len={seqlen}")
    if lengths is None:
        lengths = [seqlen] * bsz
        lengths[-1] = max(3, seqlen // 2)
    if len(lengths) != bsz or min(lengths) < 3 or max(lengths) > seqlen:
        raise ValueError(f"make_dummy_batch: lengths must be {bsz} values in [3, {seqlen}]")
    mask = torch.zeros(bsz, seqlen, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    cols = torch.stack([torch.randperm(n_genes, generator=gen)[:seqlen] for _ in range(bsz)])
    batch: dict[str, torch.Tensor] = {}

    if cfg.backbone == "scgpt":
        input_ids = cols + first_gene_id
        input_ids[:, 0] = cfg.cls_token_id
        values = torch.randint(1, cfg.n_bins, (bsz, seqlen), generator=gen).float()
        values[:, 0] = 0.0
        labels = torch.full((bsz, seqlen), -100.0)
        is_masked = (torch.rand(bsz, seqlen, generator=gen) < mask_ratio) & mask
        is_masked[:, 0] = False
        is_masked[:, 1] = True  # at least one masked position per cell
        labels[is_masked] = values[is_masked]
        values[is_masked] = cfg.mask_value
        input_ids[~mask] = cfg.pad_token_id
        values[~mask] = cfg.pad_value
        batch.update(input_ids=input_ids, values=values, attention_mask=mask, labels=labels)
        first_gene_slot = 1
    else:
        dense = torch.zeros(bsz, n_genes)
        for b in range(bsz):
            dense[b, cols[b, : lengths[b]]] = torch.rand(lengths[b], generator=gen) * 4 + 0.1
        # mask a few nonzero genes and a few zeros (scFoundation masks both); masked genes leave the encoder
        is_masked = (torch.rand(bsz, n_genes, generator=gen) < mask_ratio * 0.2)
        for b in range(bsz):
            is_masked[b, cols[b, lengths[b] - 1]] = True
        labels = torch.where(is_masked, dense, torch.full_like(dense, -100.0))
        decoder_values = torch.where(is_masked, torch.full_like(dense, cfg.mask_value), dense)
        input_ids = torch.full((bsz, seqlen), cfg.pad_token_id, dtype=torch.long)
        values = torch.full((bsz, seqlen), cfg.pad_value)
        for b in range(bsz):
            cell_cols = cols[b, : lengths[b]]
            enc_cols = cell_cols[~is_masked[b, cell_cols]]
            n = len(enc_cols)
            input_ids[b, :n] = enc_cols + first_gene_id
            values[b, :n] = dense[b, enc_cols]
            mask[b] = False
            mask[b, :n] = True
        total = dense.expm1().sum(1).clamp(min=1).log10()
        batch.update(input_ids=input_ids, values=values, attention_mask=mask,
                     total_counts=torch.stack([total, total], dim=1).float(), decoder_values=decoder_values,
                     decoder_input_ids=(torch.arange(n_genes) + first_gene_id).expand(bsz, -1).contiguous(),
                     labels=labels)
        first_gene_slot = 0

    if graphs:
        real_slots = [torch.nonzero(mask[b]).flatten() for b in range(bsz)]
        real_slots = [s[s >= first_gene_slot] for s in real_slots]
        ct_ei, ct_w = _random_edges(gen, real_slots, bsz, seqlen, edges_per_cell)
        c_ei, c_w = _random_edges(gen, real_slots, bsz, seqlen, max(2, edges_per_cell // 2))
        batch.update(celltype_edge_index=ct_ei, celltype_edge_weight=ct_w, cell_edge_index=c_ei,
                     cell_edge_weight=c_w, batch=torch.arange(bsz).repeat_interleave(seqlen),
                     ptr=torch.arange(bsz + 1) * seqlen)
    batch.update(cell_index=torch.arange(bsz, dtype=torch.long) * 7,
                 cell_type_ids=torch.randint(-1, 3, (bsz,), generator=gen))
    return {k: v.to(device) for k, v in batch.items()}
