"""numba kernels of the collators: the per-cell random partition (masked / dropped / kept, `masking.py` explains the
draw scheme; `masking.partition_numpy` is its reference) and the filling of the padded (B, L) batch arrays in one pass
per cell (every slot written once, so the outputs are allocated with ``np.empty``; the collator tests compare the
results with per-cell numpy expectations).
"""
from __future__ import annotations

import numba
import numpy as np

_KEPT, _MASKED, _DROPPED = 0, 1, 2  # same values as masking.KEPT / MASKED / DROPPED


@numba.njit(cache=True, nogil=True)
def partition_cells(indptr, n_mask, draw_ptr, uniforms, state):
    """state[e] for every gene of every cell; cell b uses uniforms[draw_ptr[b]:draw_ptr[b+1]] (n_mask[b] for the
    masked front slots, then one per dropped back slot). indptr (B+1,), n_mask (B,), draw_ptr (B+1,) int64;
    uniforms float64; state (nnz,) uint8 (written)."""
    longest = 0
    for b in range(indptr.shape[0] - 1):
        longest = max(longest, indptr[b + 1] - indptr[b])
    perm = np.empty(longest, dtype=np.int64)
    for b in range(indptr.shape[0] - 1):
        lo = indptr[b]
        n = indptr[b + 1] - lo
        nm = n_mask[b]
        d = draw_ptr[b]
        n_drop = draw_ptr[b + 1] - d - nm
        for k in range(n):
            perm[k] = k
            state[lo + k] = _KEPT
        for i in range(nm):
            j = min(i + np.int64(uniforms[d] * (n - i)), n - 1)  # min: u * k can round up to k
            d += 1
            g = perm[j]
            perm[j] = perm[i]
            perm[i] = g
            state[lo + g] = _MASKED
        for t in range(n_drop):
            pos = n - 1 - t
            j = min(nm + np.int64(uniforms[d] * (pos - nm + 1)), pos)
            d += 1
            g = perm[j]
            perm[j] = perm[pos]
            perm[pos] = g
            state[lo + g] = _DROPPED


@numba.njit(cache=True, nogil=True)
def fill_scgpt(indptr, cols, bins, state, gene_token_ids, cls_id, pad_id, mask_value, pad_value, ignore,
               input_ids, values, labels, slot_genes, attention):
    """scGPT rows: slot 0 ``<cls>`` (value 0), then the kept and masked genes in column order (masked: value
    mask_value, label = bin), then padding. indptr (B+1,); cols (nnz,) int32; bins (nnz,) int64; state (nnz,) uint8;
    outputs (B, L): input_ids int64, values float32, labels float32, slot_genes int64, attention bool."""
    seq_len = input_ids.shape[1]
    for b in range(indptr.shape[0] - 1):
        input_ids[b, 0] = cls_id
        values[b, 0] = 0.0
        labels[b, 0] = ignore
        slot_genes[b, 0] = -1
        attention[b, 0] = True
        t = 1
        for e in range(indptr[b], indptr[b + 1]):
            s = state[e]
            if s == _DROPPED:
                continue
            c = cols[e]
            input_ids[b, t] = gene_token_ids[c]
            slot_genes[b, t] = c
            attention[b, t] = True
            if s == _MASKED:
                values[b, t] = mask_value
                labels[b, t] = np.float32(bins[e])
            else:
                values[b, t] = np.float32(bins[e])
                labels[b, t] = ignore
            t += 1
        for k in range(t, seq_len):
            input_ids[b, k] = pad_id
            values[b, k] = pad_value
            labels[b, k] = ignore
            slot_genes[b, k] = -1
            attention[b, k] = False


@numba.njit(cache=True, nogil=True)
def fill_scfoundation(indptr, cols, vals, state, gene_token_ids, pad_id, mask_value, pad_value, ignore,
                      decoder, labels, input_ids, values, slot_genes, attention):
    """scFoundation rows. Decoder (B, G) float32 (zeros on entry): every gene's value, mask_value at masked genes;
    labels (B, G) float32 (ignore on entry): value at masked genes. Encoder (B, L): the KEPT genes in column order
    (input_ids int64, values float32, slot_genes int64, attention bool), then padding."""
    seq_len = input_ids.shape[1]
    for b in range(indptr.shape[0] - 1):
        t = 0
        for e in range(indptr[b], indptr[b + 1]):
            c = cols[e]
            s = state[e]
            if s == _MASKED:
                decoder[b, c] = mask_value
                labels[b, c] = vals[e]
                continue
            decoder[b, c] = vals[e]
            if s == _KEPT:
                input_ids[b, t] = gene_token_ids[c]
                values[b, t] = vals[e]
                slot_genes[b, t] = c
                attention[b, t] = True
                t += 1
        for k in range(t, seq_len):
            input_ids[b, k] = pad_id
            values[b, k] = pad_value
            slot_genes[b, k] = -1
            attention[b, k] = False
