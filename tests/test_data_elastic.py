"""Elastic resume of the data position (issue 16, `grnformer_ds.data.elastic`): an epoch interrupted on W ranks and
continued on another number of ranks (2 -> 1, 1 -> 2, 2 -> 3 -> 1) or with another micro-batch trains on exactly the
uninterrupted epoch's cells (the same multiset of `cell_index`), every rank gets the same number of non-empty
batches, the position inside the rest of the epoch resumes exactly, and the next epoch is the ordinary one of the new
number of ranks."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_data_stream import _cells, _ds, _same, make_store  # tests/ is on sys.path (pytest rootdir import)

LAYOUTS = {"padded": dict(batch_size=6), "packed": dict(max_tokens=200, max_seq_len=30)}
EPOCH = 1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("elastic") / "s")


def _take(ds, n=None):
    """This rank's next ``n`` batches (all of the epoch when None), as the trainer takes them."""
    out = []
    for b in ds:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _epoch_cells(store, world, kw):
    cells = []
    for r in range(world):
        ds = _ds(store, rank=r, world_size=world, **kw)
        ds.set_epoch(EPOCH)
        cells += sum(_cells(_take(ds)), [])
    return Counter(cells)


def _resume_chain(store, chain):
    """Run epoch EPOCH through ``chain``: [(world size, dataset kwargs)], two batches per rank on each but the last
    part, which runs to the end; each part resumes from rank 0's position of the one before (through JSON)."""
    reference = _epoch_cells(store, chain[0][0], chain[0][1])
    seen: list[int] = []
    state = None
    for i, (world, kw) in enumerate(chain):
        last = i == len(chain) - 1
        counts = []
        for r in range(world):
            ds = _ds(store, rank=r, world_size=world, **kw)
            ds.set_epoch(EPOCH)
            if state is not None:
                ds.load_state_dict(json.loads(json.dumps(state)))  # rank 0's position, through a JSON checkpoint
                ds.set_epoch(EPOCH)  # the trainer re-entering the epoch keeps the position
            batches = _take(ds, None if last else 2)
            assert all(len(b["cell_index"]) > 0 for b in batches)
            if "batch_size" in kw:
                assert all(len(b["cell_index"]) <= kw["batch_size"] for b in batches)
            else:
                assert all(b["input_ids"].numel() <= kw["max_tokens"] for b in batches)
            counts.append(len(batches))
            seen += sum(_cells(batches), [])
            if r == 0:
                next_state = ds.state_dict()
        assert len(set(counts)) == 1, counts  # ZeRO: every rank runs the same number of forwards
        if last:
            assert next_state["epoch"] == EPOCH + 1 and next_state["earlier_segments"] == []
        state = next_state
    assert Counter(seen) == reference
    # the next epoch is the new rank count's ordinary epoch
    world, kw = chain[-1]
    ds = _ds(store, rank=0, world_size=world, **kw)
    ds.load_state_dict(state)
    fresh = _ds(store, rank=0, world_size=world, **kw)
    fresh.set_epoch(EPOCH + 1)
    for x, y in zip(_take(ds), _take(fresh), strict=True):
        _same(x, y)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chain", [(2, 1), (1, 2), (2, 3, 1)])
def test_an_epoch_resumed_on_other_rank_counts_sees_its_cells_once(store, layout, chain):
    _resume_chain(store, [(world, dict(LAYOUTS[layout], graphs=False)) for world in chain])


MICRO = {"padded6": dict(batch_size=6), "padded4": dict(batch_size=4), "packed200": dict(max_tokens=200),
         "packed120": dict(max_tokens=120)}


@pytest.mark.parametrize("chain", [
    [(1, "padded6"), (1, "padded4")],  # a smaller micro-batch on the same ranks (e.g. requeued on smaller GPUs)
    [(2, "packed200"), (2, "packed120")],
    [(2, "padded6"), (1, "packed200")],  # padded -> packed, and fewer ranks
    [(1, "packed200"), (2, "padded4"), (3, "padded6")],
])
def test_an_epoch_resumed_with_another_micro_batch_sees_its_cells_once(store, chain):
    """The micro-batch (batch_size / max_tokens, or the layout) changes on resume: the rest of the epoch is batched
    in the new one, with the ranks changing or not, and the epoch still sees each of its cells once."""
    _resume_chain(store, [(world, dict(MICRO[name], max_seq_len=30, graphs=False)) for world, name in chain])


