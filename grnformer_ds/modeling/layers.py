"""Transformer encoder layer shared by both backbones (and scFoundation's decoder).

Matches `torch.nn.TransformerEncoderLayer` (what scGPT and scFoundation use): post-norm by default
(`x = LN1(x + drop(SA(x))); x = LN2(x + drop(FFN(x)))`), FFN = Linear -> act -> dropout -> Linear, but with
GRNFormer's attention dispatch (eager / sdpa / flash-attn varlen) and HF gradient checkpointing.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import GRNFormerAttention, PackedSequences


class GRNFormerFeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.act(self.linear1(x))))


class GRNFormerLayer(GradientCheckpointingLayer):
    """One encoder layer. Input/output (B, L, H) with `attention_mask` (B, L) bool, True = real token; or packed
    (1, T, H) with `packed` (`attention.PackedSequences`, built once per batch)."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, hidden_act: str,
                 hidden_dropout: float, attention_dropout: float, layer_norm_eps: float, norm_first: bool,
                 attn_implementation: str):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = GRNFormerAttention(hidden_size, num_heads, attention_dropout, attn_implementation)
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(hidden_dropout)
        self.dropout2 = nn.Dropout(hidden_dropout)
        self.ffn = GRNFormerFeedForward(hidden_size, intermediate_size, hidden_act, hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                packed: PackedSequences | None = None) -> torch.Tensor:
        x = hidden_states
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), attention_mask, packed=packed)[0])
            x = x + self.dropout2(self.ffn(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(self.self_attn(x, attention_mask, packed=packed)[0]))
            x = self.norm2(x + self.dropout2(self.ffn(x)))
        return x


def build_layers(config, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int) -> nn.ModuleList:
    return nn.ModuleList(
        GRNFormerLayer(
            hidden_size, num_heads, intermediate_size, config.hidden_act, config.hidden_dropout_prob,
            config.attention_probs_dropout_prob, config.layer_norm_eps, config.norm_first,
            config._attn_implementation,
        )
        for _ in range(num_layers)
    )
