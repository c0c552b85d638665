"""Which cells go into which batch: block shuffle, rank partition, equal batch counts, per-batch RNG.

For one (seed, epoch) the cells ``[lo, hi)`` of a split are ordered as follows (block shuffle, as in annbatch /
tiledbsoma-ml / scDataset):

1. cut into contiguous blocks of ``block_size`` cells (the read unit), and permute the blocks;
2. group consecutive permuted blocks into buffers of ``buffer_blocks`` blocks, and permute the cells inside each
   buffer;
3. rank ``r`` takes positions ``[r * S * B, (r + 1) * S * B)`` of this order (its section), where ``S`` is the number
   of batches per rank and ``B`` the batch size;
4. the section is cut into ``lanes`` contiguous runs of batches and the rank's batch ``s`` is batch ``s // lanes`` of
   run ``s % lanes``. DataLoader worker ``w`` of ``N`` builds batches ``w, w + N, ...``, so when ``N`` divides
   ``lanes`` each worker only ever touches its own runs: it reads each block of the section once instead of every
   worker reading every block (a batch draws its cells from nearly all blocks of its buffer). ``lanes`` is part of
   the data order, independent of ``N``, so resuming with another number of workers stays exact.

Equal batch counts per rank: ``drop_last=True`` gives ``S = n // (B * W)`` and drops the tail of the epoch order
(different cells each epoch when shuffling); ``drop_last=False`` gives ``S = ceil(n / (B * W))`` and fills the missing
positions with the first cells of the order again (like ``torch.utils.data.DistributedSampler``), so some cells appear
twice in that epoch.

Each batch also has a global index ``g = s * W + r`` and its RNG (masking, subsetting, edge perturbation) is seeded by
``(seed, epoch, g)`` only, so a batch is the same whichever worker builds it and whenever it is built — which is what
makes resuming from (epoch, batches consumed) exact.
"""
from __future__ import annotations

import copy

import numpy as np

_BLOCKS, _BUFFER, _BATCH = 0, 1, 2  # stream tags in the seed sequences


def batch_rng(seed: int, epoch: int, global_batch: int, stream: int = 0) -> np.random.Generator:
    """The generator of one batch (``stream`` separates independent uses, e.g. 0 = tokenization, 1 = graphs)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _BATCH, global_batch, stream])))


class CellOrder:
    """The block-shuffled order of the cells ``[lo, hi)`` for one (seed, epoch) (steps 1-2 of the module docstring).

    Position ``p`` of the epoch holds cell ``cells_at(p)``. Arrays are computed lazily per buffer (memory
    O(cells / block)). `EpochPlan` (fixed batch size) and `packing.PackedEpochPlan` (token budget) cut this order into
    batches."""

    def __init__(self, lo: int, hi: int, *, seed: int, epoch: int, block_size: int = 256, buffer_blocks: int = 8,
                 shuffle: bool = True):
        if block_size < 1 or buffer_blocks < 1:
            raise ValueError("block_size and buffer_blocks must be >= 1")
        self.lo, self.hi = int(lo), int(hi)
        self.n = self.hi - self.lo
        self.seed, self.epoch = int(seed), int(epoch)
        self.block_size, self.buffer_blocks, self.shuffle = int(block_size), int(buffer_blocks), bool(shuffle)
        n_blocks = -(-self.n // self.block_size)
        order = np.arange(n_blocks, dtype=np.int64)
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, _BLOCKS])))
            order = rng.permutation(n_blocks)
        self.block_order = order
        sizes = np.minimum(self.block_size, self.n - order * self.block_size)
        buf_sizes = np.add.reduceat(sizes, np.arange(0, n_blocks, self.buffer_blocks)) if n_blocks else sizes
        self.buffer_starts = np.concatenate([[0], np.cumsum(buf_sizes)]).astype(np.int64)
        self._cache: dict[int, np.ndarray] = {}  # a few recent buffers' cell orders (one per lane in use)
        self._cache_size = 10

    def block_of(self, cell: np.ndarray) -> np.ndarray:
        """Block id (block = ``[lo + k * block_size, ...)``) of global cells."""
        return (np.asarray(cell) - self.lo) // self.block_size

    def _buffer_cells(self, u: int) -> np.ndarray:
        if u in self._cache:
            return self._cache[u]
        blocks = self.block_order[u * self.buffer_blocks:(u + 1) * self.buffer_blocks]
        cells = np.concatenate([np.arange(b * self.block_size, min((b + 1) * self.block_size, self.n))
                                for b in blocks]).astype(np.int64) + self.lo
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, _BUFFER, u])))
            cells = cells[rng.permutation(len(cells))]
        if len(self._cache) > self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[u] = cells
        return cells

    def cells_at(self, positions: np.ndarray) -> np.ndarray:
        """Global cells at epoch-order positions (positions >= n wrap around: padding)."""
        positions = np.asarray(positions, dtype=np.int64) % max(self.n, 1)
        out = np.empty(len(positions), dtype=np.int64)
        bufs = np.searchsorted(self.buffer_starts, positions, side="right") - 1
        # group the positions by buffer once (a mask per buffer would cost positions x buffers: a whole 10M-cell
        # section on one rank has ~5k buffers)
        order = np.argsort(bufs, kind="stable")
        grouped = bufs[order]
        cuts = np.flatnonzero(np.diff(grouped)) + 1
        for idx in np.split(order, cuts) if len(order) else ():
            u = int(bufs[idx[0]])
            out[idx] = self._buffer_cells(u)[positions[idx] - self.buffer_starts[u]]
        return out


def lane_starts(n_steps: int, lanes: int) -> tuple[int, np.ndarray]:
    """(lanes actually used, first section batch of each run) for ``n_steps`` batches cut into ``lanes`` runs."""
    lanes = max(1, min(int(lanes), n_steps))
    base, extra = divmod(n_steps, lanes)
    counts = base + (np.arange(lanes) < extra)
    return lanes, np.cumsum(counts) - counts


class EpochPlan(CellOrder):
    """Fixed-size batches of one epoch for one rank (steps 3-4 of the module docstring)."""

    def __init__(self, lo: int, hi: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, block_size: int = 256, buffer_blocks: int = 8, shuffle: bool = True,
                 drop_last: bool = True, lanes: int = 4):
        if batch_size < 1 or lanes < 1:
            raise ValueError("batch_size and lanes must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        super().__init__(lo, hi, seed=seed, epoch=epoch, block_size=block_size, buffer_blocks=buffer_blocks,
                         shuffle=shuffle)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        per_step = self.batch_size * self.world_size
        self.n_steps = self.n // per_step if drop_last else -(-self.n // per_step)
        self.lanes, self._lane_start = lane_starts(self.n_steps, lanes)
        self._cache_size = 2 * self.lanes + 2

    def section_batch(self, step: int) -> int:
        """Index of this rank's batch ``step`` within its section (batch ``step // lanes`` of run ``step % lanes``)."""
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} not in [0, {self.n_steps})")
        return int(self._lane_start[step % self.lanes]) + step // self.lanes

    def step_cells(self, step: int) -> np.ndarray:
        """(B,) global cells of this rank's batch ``step``."""
        start = (self.rank * self.n_steps + self.section_batch(step)) * self.batch_size
        return self.cells_at(np.arange(start, start + self.batch_size))

    def global_batch(self, step: int) -> int:
        return step * self.world_size + self.rank

    def for_rank(self, rank: int) -> "EpochPlan":
        """The same epoch's plan seen from another rank (shares the order; `elastic` reads every rank's batches)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={self.world_size})")
        other = copy.copy(self)
        other.rank, other._cache = int(rank), {}
        return other
