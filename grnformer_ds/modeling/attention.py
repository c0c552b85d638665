"""The one attention dispatch point of GRNFormer, used by self-attention and by the fusion cross-attention.

Implementations (`config._attn_implementation`, transformers' own field, resolved once at model build):
- `eager`: explicit softmax(QK^T/sqrt(d))V in float32 softmax; the reference, and the only one that returns weights.
- `sdpa` (default): `torch.nn.functional.scaled_dot_product_attention` with a boolean key-padding mask.
- `flash_attention_2`: flash-attn's varlen kernel on unpadded tokens (`flash_attn_varlen_func` with cu_seqlens), so
  padding costs no FLOPs. Needs the `flash-attn` package and a CUDA GPU (`pip install grnformer_ds[flash]`).

Masks are (B, L) booleans, True = real token (HF convention). Only keys are masked for eager/sdpa: padded query rows
produce finite values that nothing downstream reads. The flash path returns zeros at padded query rows.
"""
from __future__ import annotations

import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
FLASH_INSTALL_HINT = "pip install 'grnformer_ds[flash]'"


def resolve_attn_implementation(requested: str | None) -> str:
    """Validate the requested implementation and return the one to use (None -> "sdpa").

    flash_attention_2 is refused with an ImportError naming the pip extra when flash-attn is not installed or no CUDA
    device is visible; there is no silent fallback, so a run never trains with another kernel than it asked for.
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
    return impl


# --------------------------------------------------------------------------------------------------------------
# unpad / pad helpers for the varlen flash kernel (pure torch so that they are testable on CPU; flash_attn's own
# bert_padding helpers need the CUDA extension to import)
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
# the three kernels; q/k/v are (B, L, heads, head_dim)
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


_FLASH_DTYPE_WARNED = False


def _flash_varlen_func():
    # imported lazily: the module must import on machines without flash-attn
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_attention(q, k, v, q_mask, kv_mask, dropout_p: float, scale: float, varlen_func=None):
    """flash-attn varlen attention on unpadded tokens; zeros at padded query rows.

    fp32 inputs are cast to bf16 for the kernel (flash-attn has no fp32 path) and the output cast back, with a
    one-time warning, as transformers does. `varlen_func` lets tests substitute a reference kernel.
    """
    global _FLASH_DTYPE_WARNED
    fn = varlen_func or _flash_varlen_func()
    batch, q_len = q.shape[:2]
    k_len = k.shape[1]
    if q_mask is None:
        q_mask = torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
    if kv_mask is None:
        kv_mask = torch.ones(batch, k_len, dtype=torch.bool, device=k.device)
    in_dtype = q.dtype
    # (only CUDA tensors reach the real kernel; the test reference kernels run on CPU in float32)
    if in_dtype not in (torch.float16, torch.bfloat16) and q.is_cuda:
        if not _FLASH_DTYPE_WARNED:
            warnings.warn("flash_attention_2 got float32 inputs; casting q/k/v to bfloat16 for the kernel")
            _FLASH_DTYPE_WARNED = True
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    q_packed, q_idx, cu_q, max_q = unpad_input(q, q_mask)
    k_packed, _, cu_k, max_k = unpad_input(k, kv_mask)
    v_packed, _, _, _ = unpad_input(v, kv_mask)
    out = fn(
        q_packed, k_packed, v_packed,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        dropout_p=dropout_p, softmax_scale=scale, causal=False,
    )
    return pad_input(out.to(in_dtype), q_idx, batch, q_len)


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
    ):
        """
        Args:
            hidden_states: (B, Lq, H) queries (and keys/values for self-attention).
            attention_mask: (B, Lq) bool, True = real query token.
            key_value_states: (B, Lk, Hkv) for cross-attention; None = self-attention.
            kv_attention_mask: (B, Lk) bool for the keys; None = `attention_mask` (self-attention).
            output_attentions: also return the (B, heads, Lq, Lk) float32 weights; computed with the eager kernel
                whatever the configured implementation (same math, only slower).
        Returns:
            (B, Lq, H) output, and the weights or None.
        """
        is_cross = key_value_states is not None
        kv_in = key_value_states if is_cross else hidden_states
        kv_mask = kv_attention_mask if is_cross else attention_mask
        batch, q_len, _ = hidden_states.shape
        k_len = kv_in.shape[1]
        q = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim)
        k = self.k_proj(kv_in).view(batch, k_len, self.num_heads, self.head_dim)
        v = self.v_proj(kv_in).view(batch, k_len, self.num_heads, self.head_dim)
        p = self.dropout if self.training else 0.0

        weights = None
        if output_attentions or self.attn_implementation == "eager":
            out, weights = eager_attention(q, k, v, kv_mask, p, self.scale)
        elif self.attn_implementation == "sdpa":
            out = sdpa_attention(q, k, v, kv_mask, p, self.scale)
        else:
            out = flash_attention(q, k, v, attention_mask, kv_mask, p, self.scale)
        out = self.o_proj(out.reshape(batch, q_len, -1))
        return out, (weights if output_attentions else None)
