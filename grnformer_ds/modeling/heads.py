"""Prediction heads.

- `ExprDecoder` (scGPT): Linear(H, H) -> LeakyReLU -> Linear(H, H) -> LeakyReLU -> Linear(H, 1), per token.
- `MVCDecoder` (scGPT's GEPC, "inner product" style): query = sigmoid(Linear(gene_emb)); value = <W query, cell_emb>.
- `ScFoundationDecoder` (xTrimoGene): Linear(H_enc, H_dec) -> layers over all genes and the T / S tokens ->
  LayerNorm (the layer stack's own) -> LayerNorm -> Linear(H_dec, 1), as scFoundation's MaeAutobin with its
  PerformerModule. Layers: pre-norm, GELU FFN, and either FAVOR+ attention (`decoder_attention="performer"`,
  scFoundation's, linear in the number of genes; `performer.py`) or exact attention through the model's attention
  dispatch (`"exact"`, the default for a new model; flash-attn varlen keeps it affordable on a GPU).
- `CellClassifier` (task heads on the cell embedding; scGPT's ClsDecoder): n x [Linear(H', H') -> ReLU ->
  LayerNorm] -> Dropout -> Linear(H', num_labels).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import build_layers
from .performer import PerformerAttention


class ExprDecoder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.LeakyReLU(),
            nn.Linear(hidden_size, hidden_size), nn.LeakyReLU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L)."""
        return self.fc(hidden_states).squeeze(-1)


class MVCDecoder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.gene2query = nn.Linear(hidden_size, hidden_size)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, cell_embedding: torch.Tensor, gene_embeddings: torch.Tensor,
                seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """cell (B, H), genes (B, L, H) -> (B, L) predicted values; packed: genes (1, T, H) and seq_ids (T,) the cell
        of each token (indices into cell_embedding) -> (1, T)."""
        query = self.query_activation(self.gene2query(gene_embeddings))
        if seq_ids is not None:
            return (self.W(query)[0] * cell_embedding[seq_ids]).sum(-1)[None]
        return torch.bmm(self.W(query), cell_embedding.unsqueeze(-1)).squeeze(-1)


class ScFoundationDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, heads = config.decoder_hidden_size, config.decoder_num_attention_heads
        attention = None
        if config.decoder_attention == "performer":
            def attention():
                return PerformerAttention(hidden, heads, config.decoder_performer_features)
        self.embed = nn.Linear(config.hidden_size, hidden)
        self.layers = build_layers(config, config.decoder_num_hidden_layers, hidden, heads,
                                   config.decoder_intermediate_size, norm_first=config.decoder_norm_first,
                                   hidden_act=config.decoder_hidden_act, attention=attention)
        self.layers_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)  # the layer stack's (PerformerModule.norm)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)  # MaeAutobin.norm, before the output projection
        self.to_final = nn.Linear(hidden, 1)

    def forward(self, decoder_inputs: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, N, H_enc) -> predictions (B, N), decoder states (B, N, H_dec); N = the genes + T and S."""
        x = self.embed(decoder_inputs)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask)
        x = self.norm(self.layers_norm(x))
        return self.to_final(x).squeeze(-1), x


class CellClassifier(nn.Module):
    """Cell embedding (B, H') -> logits (B, num_labels). `hidden_layers` blocks of Linear -> ReLU -> LayerNorm as
    scGPT's ClsDecoder (its default nlayers=3 = 2 blocks + the output layer), then dropout and the output layer."""

    def __init__(self, in_size: int, num_labels: int, hidden_layers: int = 2, dropout: float = 0.0,
                 eps: float = 1e-5):
        super().__init__()
        blocks = []
        for _ in range(hidden_layers):
            blocks += [nn.Linear(in_size, in_size), nn.ReLU(), nn.LayerNorm(in_size, eps=eps)]
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(in_size, num_labels)

    def forward(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.blocks(cell_embedding)))
