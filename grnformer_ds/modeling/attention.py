"""The one attention dispatch point of GRNFormer, used by self-attention and by the fusion cross-attention.

Implementations (`config._attn_implementation`, transformers' own field, resolved once at model build):
- `eager`: explicit softmax(QK^T/sqrt(d))V in float32 softmax; the reference, and the only one that returns weights.
- `sdpa` (default): `torch.nn.functional.scaled_dot_product_attention` with a boolean key-padding mask.
- `varlen`: torch's own `torch.nn.attention.varlen.varlen_attn` (FlashAttention kernels inside PyTorch >= 2.10, CUDA,
  bf16/fp16, no extra package); it has no attention dropout, so training with `attention_probs_dropout_prob > 0`
  is refused.
- `flash_attention_2`: flash-attn's `flash_attn_varlen_func`. Needs the `flash-attn` package and a CUDA GPU
  (`pip install grnformer_ds[flash]`).

Two batch layouts reach it:
- padded (B, L, ...) with (B, L) boolean masks (True = real token, HF convention). eager/sdpa mask the keys only
  (padded query rows produce finite values nothing downstream reads); varlen/flash unpad q, k and v, run the varlen
  kernel and pad the output back (zeros at padded query rows).
- packed (1, T, ...), cells back to back, with a `PackedSequences` per side (query, key): the varlen metadata, built
  ONCE per batch by the model and passed to every layer (torchtitan's rule), so no layer unpads or syncs with the
  host. varlen/flash run on the packed tokens directly; eager/sdpa (the CPU path and the reference) run on a
  per-sequence padded view of the same tokens, gathered and scattered back with indices built once per batch:
  plain tensor ops with no data-dependent shapes, so `torch.compile` traces them without a graph break.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "varlen", "flash_attention_2")
FLASH_INSTALL_HINT = "pip install 'grnformer_ds[flash]'"


def resolve_attn_implementation(requested: str | None) -> str:
    """Validate the requested implementation and return the one to use (None -> "sdpa").

    flash_attention_2 is refused with an ImportError naming the pip extra when flash-attn is not installed or no CUDA
    device is visible, varlen when torch has no `varlen_attn` or no CUDA device is visible; there is no silent
    fallback, so a run never trains with another kernel than it asked for.
    """
    impl = "sdpa" if requested is None else requested
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={impl!r} is not supported by GRNFormer; choose one of {list(ATTN_IMPLEMENTATIONS)}"
        )
    if impl == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ImportError(
                "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed; "
                f"install it with `{FLASH_INSTALL_HINT}` or use attn_implementation='sdpa'"
            )
        if not torch.cuda.is_available():
            raise ImportError(
                "attn_implementation='flash_attention_2' needs a CUDA GPU and none is visible; "
                "use attn_implementation='sdpa' on this machine"
            )
    if impl == "varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            raise ImportError(f"attn_implementation='varlen' needs torch >= 2.10 (torch.nn.attention.varlen); "
                              f"this is torch {torch.__version__}: use attn_implementation='sdpa'")
        if not torch.cuda.is_available():
            raise ImportError("attn_implementation='varlen' needs a CUDA GPU and none is visible; "
                              "use attn_implementation='sdpa' on this machine")
    return impl


# --------------------------------------------------------------------------------------------------------------
# packed sequences: the varlen metadata of one side (queries or keys) of a packed batch
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PackedSequences:
    """Where each sequence of a packed (1, T) row starts, built once per batch and shared by every layer.

    cu_seqlens: (S+1,) int32 offsets (first 0, last T). max_seqlen: int, >= the longest sequence (an upper bound is
    fine: the kernels size their grids with it). seq_ids: (T,) int64 sequence of each token.
    For the eager / sdpa path (`with_padded_view`): gather (S, M) int64 packed position of slot m of sequence s
    (clamped in range), valid (S, M) bool, scatter (T,) int64 position of each token in the flattened (S * M) view;
    M = max_seqlen.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_ids: torch.Tensor
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total: int,
              with_padded_view: bool = False) -> "PackedSequences":
        """From the batch's ``cu_seq_lens`` (S+1,) and ``max_length``; ``total`` = T (static)."""
        cu = cu_seqlens.to(torch.int32)
        starts = cu.to(torch.int64)
        positions = torch.arange(total, device=cu.device)
        seq_ids = torch.searchsorted(starts[1:], positions, right=True)
        out = cls(cu, int(max_seqlen), seq_ids)
        if with_padded_view:
            slot = torch.arange(int(max_seqlen), device=cu.device)
            lengths = starts[1:] - starts[:-1]
            out.valid = slot[None, :] < lengths[:, None]
            out.gather = (starts[:-1, None] + slot[None, :]).clamp(max=max(total - 1, 0))
            out.scatter = seq_ids * int(max_seqlen) + (positions - starts[seq_ids])
        return out


