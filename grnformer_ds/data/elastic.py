"""The rest of an epoch on a different number of ranks (elastic resume): no cell of the epoch repeated or skipped.

A checkpoint holds the data position as (epoch, micro-batches each rank consumed, the number of ranks that consumed
them). On the same number of ranks the epoch's plan (`sampler.EpochPlan` / `packing.PackedEpochPlan`) continues where
it stopped, exactly. On another number it cannot: each rank's batches come from its own section of the epoch order,
so the consumed cells are not a prefix of that order. `RemainderPlan` takes over for the rest of that epoch:

1. the cells still to come are those of every old rank's batches from the consumed position on (`unconsumed_cells`:
   rank by rank, each rank's batches in section order, so cells read together stay together). With what was already
   consumed they make exactly the uninterrupted epoch's cells (its dropped tail stays dropped, its padding repeats
   stay);
2. they are cut into ``W`` contiguous, near-equal sections, one per new rank;
3. each section is cut into the same number of batches ``S`` on every rank (ZeRO needs the same number of forwards):
   fixed-size batches: ``S = ceil(largest section / B)`` and each section is split into ``S`` near-equal batches of
   at most ``B`` cells; packed: each section is first-fit packed (`packing.first_fit`), ``S`` is the most
   micro-batches of any rank, and a rank with fewer splits its fullest ones in two until it has ``S``. Only when a
   rank has fewer cells than ``S`` (fewer cells left than ranks, or ``B = 1``) does it repeat its first batches;
4. batch ``s`` of rank ``r`` is batch ``s // lanes`` of run ``s % lanes`` of its section (`sampler.lane_starts`, so
   DataLoader workers keep to their own blocks), and its random draws come from
   ``batch_rng(seed, epoch, g0 + s * W + r)``, where ``g0`` counts the global batches the epoch already used: no
   batch shares its generator with another of the epoch.

A resume on yet another number of ranks within the same epoch applies the same to the remainder (a chain of
segments: the data position lists ``(world size, micro-batches, batch size, max tokens)`` of each earlier segment).
A resume with another micro-batch (``batch_size`` / ``max_tokens``, or a switch between the padded and packed
layouts), on the same number of ranks or not, is the same: the unconsumed cells are batched in the new layout. The
next epoch is the ordinary plan of the new number of ranks and layout.
"""
from __future__ import annotations

import copy

import numpy as np

from .packing import first_fit
from .sampler import lane_starts


