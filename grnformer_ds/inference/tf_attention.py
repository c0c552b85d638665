"""Do the fusion's queries attend to transcription factors? The paper's TF-attention statistic with a permutation test.

For every cell, the fusion cross-attention (queries: the cell's expression tokens; keys: the GRN structure states of
its genes) gives each gene key the attention it receives: the mean over heads and over the cell's real query tokens.
That amount is divided by the cell's mean over its gene keys, so 1 means "as much as a key gets on average in this
cell" and cells of different lengths count alike. Then

    rho = mean normalised attention received by TF keys / mean normalised attention received by non-TF keys

over every gene key of every cell (GRNFormer reports rho = 2.011 on its data: TFs receive twice the attention). A gene
is a TF when the store's GRN assets list it as a regulator (`GRNAssets.tf_mask`). p-value: the TF labels are permuted
among the keys of each cell (the number of TF keys per cell kept), `n_permutations` times; p = (1 + #{rho_perm >=
rho}) / (1 + n_permutations), one-sided. Per cell type as well.

Keys map to genes by the padded layout's rule, whatever the backbone: the last L keys are the L input slots (a
backbone's own leading keys, scFoundation's T and S, come first and receive no attention), or, for a backbone whose
tokens are gene patches, `token_index` shares a patch's attention among its genes (`layout.gene_attention`).
`<cls>`, padding and genes outside the store are not keys of either kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grnformer_ds.errors import UserInputError


@dataclass
class KeyAttention:
    """Normalised attention received by every gene key: values (N,), is_tf (N,) bool, cell (N,) int64 (the row of
    `cell_type` the key belongs to), cell_type (C,) int64 per cell (-1 unknown)."""

    values: np.ndarray
    is_tf: np.ndarray
    cell: np.ndarray
    cell_type: np.ndarray


def received_attention(weights: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) attention each input slot's key receives: mean over heads and real queries.

    weights: (B, heads, Lq, Lk) padded fusion attention; input_ids / attention_mask: (B, L); token_index: (B, L)
    token of each slot (patch backbones) or None."""
    from grnformer_ds.modeling.layout import gene_attention

    bsz, length = input_ids.shape
    if token_index is not None:
        slot_w = gene_attention(weights, token_index)  # (B, h, Lq, L)
        hits = torch.zeros(bsz, weights.shape[2], device=weights.device)
        hits.scatter_add_(1, token_index.clamp(min=0), (token_index >= 0).to(hits.dtype))
        real_q = hits > 0
        real_q[:, 0] = True  # the leading <cls> token
    else:
        lead = weights.shape[-1] - length  # the backbone's own leading keys (scFoundation's T, S)
        slot_w = weights[..., lead:]
        q_lead = weights.shape[2] - length
        real_q = torch.cat([attention_mask.new_ones(bsz, q_lead), attention_mask.bool()], dim=1)
    per_query = slot_w.float().mean(1)  # (B, Lq, L)
    q = real_q.to(per_query.dtype).unsqueeze(-1)
    return (per_query * q).sum(1) / q.sum(1).clamp(min=1)


def collect_key_attention(model, store, *, max_cells: int = 1000, batch_size: int = 16, rank: int = 0,
                          world_size: int = 1) -> KeyAttention:
    """Run `model` (`GRNFormerForMaskedLM` / `GRNFormerModel` with GRN parts) over the store's first `max_cells`
    cells (deterministic tokenization, no masking) and collect the normalised attention of every gene key."""
    from grnformer_ds.grn import read_grn_assets
    from grnformer_ds.store import open_store

    from .embed import embedding_dataset

    opened = open_store(store) if isinstance(store, str) else store
    base = model.grnformer if hasattr(model, "grnformer") else model
    if not base.config.use_graph:
        raise UserInputError("the model has no GRN parts (use_graph=False): there is no fusion attention to report")
    tf_mask = read_grn_assets(opened.path).tf_mask
    column = np.full(int(base.config.vocab_size), -1, np.int64)  # token id -> store gene column
    column[opened.token_ids] = np.arange(len(opened.token_ids))
    dataset = embedding_dataset(base, str(opened.path), batch_size=batch_size, graphs=True, rank=rank,
                                world_size=world_size)
    device = next(base.parameters()).device
    values, is_tf, cells, types = [], [], [], []
    seen = 0
    with torch.no_grad():
        for batch in dataset:
            out = base(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()},
                       output_fusion_attentions=True)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            recv = received_attention(out.fusion_attentions.cpu(), ids, mask,
                                      None if out.token_index is None else out.token_index.cpu()).numpy()
            cols = column[ids.numpy().clip(0, len(column) - 1)]
            gene = mask.numpy() & (cols >= 0)
            for b in range(ids.shape[0]):
                sel = gene[b]
                v = recv[b, sel]
                if v.size == 0 or v.mean() <= 0:
                    continue
                values.append(v / v.mean())
                is_tf.append(tf_mask[cols[b, sel]])
                cells.append(np.full(v.size, len(types), np.int64))
                types.append(int(batch["cell_type_ids"][b]) if "cell_type_ids" in batch else -1)
            seen += ids.shape[0]
            if seen >= max_cells:
                break
    if not values:
        raise UserInputError("no cell with gene keys to report on", str(opened.path))
    return KeyAttention(np.concatenate(values), np.concatenate(is_tf), np.concatenate(cells),
                        np.asarray(types, np.int64))