def test_an_evaluation_position_needs_the_same_micro_batch(store):
    from grnformer_ds.errors import UserInputError

    state = _ds(store, batch_size=6, training=False, graphs=False).state_dict()
    with pytest.raises(UserInputError, match="batch_size=6"):
        _ds(store, batch_size=4, training=False, graphs=False).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.e2e)])
def test_the_rest_of_a_resumed_epoch_resumes_exactly(store, num_workers):
    """Stopped again inside the rest of an epoch (2 -> 1 ranks) and resumed on 1 rank: the same batches, masks and
    edges as if it had not stopped (the rest of the epoch is part of the data position)."""
    from grnformer_ds.data import StatefulCellLoader

    kw = dict(LAYOUTS["packed"], edge_perturbation=0.5)
    two = _ds(store, rank=0, world_size=2, **kw)
    two.set_epoch(EPOCH)
    _take(two, 2)
    state = two.state_dict()

    def resumed(n=None):
        ds = _ds(store, rank=0, world_size=1, **kw)
        ds.load_state_dict(state)
        loader = StatefulCellLoader(ds, num_workers=num_workers)
        out = []
        for b in loader:
            out.append(b)
            if n is not None and len(out) == n:
                break
        return out, loader.state_dict()

    reference, _ = resumed()
    head, mid = resumed(3)
    assert mid["earlier_segments"] == [[2, 2, None, 200]] and mid["batches_consumed"] == 3 and mid["world_size"] == 1
    again = _ds(store, rank=0, world_size=1, **kw)
    again.load_state_dict(json.loads(json.dumps(mid)))
    tail = list(StatefulCellLoader(again, num_workers=num_workers))
    assert len(head) + len(tail) == len(reference)
    for x, y in zip(head + tail, reference):
        _same(x, y)
    # the rest of the epoch draws its random choices from batch indices the epoch had not used
    first = _ds(store, rank=0, world_size=1, **kw)
    first.load_state_dict(state)
    plan = first.plan()
    assert plan.global_batch(0) == 2 * 2 and plan.n_steps == len(reference)


def test_remainder_plan_splits_and_repeats_only_when_it_must():
    from grnformer_ds.data.elastic import RemainderPlan

    cells = np.arange(10, 15)  # 5 cells left for 2 ranks, batches of up to 2
    plans = [RemainderPlan(cells, rank=r, world_size=2, epoch=0, first_global_batch=8, lo=0, block_size=4,
                           batch_size=2) for r in range(2)]
    got = [[p.step_cells(s).tolist() for s in range(p.n_steps)] for p in plans]
    assert plans[0].n_steps == 2 and sorted(sum(sum(got, []), [])) == cells.tolist()  # 3 + 2 cells, none twice
    assert [p.global_batch(1) for p in plans] == [10, 11]
    # packed: the rank with fewer micro-batches splits its fullest one instead of repeating cells
    tokens = np.array([90, 90, 10, 10, 10, 10, 10, 10])
    packed = [RemainderPlan(np.arange(8), rank=r, world_size=2, epoch=0, first_global_batch=0, lo=0, block_size=4,
                            tokens=tokens, max_tokens=100) for r in range(2)]
    batches = [[p.step_cells(s).tolist() for s in range(p.n_steps)] for p in packed]
    assert packed[0].n_steps == packed[1].n_steps == 2
    assert sorted(sum(sum(batches, []), [])) == list(range(8))
    # a single cell left for 3 ranks: the only case with repeats (every rank needs a batch)
    one = [RemainderPlan(np.array([7]), rank=r, world_size=3, epoch=0, first_global_batch=0, lo=0, block_size=4,
                         batch_size=4) for r in range(3)]
    assert [o.step_cells(0).tolist() for o in one] == [[7], [7], [7]]


def test_a_packed_position_needs_the_same_token_counts(store):
    """Packed batches are built from each cell's token count: a resume whose counts differ (another max_seq_len)
    cannot rebuild the interrupted epoch and says so, in either layout."""
    from grnformer_ds.errors import UserInputError

    ds = _ds(store, max_tokens=200, max_seq_len=30, graphs=False)
    ds.set_epoch(EPOCH)
    _take(ds, 2)
    state = ds.state_dict()
    for kw in (dict(max_tokens=200), dict(batch_size=6)):
        with pytest.raises(UserInputError, match="token counts changed"):
            _ds(store, max_seq_len=20, graphs=False, **kw).load_state_dict(state)
    _ds(store, batch_size=6, max_seq_len=30, graphs=False).load_state_dict(state)  # the same counts: fine
