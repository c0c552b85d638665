"""Sequence packing: whole cells back to back in micro-batches of at most ``max_tokens`` tokens (the THD layout).

Which cells share a micro-batch (`PackedEpochPlan`), for one (seed, epoch) and rank:

1. the epoch order of the split's cells is the block shuffle of `sampler.CellOrder` (the same order the fixed-size
   batches use, so reads keep their block locality);
2. rank ``r`` takes the positions ``[r * C, (r + 1) * C)`` of that order, ``C = n // W`` cells (``drop_last``) or
   ``ceil(n / W)`` (positions past the end wrap around, as for fixed batches);
3. the section is cut into chunks of ``chunk_cells`` consecutive positions (default: one shuffle buffer), and each
   chunk is packed on its own by bounded first-fit (`first_fit`): a cell goes into the first of the last
   ``max_open`` micro-batches with room for it, else opens a new one. Cells therefore stay near their place in the
   order, a micro-batch draws from one or two buffers, and the gaps a long cell leaves are filled by the shorter
   cells that follow. Micro-batches are numbered chunk by chunk in opening order; a micro-batch lists its cells in
   epoch order. With ``drop_last`` a chunk's last micro-batch is dropped when it is less than half full (`kept_bins`:
   the padded layout's drop_last drops an incomplete last batch the same way);
4. **equal micro-batch counts per rank**: every rank packs every rank's section (a numba pass over the epoch's token
   counts, O(cells), no data read) and takes ``S = min`` over ranks of the counts with ``drop_last`` (a rank with
   more micro-batches drops its last ones: their cells sit out this epoch, other cells in the next, since the order
   is reshuffled) or ``S = max`` without (a rank with fewer repeats its first micro-batches). ``S`` can differ by a
   few micro-batches from one epoch to the next: the lengths in each section change with the shuffle;
5. the rank's micro-batch ``s`` is micro-batch ``s // lanes`` of run ``s % lanes`` of its section
   (`sampler.lane_starts`), and its random draws (masking, subsetting, edge perturbation) come from
   ``batch_rng(seed, epoch, s * W + r)``, exactly as for fixed-size batches: resuming from (epoch, micro-batches
   consumed) is exact with any number of DataLoader workers.

A cell's token count is known before it is read: the collators' ``cell_tokens(nnz)`` (an upper bound when counts are
down-sampled at random) of the number of stored genes of the cell, from the shards' ``X/indptr``. First-fit packing
of cells of ~1,000-1,200 tokens into budgets of 16-20k tokens leaves ~0.3-1 % of the budget empty (BENCHMARKS.md).
"""
from __future__ import annotations

import copy

import numba
import numpy as np

from .sampler import CellOrder, lane_starts


@numba.njit(cache=True, nogil=True)
def first_fit(lengths, budget, max_open):
    """Bounded first-fit of ``lengths`` (n,) int (each <= budget) into bins of ``budget`` tokens.

    A cell goes into the first (oldest) of the at most ``max_open`` most recently opened bins that has room, else a
    new bin is opened (closing the oldest open bin when ``max_open`` are open). Returns (bin of each cell (n,)
    int64, bins opened in order of opening, number of bins)."""
    n = lengths.shape[0]
    bin_of = np.empty(n, np.int64)
    room = np.empty(max_open, np.int64)
    ids = np.empty(max_open, np.int64)
    n_open = 0
    n_bins = 0
    for i in range(n):
        need = lengths[i]
        k = 0
        while k < n_open and room[k] < need:
            k += 1
        if k == n_open:
            if n_open == max_open:  # close the oldest open bin
                for j in range(1, n_open):
                    room[j - 1] = room[j]
                    ids[j - 1] = ids[j]
                n_open -= 1
            room[n_open] = budget
            ids[n_open] = n_bins
            n_bins += 1
            k = n_open
            n_open += 1
        room[k] -= need
        bin_of[i] = ids[k]
    return bin_of, n_bins


@numba.njit(cache=True, nogil=True)
def kept_bins(lengths, bin_of, n_bins, budget, drop_last):
    """Bins of one chunk that make micro-batches: all, or with ``drop_last`` all but a last bin filled to less than
    half the budget (the chunk's tail: its cells sit out this epoch, as drop_last drops an incomplete last batch)."""
    if not drop_last or n_bins == 0:
        return n_bins
    fill = 0
    for i in range(lengths.shape[0]):
        if bin_of[i] == n_bins - 1:
            fill += lengths[i]
    return n_bins - 1 if 2 * fill < budget else n_bins


