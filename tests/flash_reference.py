"""A pure-torch stand-in for flash-attn's `flash_attn_varlen_func`, for testing the flash path on CPU.

Same signature as the positional call the model makes; computes plain softmax attention per packed sequence
(q/k/v: (total_tokens, heads, head_dim), cu_seqlens: (n_seqs + 1,) int32 offsets)."""
import torch


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                     causal):
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)
        outs.append(((qs @ ks.transpose(-1, -2) * softmax_scale).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)
