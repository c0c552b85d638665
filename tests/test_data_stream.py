"""StreamingCellDataset on small hand-made stores: determinism, reshuffle, partition, equal batch counts, exact
resume (also with DataLoader workers), graphs, clear errors."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from grnformer_ds.errors import UserInputError

N_GENES = 40
CELL_TYPES = ["B", "T", "NK"]


def make_store(root: Path, n_cells: int = 203, shard_sizes=(120, 83), grn: bool = True, seed: int = 0,
               n_genes: int = N_GENES, genes_per_cell: tuple[int, int] | None = None) -> Path:
    """A complete store (docs/design.md sections 1-2) written with the store and GRN writers: Poisson counts over 40
    genes, 3 cell types, 6 regulons, a cell-type GRN per type and a co-expression graph. With ``genes_per_cell``
    (lo, hi): ``n_genes`` genes and each cell expresses a uniform number in [lo, hi] of them (no GRN)."""
    from grnformer_ds.store.manifest import write_manifest
    from grnformer_ds.store.vocab import vocab_sha256
    from grnformer_ds.store.writer import write_shard

    rng = np.random.default_rng(seed)
    genes = [f"G{j:04d}" if n_genes > 1000 else f"G{j:03d}" for j in range(n_genes)]
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2} | {g: j + 3 for j, g in enumerate(genes)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    if genes_per_cell is None:
        x = rng.poisson(rng.gamma(0.5, 3.0, size=(n_cells, n_genes))).astype(np.float32)
    else:
        assert not grn, "the hand-made GRN covers the 40-gene stores"
        x = np.zeros((n_cells, n_genes), np.float32)
        for row, k in zip(x, rng.integers(genes_per_cell[0], genes_per_cell[1] + 1, n_cells)):
            row[rng.choice(n_genes, k, replace=False)] = 1 + rng.poisson(2.0, k)
    x[:, 0] += 1
    ctype = rng.integers(0, len(CELL_TYPES), n_cells)
    var = pd.DataFrame({"token_id": np.arange(n_genes, dtype=np.int32) + 3}, index=pd.Index(genes))
    shards, offset = [], 0
    for i, n in enumerate(shard_sizes):
        rows = slice(offset, offset + n)
        X = sp.csr_matrix(x[rows])
        obs = pd.DataFrame({
            "cell_index": np.arange(offset, offset + n, dtype=np.int64),
            "cell_type": pd.Categorical.from_codes(ctype[rows], categories=CELL_TYPES),
            "source_file": pd.Categorical(["a.h5ad"] * n),
            "library_size": x[rows].sum(1).astype(np.float32),
            "n_genes": (x[rows] > 0).sum(1).astype(np.int32),
        }, index=pd.Index([f"c{k}" for k in range(offset, offset + n)]))
        path = f"shards/shard-{i:06d}.zarr"
        write_shard(root / path, X, obs, var)
        shards.append({"path": path, "n_cells": n, "nnz": int(X.nnz), "cell_offset": offset, "checksum": "x"})
        offset += n
    assert offset == n_cells
    write_manifest(root, {
        "format": "grnformer_ds.store", "schema_version": 1, "complete": True, "n_cells": n_cells,
        "n_genes": n_genes, "nnz": int((x > 0).sum()), "vocab_size": n_genes + 3,
        "special_tokens": {"<pad>": 0, "<cls>": 1, "<eoc>": 2}, "vocab_sha256": vocab_sha256(vocab),
        "cell_type_key": "ct",
        "cell_types": CELL_TYPES, "shards": shards, "inputs": [], "seed": 0, "created_utc": "now", "assets": {}})
    if grn:
        _add_grn(root, shards, rng)
    return root


def hand_grn(genes):
    """Hand-made GRN assets over 40 genes: regulons r -> TF 2r with targets 2r+1..2r+5 (weight = target / 100)."""
    from grnformer_ds.grn import GRNAssets

    a = GRNAssets.empty(genes, CELL_TYPES)
    tfs = np.arange(6) * 2
    targets = [np.arange(t + 1, t + 6) for t in tfs]
    a.regulon_names = np.array([f"G{t:03d}(+)" for t in tfs])
    a.regulon_tf = tfs.astype(np.int32)
    a.regulon_indptr = np.r_[0, np.cumsum([len(t) for t in targets])].astype(np.int64)
    a.regulon_target = np.concatenate(targets).astype(np.int32)
    a.regulon_weight = (a.regulon_target / 100).astype(np.float32)
    a.regulon_sign = np.ones(len(a.regulon_target), np.int8)
    a.regulon_threshold = np.zeros(6, np.float32)
    src, dst, ptr = [], [], [0]
    for c in range(len(CELL_TYPES)):  # type c: TF 0 and TF 10+c regulate 20..29
        s = np.repeat([0, 10 + c], 10)
        d = np.tile(np.arange(20, 30), 2)
        src.append(s), dst.append(d), ptr.append(ptr[-1] + len(s))
    a.celltype_indptr = np.array(ptr, np.int64)
    a.celltype_src = np.concatenate(src).astype(np.int32)
    a.celltype_dst = np.concatenate(dst).astype(np.int32)
    a.celltype_weight = np.full(len(a.celltype_src), 0.5, np.float32)
    a.celltype_sign = np.ones(len(a.celltype_src), np.int8)
    co = sp.random(N_GENES, N_GENES, density=0.3, random_state=1, format="csr", dtype=np.float32)
    co = ((co + co.T) > 0).astype(np.float32).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    co.data = np.full(co.nnz, 0.9, np.float32)
    a.coexpr_indptr, a.coexpr_indices, a.coexpr_data = co.indptr.astype(np.int64), co.indices.astype(np.int32), co.data
    a.tf_mask = np.isin(np.arange(N_GENES), tfs)
    return a


def _add_grn(root: Path, shards, rng):
    from grnformer_ds.grn import write_grn_assets, write_shard_regulon_activity

    genes = [f"G{j:03d}" for j in range(N_GENES)]
    a = hand_grn(genes)
    write_grn_assets(root, a)
    for s in shards:
        active = rng.random((s["n_cells"], 6)) < 0.5
        write_shard_regulon_activity(root / s["path"], active.astype(np.float32), active, a.regulon_names)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s")


def _ds(store, **kw):
    from grnformer_ds.data import StreamingCellDataset

    if "max_tokens" not in kw:
        kw.setdefault("batch_size", 16)
    kw.setdefault("seed", 0)
    kw.setdefault("block_size", 16)  # several blocks and buffers even in a 203-cell store
    kw.setdefault("buffer_blocks", 3)
    return StreamingCellDataset(store, **kw)


def _cells(batches):
    return [b["cell_index"].tolist() for b in batches]


def test_defaults_work_and_keys_match_design(store):
    from grnformer_ds.data import StreamingCellDataset

    ds = StreamingCellDataset(store, batch_size=16, seed=0)  # only the required arguments
    assert ds.graphs  # store has GRN assets -> graphs on by default
    b = next(iter(ds))
    B, L = b["input_ids"].shape
    assert B == 16
    expect = {"input_ids": torch.int64, "values": torch.float32, "attention_mask": torch.bool,
              "labels": torch.float32, "cell_index": torch.int64, "cell_type_ids": torch.int64,
              "celltype_edge_index": torch.int64, "celltype_edge_weight": torch.float32,
              "cell_edge_index": torch.int64, "cell_edge_weight": torch.float32, "batch": torch.int64,
              "ptr": torch.int64}
    assert {k: v.dtype for k, v in b.items()} == expect
    assert b["batch"].shape == (B * L,) and torch.equal(b["ptr"], torch.arange(B + 1) * L)
    assert b["celltype_edge_index"].shape[0] == 2 and b["cell_edge_index"].shape[1] == b["cell_edge_weight"].shape[0]
    assert (b["input_ids"][:, 0] == 1).all()
    real = b["attention_mask"].clone()
    real[:, 0] = False  # <cls> is an isolated node
    for key in ("celltype_edge_index", "cell_edge_index"):
        assert real.reshape(-1)[b[key]].all()  # edges only between gene tokens
        assert (b["batch"][b[key][0]] == b["batch"][b[key][1]]).all()  # never across cells


def test_scfoundation_backbone_batches(store):
    ds = _ds(store, backbone="scfoundation")
    b = next(iter(ds))
    B, L = b["input_ids"].shape
    assert b["decoder_values"].shape == b["labels"].shape == b["decoder_input_ids"].shape == (B, N_GENES)
    assert b["total_counts"].shape == (B, 2) and b["total_counts"].dtype == torch.float32
    assert b["attention_mask"].reshape(-1)[b["cell_edge_index"]].all()
    assert torch.equal(b["ptr"], torch.arange(B + 1) * L)


@pytest.mark.parametrize("backbone, mask_ratio, max_seq_len, lead", [("scgpt", 0.15, 1200, 1),
                                                                     ("scfoundation", 0.3, 2048, 2)])
def test_each_backbone_masks_with_its_own_defaults(store, backbone, mask_ratio, max_seq_len, lead):
    """The dataset passes only what the caller set, so scFoundation masks 30 % of a cell's genes (its recipe), not
    scGPT's 15 %, and packs cells of up to 2,048 genes + T and S; an explicit value still wins."""
    from grnformer_ds.data.dataset import longest_cell_tokens

    ds = _ds(store, backbone=backbone, graphs=False)
    assert (ds.collator.mask_ratio, ds.collator.max_seq_len) == (mask_ratio, max_seq_len)
    assert longest_cell_tokens(backbone) == max_seq_len + lead - (backbone == "scgpt")  # <cls> is one of scGPT's
    b = next(iter(ds))
    masked = (b["labels"] != -100).sum(1).numpy()
    genes = (b["input_ids"] != ds.reader.pad_id).sum(1).numpy() - (1 if backbone == "scgpt" else 0)
    if backbone == "scgpt":  # masked among the cell's gene tokens: int(n * ratio)
        assert (masked == (genes * mask_ratio).astype(int)).all()
    else:  # the encoder holds the unmasked genes (padded layout: T and S are not slots): nnz = encoder + masked
        assert (masked == ((genes + masked) * mask_ratio).astype(int)).all()
    assert _ds(store, backbone=backbone, graphs=False, mask_ratio=0.2).collator.mask_ratio == 0.2