@numba.njit(cache=True, nogil=True)
def bins_per_chunk(lengths, chunk, budget, max_open, drop_last):
    """`first_fit` of each run of ``chunk`` consecutive lengths on its own (`kept_bins` of each). Returns
    (n_chunks + 1,) int64 cumulative micro-batch counts (chunk c makes micro-batches ``[out[c], out[c + 1])`` of
    the section)."""
    n = lengths.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    out = np.zeros(n_chunks + 1, np.int64)
    for c in range(n_chunks):
        part = lengths[c * chunk:min((c + 1) * chunk, n)]
        bin_of, nb = first_fit(part, budget, max_open)
        out[c + 1] = out[c] + kept_bins(part, bin_of, nb, budget, drop_last)
    return out


class PackedEpochPlan(CellOrder):
    """Token-budget micro-batches of one epoch for one rank (module docstring).

    Args:
        lo, hi: the split's cells. tokens: (hi - lo,) int, token count of each cell (index ``cell - lo``).
        max_tokens: the budget (>= every count). chunk_cells: cells packed together (default block_size x
            buffer_blocks). max_open: open micro-batches first-fit considers (8).
        Others as `sampler.EpochPlan`.
    """

    def __init__(self, lo: int, hi: int, *, tokens: np.ndarray, max_tokens: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, block_size: int = 256, buffer_blocks: int = 8,
                 shuffle: bool = True, drop_last: bool = True, lanes: int = 4, chunk_cells: int | None = None,
                 max_open: int = 8):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if lanes < 1 or max_open < 1:
            raise ValueError("lanes and max_open must be >= 1")
        super().__init__(lo, hi, seed=seed, epoch=epoch, block_size=block_size, buffer_blocks=buffer_blocks,
                         shuffle=shuffle)
        self.tokens = np.asarray(tokens)
        if len(self.tokens) != self.n:
            raise ValueError(f"tokens has {len(self.tokens)} entries for {self.n} cells")
        self.max_tokens, self.max_open = int(max_tokens), int(max_open)
        if self.n and int(self.tokens.max()) > self.max_tokens:
            raise ValueError(f"a cell has {int(self.tokens.max())} tokens, more than max_tokens={self.max_tokens}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.chunk = int(chunk_cells or self.block_size * self.buffer_blocks)
        self.drop_last = bool(drop_last)
        self.section = self.n // self.world_size if drop_last else -(-self.n // self.world_size)
        counts = [self._chunk_bins(r) for r in range(self.world_size)]
        totals = [int(c[-1]) for c in counts]
        self.rank_steps = totals  # micro-batches each rank's section packs into, before equalising
        self.n_steps = (min(totals) if drop_last else max(totals)) if self.section else 0
        self._rank_chunk_ptr = counts
        self._chunk_ptr = counts[self.rank]
        self.lanes, self._lane_start = lane_starts(self.n_steps, lanes)
        self._cache_size = 2 * self.lanes + 2
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> (cells, bin_of), a few recent

    def _positions(self, rank: int, c: int) -> np.ndarray:
        a = rank * self.section + c * self.chunk
        return np.arange(a, rank * self.section + min((c + 1) * self.chunk, self.section), dtype=np.int64)

    def _chunk_bins(self, rank: int) -> np.ndarray:
        cells = self.cells_at(np.arange(rank * self.section, (rank + 1) * self.section, dtype=np.int64))
        lengths = np.ascontiguousarray(self.tokens[cells - self.lo], dtype=np.int64)
        return bins_per_chunk(lengths, self.chunk, self.max_tokens, self.max_open, self.drop_last)

    def section_batch(self, step: int) -> int:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} not in [0, {self.n_steps})")
        q = int(self._lane_start[step % self.lanes]) + step // self.lanes
        return q % int(self._chunk_ptr[-1])  # a rank with fewer micro-batches repeats its first ones

    def step_cells(self, step: int) -> np.ndarray:
        """(B,) global cells of this rank's micro-batch ``step``, in epoch order (B varies)."""
        q = self.section_batch(step)
        c = int(np.searchsorted(self._chunk_ptr, q, side="right")) - 1
        if c not in self._packed:
            cells = self.cells_at(self._positions(self.rank, c))
            bin_of, _ = first_fit(np.ascontiguousarray(self.tokens[cells - self.lo], dtype=np.int64),
                                  self.max_tokens, self.max_open)
            if len(self._packed) > 2 * self.lanes + 2:
                self._packed.pop(next(iter(self._packed)))
            self._packed[c] = (cells, bin_of)
        cells, bin_of = self._packed[c]
        return cells[bin_of == q - int(self._chunk_ptr[c])]

    def global_batch(self, step: int) -> int:
        return step * self.world_size + self.rank

    def for_rank(self, rank: int) -> "PackedEpochPlan":
        """The same epoch's plan seen from another rank (no repacking: every rank's counts are known)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={self.world_size})")
        other = copy.copy(self)
        other.rank, other._chunk_ptr = int(rank), self._rank_chunk_ptr[rank]
        other._cache, other._packed = {}, {}
        return other


def padding_fraction(plan: PackedEpochPlan) -> float:
    """Fraction of the token budget of this rank's micro-batches that holds no cell (computed from the plan, no data
    read)."""
    used = sum(int(plan.tokens[plan.step_cells(s) - plan.lo].sum()) for s in range(plan.n_steps))
    return 1.0 - used / max(plan.n_steps * plan.max_tokens, 1)


def segment_offsets(cell_tokens: np.ndarray, pad_to: int | None, max_segment: int) -> np.ndarray:
    """Offsets (S+1,) int64 of a packed row: the cells back to back, then, when ``pad_to`` is given, dummy segments
    of at most ``max_segment`` tokens up to exactly ``pad_to`` tokens (static shapes for compilation).

    The padding is split so that no segment is longer than the longest possible cell: attention costs O(length^2)
    per segment, and a dummy segment never raises ``max_length`` above the longest possible cell."""
    cu = np.zeros(len(cell_tokens) + 1, np.int64)
    np.cumsum(cell_tokens, out=cu[1:])
    total = int(cu[-1])
    if pad_to is None or total == pad_to:
        return cu
    if total > pad_to:
        raise ValueError(f"packed cells hold {total} tokens, more than the budget {pad_to}")
    n_dummy = -(-(pad_to - total) // max_segment)
    tail = np.minimum(total + max_segment * np.arange(1, n_dummy + 1, dtype=np.int64), pad_to)
    return np.concatenate([cu, tail])


def packed_keys(segments: np.ndarray) -> dict:
    """The varlen keys of a packed batch (transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
    names): ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (S+1,) int32 and ``max_length_q`` / ``max_length_k``, the longest
    segment (an int; compiled blocks take it as a dynamic size, training/compile.py)."""
    import torch

    cu = torch.from_numpy(segments.astype(np.int32))
    longest = int(np.diff(segments).max(initial=0))
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest}


def pack_padded_batch(batch: dict, lead: int = 0, pad_id: int = 0, pad_value: float = 0.0) -> dict:
    """The packed (THD) form of a padded (B, L) batch: the same cells, tokens, labels and graphs, back to back.

    The reference the packed layout is tested against (and a converter for users with padded batches). Each cell's
    real tokens (``attention_mask``; a prefix of its row) go to ``[cu[b] + lead, cu[b + 1])``; ``lead`` reserved slots
    open each segment (2 for scFoundation's T and S tokens, written as ``pad_id`` / ``pad_value``; 0 for scGPT, whose
    ``<cls>`` is already in the row). Token-level (B, L) keys become (1, T); per-cell and (B, G) keys are kept;
    graph node ``b * L + l`` becomes packed position ``cu[b] + lead + l``; ``batch`` / ``ptr`` follow the segments.
    """
    import torch

    mask = batch["attention_mask"].bool()
    n_cells, seq_len = mask.shape
    lengths = mask.sum(1).to(torch.int64) + lead
    cu = torch.zeros(n_cells + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    total = int(cu[-1])
    # packed position of every padded slot (real tokens only are used)
    new_pos = (cu[:-1, None] + lead + torch.arange(seq_len)[None, :]).reshape(-1)
    token_pos = new_pos[mask.reshape(-1)]
    out = {}
    for key, value in batch.items():
        if key in ("attention_mask", "batch", "ptr"):
            continue
        if key in ("input_ids", "values", "labels") and value.shape == mask.shape:
            fill = {"input_ids": pad_id, "values": pad_value, "labels": -100.0}[key]
            row = torch.full((total,), fill, dtype=value.dtype)
            row[token_pos] = value[mask]
            out[key] = row[None]
        elif key.endswith("_edge_index"):
            out[key] = new_pos[value]
        else:
            out[key] = value
    out.update(cu_seq_lens_q=cu.to(torch.int32), cu_seq_lens_k=cu.to(torch.int32).clone(),
               max_length_q=int(lengths.max()) if n_cells else 0, max_length_k=int(lengths.max()) if n_cells else 0)
    if "ptr" in batch:
        out["batch"] = torch.repeat_interleave(torch.arange(n_cells), lengths, output_size=total)
        out["ptr"] = cu.clone()
    return out