def unconsumed_cells(plan, consumed: int) -> np.ndarray:
    """(R,) int64 cells of the epoch's batches at steps >= ``consumed`` on every rank of ``plan`` (any plan with
    ``world_size``, ``n_steps``, ``for_rank``, ``section_batch`` and ``step_cells``): rank by rank, each rank's
    batches in section order."""
    parts = []
    for r in range(plan.world_size):
        p = plan.for_rank(r)
        for step in sorted(range(min(consumed, p.n_steps), p.n_steps), key=p.section_batch):
            parts.append(p.step_cells(step))
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _split_fullest(batches: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Split the batch with the most cells in two (in place of it, order kept) until there are ``n`` batches or none
    has two cells left."""
    batches = list(batches)
    while len(batches) < n:
        i = int(np.argmax([len(b) for b in batches])) if batches else -1
        if i < 0 or len(batches[i]) < 2:
            break
        half = len(batches[i]) // 2
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def _repeat_to(batches: list[np.ndarray], n: int, fallback: np.ndarray) -> list[np.ndarray]:
    """Exactly ``n`` non-empty batches: empty ones dropped, then the first ones repeated (``fallback``'s first cell
    for a rank with no cell at all)."""
    batches = [b for b in batches if len(b)] or [fallback[:1]]
    while len(batches) < n:
        batches.extend(batches[:n - len(batches)])
    return batches


class RemainderPlan:
    """The batches of the rest of an epoch on ``world_size`` ranks (module docstring).

    Args:
        cells: (R,) int cells still to come in this epoch (`unconsumed_cells` of the previous segment's plan).
        rank, world_size: this rank and the new number of ranks. epoch: the epoch. first_global_batch: global
            batches the epoch already used (``sum of micro-batches x world size`` of the earlier segments).
        lo, block_size: the split's first cell and the read unit (`sampler.CellOrder.block_of`).
        batch_size: cells per batch (fixed-size layout), or tokens + max_tokens (+ max_open): packed micro-batches,
            ``tokens[cell - lo]`` being a cell's token count. lanes: as `sampler.EpochPlan`.
    """

    def __init__(self, cells: np.ndarray, *, rank: int, world_size: int, epoch: int, first_global_batch: int,
                 lo: int, block_size: int, batch_size: int | None = None, tokens: np.ndarray | None = None,
                 max_tokens: int | None = None, max_open: int = 8, lanes: int = 4):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give batch_size or max_tokens")
        self.cells = np.asarray(cells, dtype=np.int64)
        self.rank, self.world_size, self.epoch = int(rank), int(world_size), int(epoch)
        self.first_global_batch = int(first_global_batch)
        self.lo, self.block_size = int(lo), int(block_size)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        sections = np.array_split(self.cells, self.world_size)
        if batch_size is not None:
            longest = max(len(s) for s in sections)
            n_steps = -(-longest // int(batch_size))
            per_rank = [np.array_split(s, n_steps) for s in sections]
        else:
            tokens = np.asarray(tokens)
            per_rank = []
            for s in sections:
                if len(s) == 0:
                    per_rank.append([])
                    continue
                bin_of, n_bins = first_fit(np.ascontiguousarray(tokens[s - self.lo], dtype=np.int64),
                                           int(max_tokens), int(max_open))
                order = np.argsort(bin_of, kind="stable")  # cells of a micro-batch in epoch order
                per_rank.append(np.split(s[order], np.cumsum(np.bincount(bin_of, minlength=n_bins))[:-1]))
            n_steps = max(len(b) for b in per_rank)
            per_rank = [_split_fullest(b, n_steps) for b in per_rank]
        self.n_steps = n_steps if len(self.cells) else 0
        self.rank_batches = [_repeat_to(b, self.n_steps, self.cells) for b in per_rank] if self.n_steps else \
            [[] for _ in range(self.world_size)]
        self.lanes, self._lane_start = lane_starts(self.n_steps, lanes)

    def block_of(self, cell: np.ndarray) -> np.ndarray:
        return (np.asarray(cell) - self.lo) // self.block_size

    def section_batch(self, step: int) -> int:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} not in [0, {self.n_steps})")
        return int(self._lane_start[step % self.lanes]) + step // self.lanes

    def step_cells(self, step: int) -> np.ndarray:
        """Cells of this rank's batch ``step``."""
        return self.rank_batches[self.rank][self.section_batch(step)]

    def global_batch(self, step: int) -> int:
        return self.first_global_batch + step * self.world_size + self.rank

    def for_rank(self, rank: int) -> "RemainderPlan":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={self.world_size})")
        other = copy.copy(self)
        other.rank = int(rank)
        return other


def tokens_digest(tokens: np.ndarray) -> str:
    """A digest of every cell's token count (N,), kept in the data position: packed batches are defined by these
    counts, so a resume whose counts differ (another max_seq_len) cannot rebuild the interrupted epoch."""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest()[:16]


def resumed_plan(base, segments: list[tuple[int, int]], *, rank: int, world_size: int,
                 layouts: list[dict] | None = None, **batching) -> RemainderPlan:
    """The plan of the rest of an epoch for ``rank`` of ``world_size``, after ``segments`` (world size, micro-batches
    consumed), oldest first, the first of which ran on ``base`` (the epoch's ordinary plan for ``segments[0][0]``
    ranks). ``batching``: RemainderPlan's lo, block_size, batch_size / tokens + max_tokens (+ max_open), lanes.
    ``layouts``: one per segment, the batch layout of the part that follows it (``batch_size=`` or ``tokens=`` +
    ``max_tokens=``; ``batching`` then holds only the rest) when the micro-batch changed between segments."""
    plan, first = base, 0
    if base.world_size != segments[0][0]:
        raise ValueError(f"the base plan has {base.world_size} ranks, the first segment {segments[0][0]}")
    if layouts is not None and len(layouts) != len(segments):
        raise ValueError(f"{len(layouts)} layouts for {len(segments)} segments")
    for i, (world, consumed) in enumerate(segments):
        if plan.world_size != world:
            raise ValueError(f"segment {i} ran on {world} ranks, its plan has {plan.world_size}")
        cells = unconsumed_cells(plan, consumed)
        first += int(consumed) * int(world)
        last = i == len(segments) - 1
        next_world = world_size if last else segments[i + 1][0]
        layout = batching if layouts is None else {**batching, **layouts[i]}
        plan = RemainderPlan(cells, rank=rank if last else 0, world_size=next_world, epoch=base.epoch,
                             first_global_batch=first, **layout)
    return plan
