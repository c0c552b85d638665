"""EpochPlan: block shuffle is a permutation, local to buffers, reproducible, different per epoch; partition."""
from __future__ import annotations

import numpy as np
import pytest

from grnformer_ds.data.sampler import EpochPlan, batch_rng


def _order(plan):
    return plan.cells_at(np.arange(plan.n))


def test_block_shuffle_is_a_buffer_local_permutation():
    plan = EpochPlan(100, 1100, batch_size=10, seed=3, epoch=0, block_size=16, buffer_blocks=4)
    order = _order(plan)
    assert sorted(order.tolist()) == list(range(100, 1100))
    # each buffer (4 blocks = 64 positions, except where the short last block falls) draws from exactly 4 blocks
    for u in range(len(plan.buffer_starts) - 1):
        cells = order[plan.buffer_starts[u]:plan.buffer_starts[u + 1]]
        assert len(np.unique(plan.block_of(cells))) == min(4, len(plan.block_order) - 4 * u)
    assert not np.array_equal(order, np.sort(order))
    assert np.array_equal(order, _order(EpochPlan(100, 1100, batch_size=10, seed=3, epoch=0, block_size=16,
                                                  buffer_blocks=4)))
    assert not np.array_equal(order, _order(EpochPlan(100, 1100, batch_size=10, seed=3, epoch=1, block_size=16,
                                                      buffer_blocks=4)))
    flat = EpochPlan(100, 1100, batch_size=10, seed=3, epoch=0, shuffle=False)
    assert np.array_equal(_order(flat), np.arange(100, 1100))


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_partition_with_equal_counts(drop_last):
    n, B, W = 1001, 7, 3
    plans = [EpochPlan(0, n, batch_size=B, seed=0, epoch=2, rank=r, world_size=W, drop_last=drop_last)
             for r in range(W)]
    steps = {p.n_steps for p in plans}
    assert steps == {n // (B * W) if drop_last else -(-n // (B * W))}
    cells = np.concatenate([p.step_cells(s) for p in plans for s in range(p.n_steps)])
    if drop_last:
        assert len(np.unique(cells)) == len(cells) == (n // (B * W)) * B * W
    else:
        assert set(cells.tolist()) == set(range(n)) and len(cells) == plans[0].n_steps * B * W
    assert sorted(p.global_batch(0) for p in plans) == [0, 1, 2]


def test_batch_rng_depends_on_seed_epoch_and_global_batch_only():
    a = batch_rng(0, 1, 5).random(4)
    assert np.array_equal(a, batch_rng(0, 1, 5).random(4))
    for other in (batch_rng(1, 1, 5), batch_rng(0, 2, 5), batch_rng(0, 1, 6), batch_rng(0, 1, 5, stream=1)):
        assert not np.array_equal(a, other.random(4))


def test_lanes_give_workers_disjoint_blocks():
    """With N workers dividing `lanes`, worker w's batches (w, w+N, ...) come from its own runs of the section: the
    blocks two workers read overlap only where a shuffle buffer straddles two runs."""
    def blocks_per_worker(lanes, n_workers=2):
        plan = EpochPlan(0, 16384, batch_size=64, seed=0, epoch=0, block_size=64, buffer_blocks=8, lanes=lanes)
        return [set(np.concatenate([plan.block_of(plan.step_cells(s))
                                    for s in range(w, plan.n_steps, n_workers)]).tolist()) for w in range(n_workers)]

    a, b = blocks_per_worker(lanes=4)
    assert len(a & b) <= 2 * 8  # at most the buffers at the two inner run boundaries
    a1, b1 = blocks_per_worker(lanes=1)
    assert len(a1 & b1) > 200  # without lanes both workers read (nearly) every block of the 256
    # lanes only reorder batches: same cells per epoch
    p4 = EpochPlan(0, 1000, batch_size=10, seed=0, epoch=0, lanes=4)
    p1 = EpochPlan(0, 1000, batch_size=10, seed=0, epoch=0, lanes=1)

    def key(p):
        return sorted(tuple(p.step_cells(s).tolist()) for s in range(p.n_steps))

    assert key(p4) == key(p1) and p4.step_cells(1).tolist() != p1.step_cells(1).tolist()
