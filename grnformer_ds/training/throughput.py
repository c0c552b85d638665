"""Throughput accounting: cells/s, tokens/s, non-pad tokens/s and model FLOPs utilisation (MFU).

FLOPs per step use the standard dense-transformer estimate (Kaplan et al. 2020; PaLM appendix B):
training = 3 x forward, forward = 2 * N_params FLOPs per token + attention 2 * n_layers * L * d_model per token
(QK^T and AV, counted on padded length since that is what runs). GNN message passing is small next to the
backbone and is covered by its parameters' term.
"""
from __future__ import annotations

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


def train_flops(n_params: int, tokens: int, n_layers: int = 0, seq_len: int = 0, d_model: int = 0) -> float:
    """Training FLOPs (forward + backward) for `tokens` tokens processed at padded length `seq_len`."""
    per_token_fwd = 2.0 * n_params + 2.0 * n_layers * seq_len * d_model
    return 3.0 * per_token_fwd * tokens


def batch_counts(batch: dict) -> tuple[int, int, int]:
    """(cells, tokens, non-pad tokens) of one collated batch (see DESIGN.md section 3)."""
    ids = batch["input_ids"]
    cells = int(ids.shape[0])
    mask = batch.get("attention_mask")
    nonpad = int(mask.sum()) if mask is not None else int(ids.numel())
    return cells, int(ids.numel()), nonpad
