"""Gene-token and expression-value embeddings of the two backbones.

- `GeneEncoder` (scGPT): Embedding(vocab, H, padding_idx=<pad>) -> LayerNorm (no norm for scFoundation, whose
  gene identity embedding is a plain embedding added to the value embedding).
- `ContinuousValueEncoder` (scGPT, whole-human default): value -> clamp(max=max_value) -> Linear(1, H) -> ReLU ->
  Linear(H, H) -> LayerNorm -> dropout. Mask (-1) and pad (-2) values go through the same MLP, as in scGPT.
- `CategoricalValueEncoder` (scGPT "category" style): Embedding(n_bins + 2, H) -> LayerNorm; the batch's mask value
  maps to row n_bins + 1 and the pad value to row n_bins (scGPT's ids for them in that style).
- `AutoDiscretizationEncoder` (scFoundation / xTrimoGene): value -> Linear(1, K) -> LeakyReLU(0.1) -> Linear(K, K),
  mixed as alpha*h + h2, softmax over the K bins, weighted sum of K learned bin embeddings; mask and pad positions
  take two learned embeddings instead.
"""
from __future__ import annotations

import torch
from torch import nn


class GeneEncoder(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, pad_token_id: int, eps: float, use_norm: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.norm = nn.LayerNorm(hidden_size, eps=eps) if use_norm else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, L, H)."""
        x = self.embedding(input_ids)
        return x if self.norm is None else self.norm(x)


class ContinuousValueEncoder(nn.Module):
    def __init__(self, hidden_size: int, dropout: float, max_value: float, eps: float):
        super().__init__()
        self.max_value = max_value
        self.linear1 = nn.Linear(1, hidden_size)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) float -> (B, L, H)."""
        x = values.unsqueeze(-1).clamp(max=self.max_value).to(self.linear1.weight.dtype)
        x = self.linear2(self.act(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoricalValueEncoder(nn.Module):
    def __init__(self, n_bins: int, hidden_size: int, mask_value: float, pad_value: float, eps: float):
        super().__init__()
        self.n_bins = n_bins
        self.mask_value = mask_value
        self.pad_value = pad_value
        self.embedding = nn.Embedding(n_bins + 2, hidden_size, padding_idx=n_bins)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) binned values (0..n_bins-1, mask_value, pad_value) -> (B, L, H)."""
        ids = values.round().long()
        ids = torch.where(values == self.pad_value, torch.full_like(ids, self.n_bins), ids)
        ids = torch.where(values == self.mask_value, torch.full_like(ids, self.n_bins + 1), ids)
        ids = ids.clamp(0, self.n_bins + 1)
        return self.norm(self.embedding(ids))


class AutoDiscretizationEncoder(nn.Module):
    def __init__(self, hidden_size: int, num_bins: int, alpha: float, mask_value: float, pad_value: float):
        super().__init__()
        self.alpha = alpha
        self.mask_value = mask_value
        self.pad_value = pad_value
        self.mlp1 = nn.Linear(1, num_bins)
        self.act = nn.LeakyReLU(0.1)
        self.mlp2 = nn.Linear(num_bins, num_bins)
        self.bin_embeddings = nn.Embedding(num_bins, hidden_size)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden_size))
        self.pad_embedding = nn.Parameter(torch.zeros(hidden_size))

    def bin_weights(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, K) softmax weights over the bins."""
        h = self.act(self.mlp1(values.unsqueeze(-1).to(self.mlp1.weight.dtype)))
        return torch.softmax(self.alpha * h + self.mlp2(h), dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) continuous values (mask_value / pad_value at special positions) -> (B, L, H)."""
        x = self.bin_weights(values) @ self.bin_embeddings.weight
        is_mask = (values == self.mask_value).unsqueeze(-1)
        is_pad = (values == self.pad_value).unsqueeze(-1)
        x = torch.where(is_mask, self.mask_embedding.to(x.dtype), x)
        return torch.where(is_pad, self.pad_embedding.to(x.dtype), x)


def build_value_encoder(config) -> nn.Module:
    if config.value_encoding == "continuous":
        return ContinuousValueEncoder(config.hidden_size, config.hidden_dropout_prob, config.max_value,
                                      config.layer_norm_eps)
    if config.value_encoding == "categorical":
        return CategoricalValueEncoder(config.n_bins, config.hidden_size, config.mask_value, config.pad_value,
                                       config.layer_norm_eps)
    return AutoDiscretizationEncoder(config.hidden_size, config.autobin_num_bins, config.autobin_alpha,
                                     config.mask_value, config.pad_value)
