"""Graph topological adapter (the paper's fusion): multi-head cross-attention from expression to structure.

    h = h_expr + beta * Dropout(CrossAttn(Q = h_expr, K = V = LayerNorm(h_struct)))

with a learnable scalar beta (`config.fusion_beta_init`). Keys at padded token slots (and any slot without a graph
node, e.g. scFoundation's total-count tokens) are masked. Placed after the last encoder layer or replacing it
(`config.fusion_position`). The attention weights can be returned for the TF-vs-non-TF attention analysis.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import GRNFormerAttention


class GraphFusionAdapter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.struct_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = GRNFormerAttention(config.hidden_size, config.fusion_heads,
                                             config.attention_probs_dropout_prob, config._attn_implementation)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.beta = nn.Parameter(torch.full((1,), float(config.fusion_beta_init)))

    def forward(self, h_expr: torch.Tensor, h_struct: torch.Tensor, query_mask: torch.Tensor | None,
                key_mask: torch.Tensor | None, output_attentions: bool = False, packed=None, kv_packed=None):
        """
        Args:
            h_expr: (B, Lq, H) expression states (queries); packed: (1, Tq, H).
            h_struct: (B, Lk, H) structure states (keys/values); packed: (1, Tk, H), the same cells' tokens.
            query_mask: (B, Lq) bool, True = real token; key_mask: (B, Lk) bool (padded layout).
            packed / kv_packed: `attention.PackedSequences` of the queries / keys (packed layout).
        Returns:
            fused (B, Lq, H), weights (B, heads, Lq, Lk) (packed: per cell (S, heads, Mq, Mk)) or None.
        """
        h_fusion, weights = self.cross_attn(h_expr, query_mask, key_value_states=self.struct_norm(h_struct),
                                            kv_attention_mask=key_mask, output_attentions=output_attentions,
                                            packed=packed, kv_packed=kv_packed)
        return h_expr + self.beta.to(h_expr.dtype) * self.dropout(h_fusion), weights
