"""Throughput accounting: cells/s, tokens/s, non-pad tokens/s and model FLOPs utilisation (MFU).

MFU counts the useful matmul FLOPs of the transformer parts on **non-pad tokens** (PaLM appendix B: training = 3 x
forward; a forward costs 2 FLOPs per parameter per token for the per-token matmuls, plus 4 * d per pair of tokens that
attend to each other, per attention layer, for QK^T and AV):

* encoder: the encoder layers and the fusion adapter on the cells' tokens; attention pairs = sum over cells of
  length^2 (what varlen kernels compute; a padded batch computes more, which MFU does not credit);
* scFoundation's decoder: its layers on the B x (G + 2) decoder tokens (the genes, T and S), (G + 2)^2 pairs per cell
  with exact attention; with FAVOR+ (`decoder_attention="performer"`) no pairs but 8 * m * d per token and layer (the
  q and k features, phi(k)^T v and phi(q) times it; m random features).

Embedding tables (lookups, no matmul), the GNN (message passing over ~2 edges per token) and the small heads are not
counted. Padding, dummy segments and `<pad>` slots are never counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (without sparsity).
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, val in _PEAK_BF16.items():
        if key in name:
            return val
    return None


@dataclass
class BatchCounts:
    """What one collated batch holds. cells: real cells; tokens: token slots the model runs over (padding and dummy
    segments included); nonpad: tokens of real cells (scFoundation's T and S tokens included); attention_pairs: sum
    over cells of the encoder length^2; decoder_tokens: B x G (scFoundation's all-gene decoder, else 0);
    encoder_tokens: tokens the transformer runs over for the real cells (= nonpad, except for a backbone that
    groups slots into fewer tokens: scPaLM's patches), None = nonpad."""

    cells: int
    tokens: int
    nonpad: int
    attention_pairs: int
    decoder_tokens: int = 0
    encoder_tokens: int | None = None


def batch_counts(batch: dict, encoder_lengths=None) -> BatchCounts:
    """`BatchCounts` of a padded or packed batch (docs/design.md section 3). ``encoder_lengths``: the model's
    `Backbone.encoder_lengths` (a cell's slots -> its encoder tokens), None = one token per slot."""
    ids = batch["input_ids"]
    extra = 2 if "total_counts" in batch else 0  # scFoundation's T and S tokens
    if batch.get("cu_seq_lens_q") is not None:
        cu = batch["cu_seq_lens_q"].to(torch.int64)
        n_cells = int(batch["cell_index"].shape[0]) if "cell_index" in batch else int(cu.numel() - 1)
        lengths = cu.diff()[:n_cells]
    else:
        mask = batch.get("attention_mask")
        lengths = mask.sum(1).to(torch.int64) + extra if mask is not None else \
            torch.full((ids.shape[0],), ids.shape[1] + extra)
        n_cells = int(ids.shape[0])
    dec = batch.get("decoder_values")
    enc = lengths if encoder_lengths is None else encoder_lengths(lengths)
    return BatchCounts(cells=n_cells, tokens=int(ids.numel()), nonpad=int(lengths.sum()),
                       attention_pairs=int((enc ** 2).sum()),
                       decoder_tokens=int(dec.numel()) if dec is not None else 0, encoder_tokens=int(enc.sum()))


def _numel(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def flops_profile(model: torch.nn.Module) -> dict[str, int]:
    """The sizes `train_flops` needs, read off a `GRNFormerForMaskedLM` (ZeRO-3 partitioned or not)."""
    core = model.grnformer
    cfg = model.config
    attn_layers = len(core.layers) + (1 if core.fusion is not None else 0)
    out = {"encoder_params": _numel(core.layers) + _numel(core.fusion), "encoder_attn_layers": attn_layers,
           "d_model": cfg.hidden_size, "decoder_params": 0, "decoder_layers": 0, "d_decoder": 0}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        out.update(decoder_params=_numel(decoder.layers), decoder_layers=len(decoder.layers),
                   d_decoder=cfg.decoder_hidden_size)
        features = [getattr(layer.self_attn, "num_features", 0) for layer in decoder.layers]
        if any(features):
            out["decoder_features"] = features[0]
    return out


def train_flops(profile: dict[str, int], counts: BatchCounts) -> float:
    """Useful training FLOPs of one batch (module docstring)."""
    encoder_tokens = counts.nonpad if counts.encoder_tokens is None else counts.encoder_tokens
    fwd = 2.0 * profile["encoder_params"] * encoder_tokens
    fwd += 4.0 * profile["encoder_attn_layers"] * profile["d_model"] * counts.attention_pairs
    if profile.get("decoder_layers") and counts.decoder_tokens:
        tokens = counts.decoder_tokens + 2 * counts.cells  # + T and S
        per_cell = tokens / max(counts.cells, 1)
        fwd += 2.0 * profile["decoder_params"] * tokens
        if profile.get("decoder_features"):
            fwd += 8.0 * profile["decoder_layers"] * profile["decoder_features"] * profile["d_decoder"] * tokens
        else:
            fwd += 4.0 * profile["decoder_layers"] * profile["d_decoder"] * counts.cells * per_cell ** 2
    return 3.0 * fwd


def masked_positions(batch: dict) -> int:
    """Positions whose loss counts (``labels != -100``) in one batch: the loss normaliser's share of this batch."""
    labels = batch.get("labels")
    return 0 if labels is None else int((labels != -100).sum())
