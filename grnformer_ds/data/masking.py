"""Masked-value modelling and sequence-length subsetting: which of a cell's genes are masked, kept or dropped.

Like ``scgpt.tokenizer.random_mask_value`` each cell gets exactly ``int(n_candidates * mask_ratio)`` masked slots drawn
without replacement, so the number of training targets per cell does not fluctuate (scGPT's Bernoulli ``DataCollator``
would). Unlike it, ``<cls>`` and padding are never candidates (scGPT's count-based version can mask ``<cls>``).

Draw scheme (`draw_partition`): every cell's n genes get one state, MASKED (``n_mask`` of them), DROPPED (``n_drop``,
genes left out because the cell is longer than the sequence) or KEPT (the rest), as a uniformly random ordered
partition of those sizes. It is a partial Fisher-Yates shuffle of the cell's positions: slots ``0 .. n_mask-1`` of
the permutation are filled first (masked), then slots ``n-1`` down to ``n-n_drop`` (dropped), each with a uniform
pick among the genes not placed yet, so each cell costs ``n_mask + n_drop`` uniforms, all from ONE
``rng.random(total)`` for the batch (cells in order). This has the same joint law as "keep a uniform subset, then
mask a uniform subset of the kept" (both are uniform over ordered partitions). A uniform u picks
``floor(u * k)`` among k: bias below k / 2**53, far below anything a batch can show.
"""
from __future__ import annotations

import numpy as np

from .cell_random import draw_uniforms
from .token_kernels import partition_cells

IGNORE_INDEX = -100.0  # labels at unmasked positions (PyTorch / HF ignore_index convention)
KEPT, MASKED, DROPPED = 0, 1, 2  # per-gene states of `draw_partition`


def draw_partition(indptr: np.ndarray, n_mask: np.ndarray, n_drop: np.ndarray, rng) -> np.ndarray:
    """Random per-gene states for a CSR batch (module docstring). indptr: (B+1,) int64 (first entry 0);
    n_mask, n_drop: (B,) int64 with ``n_mask + n_drop <= n`` per cell. Returns (nnz,) uint8 KEPT / MASKED / DROPPED.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    n_draws = np.asarray(n_mask, dtype=np.int64) + np.asarray(n_drop, dtype=np.int64)
    # the kernel indexes without bounds checks
    if indptr[0] != 0 or not ((n_draws <= np.diff(indptr)).all() and (np.asarray(n_mask) >= 0).all()
                              and (np.asarray(n_drop) >= 0).all()):
        raise ValueError("draw_partition: need indptr[0] == 0 and 0 <= n_mask, n_drop with n_mask + n_drop <= n")
    draw_ptr = np.zeros(len(n_draws) + 1, dtype=np.int64)
    np.cumsum(n_draws, out=draw_ptr[1:])
    uniforms = draw_uniforms(rng, n_draws)  # one batch-wide draw, or each cell's own (`cell_random`)
    state = np.empty(int(indptr[-1]), dtype=np.uint8)
    partition_cells(indptr, np.ascontiguousarray(n_mask, dtype=np.int64), draw_ptr, uniforms, state)
    return state


def partition_numpy(n: int, n_mask: int, n_drop: int, uniforms: np.ndarray) -> np.ndarray:
    """Plain-numpy reference of one cell of `draw_partition` given its ``n_mask + n_drop`` uniforms. Returns (n,)
    uint8 states."""
    perm = np.arange(n)
    state = np.full(n, KEPT, dtype=np.uint8)
    for i in range(n_mask):  # front slots: masked
        j = min(i + int(uniforms[i] * (n - i)), n - 1)
        perm[[i, j]] = perm[[j, i]]
        state[perm[i]] = MASKED
    for t in range(n_drop):  # back slots: dropped, picked among the unplaced positions n_mask .. pos
        pos = n - 1 - t
        j = min(n_mask + int(uniforms[n_mask + t] * (pos - n_mask + 1)), pos)
        perm[[pos, j]] = perm[[j, pos]]
        state[perm[pos]] = DROPPED
    return state