@pytest.mark.parametrize("columns", ["in id order", "shuffled ids"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_scpalm_masks_whole_patches_of_the_models_patching(store, layout, columns):
    """scPaLM's collator masks in the model's units: every patch the model forms (genes in token-id order, cut every
    patch_size) is either fully masked or not at all, int(n_patches * mask_ratio) per cell (at least one from two
    patches on); scGPT's layout and values otherwise. Both when store columns are in token-id order (the collator's
    fast path) and when a vocabulary gives them ids in another order (genes ranked by id per cell)."""
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM

    kw = dict(max_tokens=600, max_seq_len=100) if layout == "packed" else {}
    ds = _ds(store, backbone="scpalm", collator_kwargs={"patch_size": 4}, **kw)
    assert (ds.collator.mask_ratio, ds.collator.patch_size) == (0.25, 4)
    assert ds.collator._columns_in_id_order
    if columns == "shuffled ids":
        ids = ds.collator.gene_token_ids
        ds.collator = dataclasses.replace(ds.collator, gene_token_ids=np.random.default_rng(0).permutation(ids))
        assert not ds.collator._columns_in_id_order
    b = next(iter(ds))
    cfg = GRNFormerConfig.from_preset("debug", vocab_size=ds.reader.n_genes + 3, backbone="scpalm", patch_size=4)
    torch.manual_seed(0)
    with torch.no_grad():
        out = GRNFormerForMaskedLM(cfg).eval()(**b)
    assert torch.isfinite(out.loss)
    ti, masked = out.token_index.reshape(-1), (b["labels"] != -100).reshape(-1)
    cells = (torch.arange(b["input_ids"].numel()) // b["input_ids"].shape[1] if layout == "padded"
             else torch.searchsorted(b["cu_seq_lens_q"][1:].long(), torch.arange(b["input_ids"].shape[1]),
                                     right=True))
    n_cells = b["cell_index"].shape[0]
    first = torch.ones_like(cells, dtype=torch.bool)
    first[1:] = cells[1:] != cells[:-1]  # each cell's <cls> slot
    for c in range(n_cells):
        sel = (cells == c) & (ti >= 0) & ~first
        tokens = ti[sel].unique()
        per_token = [masked[sel][ti[sel] == t] for t in tokens]
        assert all(m.all() or not m.any() for m in per_token)  # whole patches
        n_masked = sum(bool(m.all()) for m in per_token)
        expect = int(len(tokens) * 0.25) or (1 if len(tokens) > 1 else 0)
        assert n_masked == expect, (c, len(tokens), n_masked)
    assert not masked[first].any()  # <cls> is never a target


def test_deterministic_by_seed_and_reshuffled_by_epoch(store):
    a = list(_ds(store, graphs=False))
    b = list(_ds(store, graphs=False))
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k])
    other_seed = list(_ds(store, seed=1, graphs=False))
    assert _cells(a) != _cells(other_seed)
    ds = _ds(store, graphs=False)
    e0 = list(ds)
    assert ds.epoch == 1  # a finished epoch moves on
    e1 = list(ds)
    assert _cells(e0) != _cells(e1)
    assert sorted(sum(_cells(e0), [])) != sum(_cells(e0), [])  # shuffled
    ds.set_epoch(0)
    assert _cells(list(ds)) == _cells(e0)