def rho(values: np.ndarray, is_tf: np.ndarray) -> float:
    """Mean over TF keys / mean over non-TF keys (NaN when either group is empty)."""
    if not is_tf.any() or is_tf.all():
        return float("nan")
    return float(values[is_tf].mean() / values[~is_tf].mean())


def permutation_p_value(keys: KeyAttention, n_permutations: int = 1000, seed: int = 0,
                        select: np.ndarray | None = None) -> tuple[float, float]:
    """(rho, one-sided p) with TF labels permuted among each cell's keys. `select`: a (N,) bool subset of keys
    (whole cells, e.g. one cell type)."""
    values, is_tf, cell = keys.values, keys.is_tf, keys.cell
    if select is not None:
        values, is_tf, cell = values[select], is_tf[select], cell[select]
    observed = rho(values, is_tf)
    if not np.isfinite(observed):
        return observed, float("nan")
    rng = np.random.default_rng(seed)
    order_by_cell = np.argsort(cell, kind="stable")
    values, is_tf, cell = values[order_by_cell], is_tf[order_by_cell], cell[order_by_cell]
    hits = 0
    for _ in range(n_permutations):
        perm = np.lexsort((rng.random(len(cell)), cell))  # a random order within each cell's (contiguous) keys
        hits += rho(values, is_tf[perm]) >= observed
    return observed, (1 + hits) / (1 + n_permutations)


def tf_attention_summary(keys: KeyAttention, cell_type_names: list[str], n_permutations: int = 1000,
                         seed: int = 0) -> dict:
    """The report: overall rho and p, and per cell type (cells, TF keys, rho, p)."""
    r, p = permutation_p_value(keys, n_permutations, seed)
    out = {"rho": r, "p_value": p, "n_permutations": n_permutations, "cells": int(len(keys.cell_type)),
           "tf_keys": int(keys.is_tf.sum()), "non_tf_keys": int((~keys.is_tf).sum()),
           "mean_attention_tf": float(keys.values[keys.is_tf].mean()) if keys.is_tf.any() else float("nan"),
           "mean_attention_non_tf": float(keys.values[~keys.is_tf].mean()) if (~keys.is_tf).any() else float("nan"),
           "per_cell_type": {}}
    key_type = keys.cell_type[keys.cell]
    for t in np.unique(keys.cell_type).tolist():
        sel = key_type == t
        name = cell_type_names[t] if 0 <= t < len(cell_type_names) else "unknown"
        rt, pt = permutation_p_value(keys, n_permutations, seed, select=sel)
        out["per_cell_type"][name] = {"cells": int((keys.cell_type == t).sum()), "tf_keys": int(keys.is_tf[sel].sum()),
                                      "rho": rt, "p_value": pt}
    return out


def plot_tf_attention(summary: dict, keys: KeyAttention, path: str) -> None:
    """PNG: the distribution of normalised attention on TF vs non-TF keys, and rho per cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lo, hi = np.quantile(keys.values, [0.005, 0.995]) if keys.values.size else (0.0, 1.0)
    bins = np.linspace(lo, max(hi, lo + 1e-6), 40)
    ax1.hist(keys.values[~keys.is_tf], bins=bins, density=True, alpha=0.6, label="non-TF keys")
    ax1.hist(keys.values[keys.is_tf], bins=bins, density=True, alpha=0.6, label="TF keys")
    ax1.set_xlabel("attention received / cell mean")
    ax1.set_title(f"rho = {summary['rho']:.3f} (p = {summary['p_value']:.3g})")
    ax1.legend()
    names = list(summary["per_cell_type"])
    ax2.barh(names, [summary["per_cell_type"][n]["rho"] for n in names])
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("rho per cell type")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