# --------------------------------------------------------------------------------------------------------------
# unpad / pad helpers for the varlen kernels on padded batches (pure torch so that they are testable on CPU;
# flash_attn's own bert_padding helpers need the CUDA extension to import)
# --------------------------------------------------------------------------------------------------------------


def unpad_input(hidden: torch.Tensor, mask: torch.Tensor):
    """Drop padded positions.

    Args:
        hidden: (B, L, ...) tensor.
        mask: (B, L) bool, True = real token.
    Returns:
        packed (N, ...) with N = mask.sum() (row-major order), indices (N,) int64 into the flattened B*L positions,
        cu_seqlens (B+1,) int32 cumulative lengths starting at 0, max_seqlen (int).
    """
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of `unpad_input`: (N, ...) -> (B, L, ...) with zeros at padded positions."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_copy(0, indices, packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])


# --------------------------------------------------------------------------------------------------------------
# kernels on padded (B, L, heads, head_dim) tensors
# --------------------------------------------------------------------------------------------------------------


def eager_attention(q, k, v, kv_mask, dropout_p: float, scale: float):
    """Reference attention. Returns (out (B, Lq, h, d), weights (B, h, Lq, Lk) float32)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    probs = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(probs.to(vh.dtype), vh)
    return out.transpose(1, 2), weights


def sdpa_attention(q, k, v, kv_mask, dropout_p: float, scale: float):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------
# varlen kernels on packed (N, heads, head_dim) tensors; all share flash-attn's keyword signature
# --------------------------------------------------------------------------------------------------------------

_LOW_PRECISION_WARNED = False


def _flash_varlen_func():
    # imported lazily: the module must import on machines without flash-attn
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _torch_varlen_func():
    """torch's `varlen_attn` behind flash-attn's keyword signature (no dropout; the default 1/sqrt(d) scale, which is
    GRNFormer's, so the `scale` keyword that torch 2.10 lacks is never needed)."""
    from torch.nn.attention.varlen import varlen_attn

    def run(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
        if dropout_p > 0:
            raise ValueError("attn_implementation='varlen' (torch varlen_attn) has no attention dropout; set "
                             "attention_probs_dropout_prob=0 or use 'flash_attention_2' or 'sdpa'")
        if causal:
            raise ValueError("GRNFormer attention is bidirectional")
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    return run


def _varlen_func(impl: str):
    return _flash_varlen_func() if impl == "flash_attention_2" else _torch_varlen_func()


def _low_precision(*tensors):
    """The CUDA varlen kernels take fp16/bf16 only: fp32 inputs are cast to bf16 (a one-time warning, as
    transformers does). Tests substitute CPU reference kernels in float32, which stay as they are."""
    global _LOW_PRECISION_WARNED
    if tensors[0].dtype in (torch.float16, torch.bfloat16) or not tensors[0].is_cuda:
        return tensors
    if not _LOW_PRECISION_WARNED:
        warnings.warn("a varlen attention kernel got float32 inputs; casting q/k/v to bfloat16 for the kernel")
        _LOW_PRECISION_WARNED = True
    return tuple(t.to(torch.bfloat16) for t in tensors)


def flash_attention(q, k, v, q_mask, kv_mask, dropout_p: float, scale: float, varlen_func=None):
    """A varlen kernel on a padded batch: unpad, run, pad back (zeros at padded query rows).

    `varlen_func` (flash-attn's signature) defaults to flash-attn's; tests substitute a reference kernel."""
    fn = varlen_func or _flash_varlen_func()
    batch, q_len = q.shape[:2]
    k_len = k.shape[1]
    if q_mask is None:
        q_mask = torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
    if kv_mask is None:
        kv_mask = torch.ones(batch, k_len, dtype=torch.bool, device=k.device)
    in_dtype = q.dtype
    q, k, v = _low_precision(q, k, v)
    q_packed, q_idx, cu_q, max_q = unpad_input(q, q_mask)
    k_packed, _, cu_k, max_k = unpad_input(k, kv_mask)
    v_packed, _, _, _ = unpad_input(v, kv_mask)
    out = fn(
        q_packed, k_packed, v_packed,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        dropout_p=dropout_p, softmax_scale=scale, causal=False,
    )
    return pad_input(out.to(in_dtype), q_idx, batch, q_len)


def packed_varlen_attention(q, k, v, q_seq: PackedSequences, kv_seq: PackedSequences, dropout_p: float,
                            scale: float, varlen_func):
    """A varlen kernel on packed tokens: q (Tq, h, d), k / v (Tk, h, d) -> (Tq, h, d). No unpadding, no host sync."""
    in_dtype = q.dtype
    q, k, v = _low_precision(q, k, v)
    out = varlen_func(q, k, v, cu_seqlens_q=q_seq.cu_seqlens, cu_seqlens_k=kv_seq.cu_seqlens,
                      max_seqlen_q=q_seq.max_seqlen, max_seqlen_k=kv_seq.max_seqlen, dropout_p=dropout_p,
                      softmax_scale=scale, causal=False)
    return out.to(in_dtype)


def packed_padded_view_attention(q, k, v, q_seq: PackedSequences, kv_seq: PackedSequences, dropout_p: float,
                                 scale: float, eager: bool):
    """eager / sdpa on packed tokens through a per-sequence padded view: q (Tq, h, d), k / v (Tk, h, d) ->
    (out (Tq, h, d), weights (S, h, Mq, Mk) float32 or None)."""
    n_seq = q_seq.num_sequences
    qp, kp, vp = q[q_seq.gather], k[kv_seq.gather], v[kv_seq.gather]  # (S, M, h, d)
    if eager:
        out, weights = eager_attention(qp, kp, vp, kv_seq.valid, dropout_p, scale)
    else:
        out, weights = sdpa_attention(qp, kp, vp, kv_seq.valid, dropout_p, scale), None
    flat = out.reshape(n_seq * q_seq.max_seqlen, *out.shape[2:])
    return flat[q_seq.scatter], weights


class GRNFormerAttention(nn.Module):
    """Multi-head attention (self or cross) with separate q/k/v/o projections, dispatched by implementation.

    Args:
        hidden_size: query (and output) width H.
        num_heads: heads; H % num_heads == 0.
        dropout: attention-probability dropout (training only).
        attn_implementation: a resolved name from `resolve_attn_implementation`.
        kv_size: key/value input width (default H).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attn_implementation: str,
                 kv_size: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = dropout
        self.attn_implementation = attn_implementation
        kv_size = kv_size or hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_size, hidden_size)
        self.v_proj = nn.Linear(kv_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        kv_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        packed: PackedSequences | None = None,
        kv_packed: PackedSequences | None = None,
    ):
        """
        Args:
            hidden_states: (B, Lq, H) queries (and keys/values for self-attention); packed: (1, Tq, H).
            attention_mask: (B, Lq) bool, True = real query token (padded layout only).
            key_value_states: (B, Lk, Hkv) for cross-attention; None = self-attention. Packed: (1, Tk, Hkv).
            kv_attention_mask: (B, Lk) bool for the keys; None = `attention_mask` (self-attention).
            output_attentions: also return the weights ((B, heads, Lq, Lk) float32; packed: (S, heads, Mq, Mk) per
                sequence), computed with the eager kernel whatever the configured implementation (same math).
            packed / kv_packed: the `PackedSequences` of the queries / keys of a packed batch (kv_packed defaults to
                packed).
        Returns:
            (B, Lq, H) output (packed: (1, Tq, H)), and the weights or None.
        """
        is_cross = key_value_states is not None
        kv_in = key_value_states if is_cross else hidden_states
        batch, q_len, _ = hidden_states.shape
        k_len = kv_in.shape[1]
        q = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim)
        k = self.k_proj(kv_in).view(batch, k_len, self.num_heads, self.head_dim)
        v = self.v_proj(kv_in).view(batch, k_len, self.num_heads, self.head_dim)
        p = self.dropout if self.training else 0.0
        impl = self.attn_implementation

        weights = None
        if packed is not None:
            kv_packed = kv_packed or packed
            q, k, v = q[0], k[0], v[0]
            if output_attentions or impl in ("eager", "sdpa"):
                out, weights = packed_padded_view_attention(q, k, v, packed, kv_packed, p, self.scale,
                                                            eager=output_attentions or impl == "eager")
            else:
                out = packed_varlen_attention(q, k, v, packed, kv_packed, p, self.scale, _varlen_func(impl))
            out = out[None]
        else:
            kv_mask = kv_attention_mask if is_cross else attention_mask
            if output_attentions or impl == "eager":
                out, weights = eager_attention(q, k, v, kv_mask, p, self.scale)
            elif impl == "sdpa" or (attention_mask is None and kv_mask is None):
                # no padding at all (e.g. scFoundation's all-gene decoder): SDPA picks its flash kernel on GPU
                out = sdpa_attention(q, k, v, kv_mask, p, self.scale)
            else:
                out = flash_attention(q, k, v, attention_mask, kv_mask, p, self.scale, _varlen_func(impl))
        out = self.o_proj(out.reshape(batch, q_len, -1))
        return out, (weights if output_attentions else None)