def _collect(store, rank, world_size, num_workers, **kw):
    from grnformer_ds.data import StatefulCellLoader

    ds = _ds(store, rank=rank, world_size=world_size, **kw)
    return list(StatefulCellLoader(ds, num_workers=num_workers)), ds


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_two_ranks_two_workers_cover_every_cell_once_per_epoch(tmp_path):
    store = make_store(tmp_path / "even", n_cells=160, shard_sizes=(64, 96), grn=False)
    seen = []
    for rank in range(2):
        batches, ds = _collect(store, rank, 2, 2, eval_fraction=0.0, batch_size=8, block_size=8, buffer_blocks=4)
        assert len(batches) == len(ds) == 10
        seen += sum(_cells(batches), [])
        # the loader returns the batches in step order although two workers built them
        assert _cells(batches) == _cells([ds.batch(s, ds.plan(0)) for s in range(10)])
    assert sorted(seen) == list(range(160))


def test_equal_batch_counts_with_odd_cells_drop_and_pad(store):
    # 203 cells, train split = 203 - round(0.05 * 203) = 193 cells: odd, not a multiple of B * W = 2 * 16
    n_train = 193
    counts, seen = [], []
    for rank in range(2):
        ds = _ds(store, rank=rank, world_size=2, graphs=False)
        got = list(ds)
        counts.append(len(got))
        seen += sum(_cells(got), [])
    assert counts == [n_train // 32] * 2
    assert len(seen) == len(set(seen)) == (n_train // 32) * 32 and max(seen) < n_train  # dropped, never repeated
    counts, seen = [], []
    for rank in range(2):
        ds = _ds(store, rank=rank, world_size=2, graphs=False, drop_last=False)
        got = list(ds)
        counts.append(len(got))
        seen += sum(_cells(got), [])
    assert counts == [-(-n_train // 32)] * 2
    assert set(seen) == set(range(n_train)) and len(seen) == counts[0] * 32  # all cells, padded by repeats


def test_eval_split_is_held_out_and_fixed(store):
    ev = _ds(store, split="eval", graphs=False)
    tr = _ds(store, graphs=False, drop_last=False)
    ev_cells = set(sum(_cells(list(ev)), []))
    assert ev_cells == set(range(193, 203))
    assert not ev_cells & set(sum(_cells(list(tr)), []))
    p1, p2 = list(ev), list(ev)
    for x, y in zip(p1, p2):  # same masks every evaluation pass
        assert torch.equal(x["values"], y["values"])
    assert len(_ds(store, split="all", graphs=False, drop_last=False)) == -(-203 // 16)


def _same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


LAYOUTS = {"padded": dict(batch_size=8), "packed": dict(max_tokens=200, graph_layout="csr", max_seq_len=30)}


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.e2e)])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_exact_mid_epoch_resume(store, num_workers, layout):
    """Padded and token-packed batches alike: stop after 5 batches, resume from the JSON'd state with 0 or 2
    workers, and the batches (masks, perturbed edges, packing) equal the uninterrupted in-process run's."""
    from grnformer_ds.data import StatefulCellLoader

    kw = dict(LAYOUTS[layout], edge_perturbation=0.5)

    def run(ds, n=None):
        loader = StatefulCellLoader(ds, num_workers=num_workers)
        out = []
        for b in loader:
            out.append(b)  # kept while the workers refill their shared-memory slots: the batches are ours
            if n is not None and len(out) == n:
                break
        assert loader.one_off_batches == 0  # every batch came through a worker's slot ring
        return out, loader.state_dict()

    full = _ds(store, **kw)
    full.set_epoch(2)
    reference = list(full)  # in-process: batches are a function of (seed, epoch, batch index) only
    reference += list(full)[:2]  # continues into epoch 3

    first = _ds(store, **kw)
    first.set_epoch(2)
    head, state = run(first, n=5)
    assert state["epoch"] == 2 and state["batches_consumed"] == 5
    resumed = _ds(store, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    resumed.set_epoch(2)  # trainer re-entering the epoch keeps the position
    tail, state = run(resumed)
    assert state["epoch"] == 3 and state["batches_consumed"] == 0
    tail += run(resumed)[0][:2]
    got = head + tail
    assert len(got) == len(reference)
    for x, y in zip(got, reference):
        _same(x, y)


def test_stateful_loader_refuses_settings_that_break_the_position(store):
    from grnformer_ds.data import StatefulCellLoader

    with pytest.raises(UserInputError, match="persistent_workers"):
        StatefulCellLoader(_ds(store, graphs=False), num_workers=2, persistent_workers=True)
    with pytest.raises(UserInputError, match="in_order"):
        StatefulCellLoader(_ds(store, graphs=False), num_workers=2, in_order=False)


def test_resume_refuses_mismatched_settings(store):
    """The seed and the split's cells define the epoch's order: another one cannot continue it. (Another batch_size is
    re-planned for training, refused for evaluation: tests/test_data_elastic.py.)"""
    state = _ds(store, graphs=False).state_dict()
    with pytest.raises(UserInputError, match="seed"):
        _ds(store, graphs=False, seed=1).load_state_dict(state)
    with pytest.raises(UserInputError, match="split='train'"):
        _ds(store, graphs=False, split="all").load_state_dict(state)
    with pytest.raises(UserInputError, match="eval_fraction changed"):
        _ds(store, graphs=False, eval_fraction=0.2).load_state_dict(state)


def test_zarr_reader_gives_the_same_batches(store):
    a = list(_ds(store, reader="tensorstore"))
    b = list(_ds(store, reader="zarr"))
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k])


def test_batches_hold_the_stored_cells(store):
    """Tokens and bins come from the right rows: compare with anndata's own reading of the shards."""
    import anndata as ad

    from grnformer_ds.data.binning import normalize_log1p

    shards = [ad.read_zarr(p) for p in sorted((store / "shards").glob("*.zarr"))]
    X = sp.vstack([s.X for s in shards]).toarray()
    ct = np.concatenate([s.obs["cell_type"].cat.codes.to_numpy() for s in shards])
    ds = _ds(store, mask_ratio=0.0, graphs=False)
    for b in list(ds)[:3]:
        for i, c in enumerate(b["cell_index"].tolist()):
            genes = np.flatnonzero(X[c])
            assert b["cell_type_ids"][i] == ct[c]
            ids = b["input_ids"][i][b["attention_mask"][i]].numpy()
            np.testing.assert_array_equal(ids[1:], genes + 3)
            vals = b["values"][i, 1:len(ids)].numpy()
            expr = normalize_log1p(X[c, genes])
            # bins are monotone in expression (tied values spread over a range of bins, as in scGPT)
            levels = np.unique(expr)
            lo = [vals[expr == v].min() for v in levels]
            hi = [vals[expr == v].max() for v in levels]
            assert all(h <= l2 for h, l2 in zip(hi[:-1], lo[1:]))
            assert vals.min() >= 1 and vals.max() <= 50


def test_errors_for_incomplete_store_and_missing_grn(tmp_path, store):
    bare = make_store(tmp_path / "bare", n_cells=40, shard_sizes=(40,), grn=False)
    assert not _ds(bare, batch_size=4).graphs
    with pytest.raises(UserInputError, match="no GRN assets"):
        _ds(bare, batch_size=4, graphs=True)
    broken = tmp_path / "broken"
    shutil.copytree(bare, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="manifest"):
        _ds(broken, batch_size=4)
    m = json.loads((bare / "manifest.json").read_text())
    m["complete"] = False
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserInputError, match="incomplete"):
        _ds(broken, batch_size=4)
    m["complete"] = True
    (broken / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(broken / "shards" / "shard-000000.zarr" / "X" / "data")
    with pytest.raises(UserInputError, match="X/data"):  # detected when a worker first reads the shard
        next(iter(_ds(broken, batch_size=4)))
    with pytest.raises(UserInputError, match="fewer than batch_size"):
        _ds(bare, batch_size=64)
    with pytest.raises(UserInputError, match="max_seq_len"):
        _ds(bare, batch_size=4, max_seq_len=1)
    with pytest.raises(UserInputError, match="rank 2"):
        _ds(bare, batch_size=4, rank=2, world_size=2)
    with pytest.raises(UserInputError, match="split"):
        _ds(bare, batch_size=4, split="test")



def _wire_batch(n_cells, n_edges, seed):
    g = torch.Generator().manual_seed(seed)
    L = 6
    return {"input_ids": torch.randint(0, 2 ** 20, (n_cells, L), generator=g), "values": torch.rand(n_cells, L),
            "attention_mask": torch.rand(n_cells, L, generator=g) > 0.5,
            "edge_index": torch.randint(0, n_cells * L, (2, n_edges), generator=g),
            "edge_weight": torch.rand(n_edges, generator=g), "batch": torch.arange(n_cells).repeat_interleave(L),
            "big": torch.tensor([2 ** 40, -3]), "ptr": torch.arange(n_cells + 1) * L, "empty": torch.zeros(0, 3),
            "max_length_q": L + seed, "graph_layout": "csr"}


def test_slot_ring_round_trip_reuse_and_ownership():
    """Workers send batches through a ring of reusable shared-memory slots (worker_transport.py). Unpacked, a batch
    equals the worker's dict key for key, in order, with the same dtypes and shapes (int64 travels as int32 when it
    fits, `batch` is rebuilt from `ptr`); a busy slot is never overwritten (a one-off buffer is used instead); a slot is
    reused once the main process copied it out, and grows (re-announced) for a larger batch; the consumer's batch is its
    own (refilling the slot does not change it) and its keys are non-overlapping views of one storage."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.utils.data._utils.collate import default_convert

    from grnformer_ds.data.worker_transport import BatchReceiver, BatchSender

    def wire(msg):  # what the DataLoader does to a worker's batch_size=None output, then the queue's pickling
        assert default_convert(msg) is msg
        return pickle.loads(ForkingPickler.dumps(msg))

    def check(got, want):
        assert list(got) == list(want)
        for key in want:
            if not isinstance(want[key], torch.Tensor):  # plain values ride in the message
                assert got[key] == want[key] and type(got[key]) is type(want[key]), key
                continue
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert torch.equal(got[key], want[key]), key

    sender, receiver = BatchSender(n_slots=2), BatchReceiver()
    b = [_wire_batch(4, 7, 0), _wire_batch(3, 5, 1), _wire_batch(4, 9, 2), _wire_batch(4, 6, 3),
         _wire_batch(40, 300, 4)]
    m0 = sender.pack(b[0])
    assert (m0.slot, m0.generation) == (0, 1) and m0.storage is not None and m0.flags is not None
    m1 = sender.pack(b[1])
    assert m1.slot == 1 and m1.storage is not None and m1.flags is None
    m2 = sender.pack(b[2])  # both slots held by the main process: one-off buffer, the slots are left alone
    assert m2.slot == -1 and sender.one_off == 1
    got0 = receiver.unpack(wire(m0))
    check(got0, b[0])
    m3 = sender.pack(b[3])  # slot 0 is free again and big enough: reused, not re-sent
    assert (m3.slot, m3.generation, m3.storage) == (0, 1, None)
    check(got0, b[0])  # the slot was refilled; the consumer's copy is untouched
    check(receiver.unpack(wire(m1)), b[1])
    check(receiver.unpack(wire(m2)), b[2])
    check(receiver.unpack(wire(m3)), b[3])
    m4 = sender.pack(b[4])  # larger than slot 1: reallocated, new generation, storage re-sent
    assert m4.slot == 1 and m4.generation == 2 and m4.storage is not None
    got4 = receiver.unpack(wire(m4))
    check(got4, b[4])
    assert sender.flags.tolist() == [0, 0]  # every slot released
    storage = got4["values"].untyped_storage().data_ptr()
    for key in ("input_ids", "values", "attention_mask", "edge_index", "edge_weight", "big", "ptr"):
        assert got4[key].untyped_storage().data_ptr() == storage, key  # one allocation per batch
    got4["values"].fill_(-5.0)
    assert all(torch.equal(got4[k], b[4][k]) for k in b[4] if k != "values" and isinstance(b[4][k], torch.Tensor))
