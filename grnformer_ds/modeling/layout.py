"""The token layout one forward works on, shared by every backbone: what a backbone's embedding step hands the shared
encoder / GNN / fusion (`Embedded`), the packed layout's per-token bookkeeping, and the pooling of token states into
one cell embedding.

Padded layout: tokens (B, Lt, H) with a (B, Lt) mask. Packed layout: tokens (1, Tt, H) with the varlen metadata
(`attention.PackedSequences`) built once per forward; the first B segments are cells, any further ones dummy padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import PackedSequences


def num_packed_cells(cu_seq_lens: torch.Tensor, *per_cell: torch.Tensor | None) -> int:
    """Real cells of a packed batch: the first B segments (the rest are dummy padding segments). B comes from a
    per-cell key when the batch has one (its size is static for the compiler), else every segment is a cell."""
    for key in per_cell:
        if key is not None:
            return key.shape[0]
    return cu_seq_lens.shape[0] - 1


def packed_token_cells(cu_seq_lens: torch.Tensor, n_cells: int, total: int, lead: int,
                       seq_ids: torch.Tensor | None = None):
    """(seq_ids (T,) int64 segment of each packed token, is_gene (T,) bool: the token is a gene of a real cell,
    i.e. not one of the ``lead`` special slots at the start of its segment (<cls>, or T and S) nor dummy).
    ``seq_ids`` when the caller has them already (`PackedSequences.seq_ids`)."""
    starts = cu_seq_lens.to(torch.int64)
    positions = torch.arange(total, device=starts.device)
    if seq_ids is None:
        seq_ids = torch.searchsorted(starts[1:], positions, right=True)
    is_gene = (positions - starts[seq_ids] >= lead) & (seq_ids < n_cells)
    return seq_ids, is_gene


@dataclass
class Embedded:
    """A backbone's embedding step: the encoder's input tokens and how they relate to the batch.

    tokens: (B, Lt, H) padded / (1, Tt, H) packed encoder input.
    mask: (B, Lt) bool, True = real token (padded); None when packed.
    seq: `PackedSequences` of the tokens (packed); None when padded.
    gene_tokens: (B, Lt) / (Tt,) bool, the tokens that stand for a cell's genes (mean / max pooling runs over them).
    node_features: (N, H) GNN node features, one per graph node: the batch's input slots (n = b * L + l padded, the
        packed position otherwise), as the loader indexes GRN edges.
    n_cells: B. starts: (B,) int64 first token of each cell (packed). seq_ids: (Tt,) int64 segment of each token.
    out_slice: first token kept in the output states (padded): tokens before it are the backbone's own (T / S).
    extras: whatever else the backbone's later steps need (e.g. the T / S slots, the gene -> token map).
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None
    seq: PackedSequences | None
    gene_tokens: torch.Tensor
    node_features: torch.Tensor
    n_cells: int
    starts: torch.Tensor | None = None
    seq_ids: torch.Tensor | None = None
    out_slice: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.seq is not None


def pool_padded(states: torch.Tensor, gene_tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) states -> (B, H): "cls" = slot 0, "mean" / "max" over the gene tokens."""
    if pooling == "cls":
        return states[:, 0]
    m = gene_tokens.unsqueeze(-1)
    if pooling == "mean":
        return (states * m).sum(1) / m.sum(1).clamp(min=1).to(states.dtype)
    return states.masked_fill(~m, torch.finfo(states.dtype).min).max(1).values


def pool_packed(states: torch.Tensor, emb: Embedded, pooling: str) -> torch.Tensor:
    """`pool_padded` on packed states (T, H): per-segment sums / maxima over each cell's gene tokens by index_add /
    scatter_reduce (static shapes), the first B segments kept."""
    if pooling == "cls":
        return states[emb.starts]
    n_segments, hidden = emb.seq.num_sequences, states.shape[-1]
    is_gene = emb.gene_tokens
    if pooling == "mean":
        w = is_gene.to(states.dtype).unsqueeze(-1)
        sums = states.new_zeros(n_segments, hidden).index_add(0, emb.seq_ids, states * w)
        counts = w.new_zeros(n_segments, 1).index_add(0, emb.seq_ids, w)
        return (sums / counts.clamp(min=1))[:emb.n_cells]
    low = torch.finfo(states.dtype).min
    return states.new_full((n_segments, hidden), low).scatter_reduce(
        0, emb.seq_ids.unsqueeze(-1).expand(-1, hidden), states.masked_fill(~is_gene.unsqueeze(-1), low), "amax",
        include_self=True)[:emb.n_cells]


def pool(states: torch.Tensor, emb: Embedded, pooling: str) -> torch.Tensor:
    """The cell embedding (B, H) for either layout (packed: states (T, H))."""
    return pool_packed(states, emb, pooling) if emb.packed else pool_padded(states, emb.gene_tokens, pooling)


def keys_without_lead(states: torch.Tensor, emb: Embedded, lead: int):
    """Packed fusion keys without the ``lead`` special slots at the start of each cell's segment (they have no
    graph node), as the padded layout's key mask: (kv (1, Tk, H), kv_seq `PackedSequences`). states: (Tt, H)."""
    seq, n_cells = emb.seq, emb.n_cells
    device = emb.starts.device
    removed = lead * torch.arange(seq.num_sequences + 1, device=device).clamp(max=n_cells)
    cu_k = seq.cu_seqlens.to(torch.int64) - removed
    k_total = states.shape[0] - lead * n_cells
    k_pos = torch.arange(k_total, device=device)
    k_seg = torch.searchsorted(cu_k[1:], k_pos, right=True)
    kv = states[k_pos + lead * (k_seg + 1).clamp(max=n_cells)]
    kv_seq = PackedSequences.build(cu_k, seq.max_seqlen, k_total, with_padded_view=seq.gather is not None)
    return kv.unsqueeze(0), kv_seq


def gene_attention(weights: torch.Tensor, token_index: torch.Tensor | None) -> torch.Tensor:
    """Fusion attention over tokens -> over input slots (genes), for the TF-attention analysis.

    weights: (B, heads, Lq, Lt) padded fusion attention. token_index: (B, L) token of each input slot (-1: none),
    or None when tokens are the input slots (returned unchanged). A token standing for several genes (a patch) shares
    its weight equally among them (its key is their mean structure state), so each query's weights over genes still
    sum to its weights over tokens. Returns (B, heads, Lq, L)."""
    if token_index is None:
        return weights
    valid = token_index >= 0
    idx = token_index.clamp(min=0)
    sizes = torch.zeros(weights.shape[0], weights.shape[-1], dtype=weights.dtype, device=weights.device)
    sizes.scatter_add_(1, idx, valid.to(weights.dtype))
    per_gene = torch.gather(weights, 3, idx[:, None, None, :].expand(-1, weights.shape[1], weights.shape[2], -1))
    share = torch.where(valid, 1.0 / torch.gather(sizes, 1, idx).clamp(min=1), torch.zeros_like(sizes[:, :1]))
    return per_gene * share[:, None, None, :]
