"""FAVOR+ attention (Performer; Choromanski et al., ICLR 2021): the attention of scFoundation's decoder.

softmax(q k^T / sqrt(d)) is replaced by phi(q) phi(k)^T with positive random features

    phi(x) = m^-1/2 * (exp(W x' - |x'|^2 / 2 - c) + eps),   x' = x * d^-1/4,   W (m, d) a Gaussian orthogonal matrix,

so one layer costs O(N m d) instead of O(N^2 d): scFoundation's decoder runs over every gene of the genome (19,266
tokens per cell) and stays linear in it. W is a buffer (an imported checkpoint brings its own; a new model draws one
at init) and is never redrawn here: scFoundation's training code redraws it every 1,000 training calls, which a
sharded, resumable run would have to checkpoint and replay; a fixed W is what its evaluation uses.

c only keeps exp() in range: per row for queries (it cancels in the normalisation), and for keys the maximum over a
cell's whole key tensor (heads x tokens x features; it cancels except against eps). scFoundation takes that key
maximum over the whole batch, so its predictions for a cell moved with the other cells of the batch; here it is per
cell, which equals scFoundation's output for a batch of one cell (`tests/test_model_import_scfoundation.py` runs the
reference cell by cell). Features and the two linear-attention products are computed in float32 whatever the
model's dtype (exp() of bf16 logits loses the ratios the normalisation divides).

`exact_softmax_attention` (the quantity FAVOR+ estimates) is the test reference for the approximation itself.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def default_num_features(head_dim: int) -> int:
    """scFoundation's (performer-pytorch's) default number of random features: int(d ln d), 266 for d = 64."""
    return int(head_dim * math.log(head_dim))


def gaussian_orthogonal_random_matrix(num_features: int, head_dim: int,
                                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(m, d) projection: stacked blocks of random orthogonal rows, each row rescaled to the norm of a Gaussian
    vector (FAVOR+'s ORF, "scaling 0"), so that every row is marginally N(0, I). Drawn on the CPU in float32."""
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator))
        # sign fix: LAPACK's Householder QR makes R's diagonal negative where the column's first entry is positive,
        # so Q alone is not uniformly distributed (its first column always points away from e1) and the kernel
        # estimate is biased (~9 % at any number of features); Q * sign(diag R) is Haar-uniform
        blocks.append((q * torch.sign(torch.diagonal(r)).unsqueeze(0)).T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)
    return norms.unsqueeze(1) * rows


def favor_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool, key_valid: torch.Tensor | None = None,
                   eps: float = 1e-4) -> torch.Tensor:
    """Positive random features of queries or keys.

    Args:
        x: (B, h, N, d) queries or keys.
        projection: (m, d) W.
        is_query: stabilise per row (queries) or per cell (keys).
        key_valid: (B, N) bool, keys only: False rows (padding) get zero features and do not set the stabiliser.
    Returns:
        (B, h, N, m) float32.
    """
    x = x.float()
    w = projection.float()
    scale = x.shape[-1] ** -0.25
    dash = torch.einsum("bhnd,md->bhnm", x * scale, w)  # W x'
    half_sq_norm = x.square().sum(-1, keepdim=True) * (scale * scale / 2)  # |x'|^2 / 2, (B, h, N, 1)
    if is_query:
        stab = dash.amax(-1, keepdim=True)
    else:
        seen = dash if key_valid is None else dash.masked_fill(~key_valid[:, None, :, None], float("-inf"))
        stab = seen.amax(dim=(1, 2, 3), keepdim=True)
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # a cell without keys
    feats = (torch.exp(dash - half_sq_norm - stab) + eps) * (w.shape[0] ** -0.5)
    if key_valid is not None and not is_query:
        feats = feats * key_valid[:, None, :, None].to(feats.dtype)
    return feats


def linear_attention(q_feats: torch.Tensor, k_feats: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention: (phi(q) (phi(k)^T v)) / (phi(q) . sum_n phi(k_n)).
    q_feats (B, h, Nq, m), k_feats (B, h, Nk, m), v (B, h, Nk, e) -> (B, h, Nq, e) float32."""
    k_sum = k_feats.sum(dim=-2)  # (B, h, m)
    denom = torch.einsum("bhnm,bhm->bhn", q_feats, k_sum)
    context = torch.einsum("bhnm,bhne->bhme", k_feats, v.float())  # (B, h, m, e)
    return torch.einsum("bhnm,bhme->bhne", q_feats, context) / denom.unsqueeze(-1)


def exact_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, h, N, d) tensors, float32: what FAVOR+ approximates."""
    scores = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhnk,bhke->bhne", scores.softmax(-1), v.float())


class PerformerAttention(nn.Module):
    """Multi-head FAVOR+ self-attention with separate q/k/v/o projections (biases on all four, as scFoundation's).

    Same call as `attention.GRNFormerAttention` on the padded layout, so `layers.GRNFormerLayer` takes either.

    Args:
        hidden_size: H = num_heads * head_dim.
        num_heads: heads.
        num_features: m, random features per head (None: int(d ln d)).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_features: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.num_features = num_features or default_num_features(self.head_dim)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        # filled by the model's weight init (`draw_projection`) or by loaded weights
        self.register_buffer("projection_matrix", torch.empty(self.num_features, self.head_dim))

    def draw_projection(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A new (m, d) projection matrix (for weight init)."""
        return gaussian_orthogonal_random_matrix(self.num_features, self.head_dim, generator)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        return x.view(bsz, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, packed=None,
                output_attentions: bool = False, **_):
        """hidden_states (B, N, H), attention_mask (B, N) bool (True = real token) -> ((B, N, H), None)."""
        if packed is not None:
            raise ValueError("PerformerAttention runs on the padded layout only (scFoundation's decoder)")
        if output_attentions:
            raise ValueError("PerformerAttention has no attention matrix to return (it never forms one)")
        bsz, n, hidden = hidden_states.shape
        q, k, v = (self._heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q_feats = favor_features(q, self.projection_matrix, is_query=True)
        k_feats = favor_features(k, self.projection_matrix, is_query=False, key_valid=attention_mask)
        out = linear_attention(q_feats, k_feats, v).to(hidden_states.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, n, hidden)), None
