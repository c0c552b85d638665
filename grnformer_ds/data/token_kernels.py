"""numba kernels of the collators: the per-cell random partition (masked / dropped / kept, `masking.py` explains the
draw scheme; `masking.partition_numpy` is its reference) and the filling of the token arrays in one pass per cell,
for both layouts (padded (B, L) viewed flat, or packed back to back): every slot is written once, so the outputs are
allocated with ``np.empty``; the collator tests compare the results with per-cell numpy expectations.
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
               starts, caps, input_ids, values, labels, slot_genes):
    """scGPT cells into flat token arrays: cell b owns slots ``[starts[b], starts[b] + caps[b])``: ``<cls>``
    (value 0), then its kept and masked genes in column order (masked: value mask_value, label = bin), then padding
    up to its capacity (none in the packed layout, where ``caps`` are the cells' lengths; the padded layout is
    ``starts = b * L``, ``caps = L``). indptr (B+1,); cols (nnz,) int32; bins (nnz,) int64; state (nnz,) uint8;
    outputs (T,): input_ids int64, values float32, labels float32, slot_genes int64."""
    for b in range(indptr.shape[0] - 1):
        p = starts[b]
        input_ids[p] = cls_id
        values[p] = 0.0
        labels[p] = ignore
        slot_genes[p] = -1
        t = p + 1
        for e in range(indptr[b], indptr[b + 1]):
            s = state[e]
            if s == _DROPPED:
                continue
            c = cols[e]
            input_ids[t] = gene_token_ids[c]
            slot_genes[t] = c
            if s == _MASKED:
                values[t] = mask_value
                labels[t] = np.float32(bins[e])
            else:
                values[t] = np.float32(bins[e])
                labels[t] = ignore
            t += 1
        for k in range(t, p + caps[b]):
            input_ids[k] = pad_id
            values[k] = pad_value
            labels[k] = ignore
            slot_genes[k] = -1


@numba.njit(cache=True, nogil=True)
def fill_scfoundation(indptr, cols, vals, state, gene_token_ids, pad_id, mask_value, pad_value, ignore, lead,
                      decoder, labels, starts, caps, input_ids, values, slot_genes):
    """scFoundation cells. Decoder (B, G) float32 (zeros on entry): every gene's value, mask_value at masked genes;
    labels (B, G) float32 (ignore on entry): value at masked genes. Encoder, flat (T,): cell b owns slots
    ``[starts[b], starts[b] + caps[b])``: ``lead`` reserved slots (the T and S total-count tokens of the packed
    layout, which the model fills; written as padding here), the KEPT genes in column order (input_ids int64,
    values float32, slot_genes int64), then padding up to the capacity."""
    for b in range(indptr.shape[0] - 1):
        p = starts[b]
        for k in range(p, p + lead):
            input_ids[k] = pad_id
            values[k] = pad_value
            slot_genes[k] = -1
        t = p + lead
        for e in range(indptr[b], indptr[b + 1]):
            c = cols[e]
            s = state[e]
            if s == _MASKED:
                decoder[b, c] = mask_value
                labels[b, c] = vals[e]
                continue
            decoder[b, c] = vals[e]
            if s == _KEPT:
                input_ids[t] = gene_token_ids[c]
                values[t] = vals[e]
                slot_genes[t] = c
                t += 1
        for k in range(t, p + caps[b]):
            input_ids[k] = pad_id
            values[k] = pad_value
            slot_genes[k] = -1


@numba.njit(cache=True, nogil=True)
def mask_patches(starts, kept, rank, patch_size, n_mask, u, patch_first, mask_value, values, labels):
    """scPaLM's patch masking in place: cell b's genes sit at ``starts[b] + 1 + g`` (g < kept[b]); gene g belongs to
    patch ``rank[first_b + g] // patch_size`` (rank: its position in the cell's token-id order; an empty ``rank``
    means the genes already arrive in that order: rank = g); the cell's n_mask[b] patches with the smallest
    ``u[patch_first[b]:patch_first[b+1]]`` get every value hidden (label = value)."""
    given = rank.shape[0] > 0
    g0 = 0
    for b in range(kept.shape[0]):
        p0, p1 = patch_first[b], patch_first[b + 1]
        if n_mask[b] > 0:
            chosen = np.zeros(p1 - p0, dtype=np.bool_)
            order = np.argsort(u[p0:p1])
            for j in range(n_mask[b]):
                chosen[order[j]] = True
            base = starts[b] + 1
            for g in range(kept[b]):
                r = rank[g0 + g] if given else g
                if chosen[r // patch_size]:
                    t = base + g
                    labels[t] = values[t]
                    values[t] = mask_value
        g0 += kept[b]
