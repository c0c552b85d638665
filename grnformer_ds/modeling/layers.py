"""Transformer encoder layer shared by every backbone (and scFoundation's decoder).

Matches `torch.nn.TransformerEncoderLayer` (what scGPT and scFoundation's encoder use): post-norm by default
(`x = LN1(x + drop(SA(x))); x = LN2(x + drop(FFN(x)))`), FFN = Linear -> act -> dropout -> Linear, but with
GRNFormer's attention dispatch (eager / sdpa / flash-attn varlen) and HF gradient checkpointing. Pre-norm
(`x = x + drop(SA(LN1(x))); x = x + drop(FFN(LN2(x)))`) is performer-pytorch's layer, scFoundation's decoder, whose
self-attention is FAVOR+ (`performer.PerformerAttention`, passed in as `self_attn`).
"""
from __future__ import annotations

from typing import Callable

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
                 attn_implementation: str, self_attn: nn.Module | None = None):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = self_attn if self_attn is not None else GRNFormerAttention(
            hidden_size, num_heads, attention_dropout, attn_implementation)
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


def build_layers(config, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, *,
                 norm_first: bool | None = None, hidden_act: str | None = None,
                 attention: Callable[[], nn.Module] | None = None) -> nn.ModuleList:
    """`num_layers` layers; norm_first / hidden_act default to the config's (the encoder's), `attention` builds each
    layer's self-attention (default: `GRNFormerAttention` through the config's attention implementation)."""
    return nn.ModuleList(
        GRNFormerLayer(
            hidden_size, num_heads, intermediate_size, hidden_act or config.hidden_act, config.hidden_dropout_prob,
            config.attention_probs_dropout_prob, config.layer_norm_eps,
            config.norm_first if norm_first is None else norm_first, config._attn_implementation,
            self_attn=None if attention is None else attention(),
        )
        for _ in range(num_layers)
    )
