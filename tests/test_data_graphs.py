"""Graph restriction, PyG batching and edge perturbation on hand-made GRNs (pure numpy/tensor functions), and the
graphs of real batches against an independent per-cell computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grnformer_ds.data.graphs import GraphBuilder, slot_table
from grnformer_ds.data.perturb import perturb_edges
from test_data_stream import N_GENES, _ds, hand_grn, make_store

GENES = [f"G{j:03d}" for j in range(N_GENES)]


def _edges(index, weight, offset=0):
    return {(int(s) - offset, int(d) - offset, round(float(w), 4)) for (s, d), w in zip(index.T.tolist(), weight)}


def test_restriction_to_tokens_on_hand_made_grn():
    a = hand_grn(GENES)
    builder = GraphBuilder(a, alpha=0.0)
    L = 7
    # cell 0 (type T=1): <cls>, genes 0, 21, 25, 3, 11, <pad>; cell 1 (type -1 unknown): <cls>, 2, 4, 5, pads
    slot_genes = np.array([[-1, 0, 21, 25, 3, 11, -1], [-1, 2, 4, 5, -1, -1, -1]])
    active = np.zeros((2, 6), bool)
    active[0, [0, 1]] = True  # regulon 0 = TF 0 -> 1..5 ; regulon 1 = TF 2 -> 3..7 (TF 2 absent in cell 0)
    active[1, [1, 2]] = True  # regulon 2 = TF 4 -> 5..9
    bits = np.packbits(active, axis=1, bitorder="little")
    g = builder(slot_genes, np.array([1, -1]), bits, rng=None, perturb=False)
    # cell-type GRN of type 1: TF 0 and TF 11 -> genes 20..29; present: 0 (slot 1), 11 (slot 5), 21 (slot 2),
    # 25 (slot 3)
    assert _edges(g["celltype_edge_index"], g["celltype_edge_weight"]) == {
        (1, 2, 0.5), (1, 3, 0.5), (5, 2, 0.5), (5, 3, 0.5)}  # unknown type of cell 1: none
    # cell GRN: cell 0 -> 0->3 (slot 1 -> 4, weight 0.03); cell 1 -> 2->4, 2->5 (regulon 1), 4->5 (regulon 2)
    assert _edges(g["cell_edge_index"], g["cell_edge_weight"]) == {
        (1, 4, 0.03), (L + 1, L + 2, 0.04), (L + 1, L + 3, 0.05), (L + 2, L + 3, 0.05)}
    assert torch.equal(g["batch"], torch.tensor([0] * L + [1] * L))
    assert torch.equal(g["ptr"], torch.tensor([0, L, 2 * L]))
    # PyG accepts the layout: a Batch of two graphs over the (B*L) nodes
    from torch_geometric.data import Batch, Data

    pyg = Batch.from_data_list([Data(edge_index=torch.zeros((2, 0), dtype=torch.long), num_nodes=L)] * 2)
    assert torch.equal(pyg.batch, g["batch"]) and torch.equal(pyg.ptr, g["ptr"])


def test_union_of_regulons_sharing_a_tf_keeps_the_strongest_edge_once():
    a = hand_grn(GENES)
    # add "G000(-)": TF 0 again, targets 3..7 with weight -0.5 (overlaps regulon 0 = TF 0 -> 1..5 on 3, 4, 5)
    a.regulon_names = np.r_[a.regulon_names, ["G000(-)"]]
    a.regulon_tf = np.r_[a.regulon_tf, [0]].astype(np.int32)
    a.regulon_target = np.r_[a.regulon_target, np.arange(3, 8)].astype(np.int32)
    a.regulon_weight = np.r_[a.regulon_weight, np.full(5, -0.5)].astype(np.float32)
    a.regulon_sign = np.r_[a.regulon_sign, np.full(5, -1)].astype(np.int8)
    a.regulon_indptr = np.r_[a.regulon_indptr, [a.regulon_indptr[-1] + 5]].astype(np.int64)
    a.regulon_threshold = np.zeros(7, np.float32)
    builder = GraphBuilder(a, alpha=0.0)
    slot_genes = np.array([[-1, 0, 1, 3, 4, 7, -1], [-1, 0, 1, 3, 4, 7, -1]])
    active = np.zeros((2, 7), bool)
    active[0, [0, 6]] = True  # both TF-0 regulons: duplicated edges 0->3, 0->4
    active[1, [0]] = True
    g = builder(slot_genes, np.array([-1, -1]), np.packbits(active, axis=1, bitorder="little"), None, False)
    got = _edges(g["cell_edge_index"], g["cell_edge_weight"])
    L = 7
    assert got == {(1, 2, 0.01), (1, 3, -0.5), (1, 4, -0.5), (1, 5, -0.5),
                   (L + 1, L + 2, 0.01), (L + 1, L + 3, 0.03), (L + 1, L + 4, 0.04)}
    # same rule as GRNAssets.cell_edges
    src, dst, w, _ = a.cell_edges(np.flatnonzero(active[0]))
    keep = np.isin(src, [0, 1, 3, 4, 7]) & np.isin(dst, [0, 1, 3, 4, 7])
    slot = {0: 1, 1: 2, 3: 3, 4: 4, 7: 5}
    assert {(slot[int(x)], slot[int(y)], round(float(v), 4)) for x, y, v in zip(src[keep], dst[keep], w[keep])} == {
        e for e in got if e[0] < L}


def _batch_of_cells(rng, n_tokens=(30, 30, 4)):
    """Token layouts of a few cells and a GRN among their tokens (cell, src slot, dst slot, weight)."""
    L = max(n_tokens) + 3
    slot_genes = np.full((len(n_tokens), L), -1)
    parts = []
    for b, n in enumerate(n_tokens):
        slot_genes[b, 1:n + 1] = np.sort(rng.choice(N_GENES, n, replace=False))
        key = np.unique(rng.integers(1, n + 1, 3 * n) * 100 + rng.integers(1, n + 1, 3 * n))
        key = key[key // 100 != key % 100]
        parts.append((np.full(len(key), b), key // 100, key % 100, np.full(len(key), 0.1, np.float32)))
    edges = tuple(np.concatenate([p[k] for p in parts]) for k in range(4))
    return slot_genes, edges


def test_perturbation_keeps_count_and_adds_only_coexpressed_links_of_the_cell():
    a = hand_grn(GENES)
    co = {(i, int(j)) for i in range(N_GENES) for j in a.coexpr_indices[a.coexpr_indptr[i]:a.coexpr_indptr[i + 1]]}
    slot_genes, (cell, s, d, w) = _batch_of_cells(np.random.default_rng(0))
    table = slot_table(slot_genes, N_GENES)
    args = (table, slot_genes, a.coexpr_indptr, a.coexpr_indices, a.coexpr_data)
    out = perturb_edges(cell, s, d, w, *args, 0.2, np.random.default_rng(1))
    nb, ns, nd, nw = out
    for b in range(len(slot_genes)):
        genes = set(slot_genes[b][slot_genes[b] >= 0].tolist())
        before = set(zip(s[cell == b].tolist(), d[cell == b].tolist()))
        after = list(zip(ns[nb == b].tolist(), nd[nb == b].tolist()))
        assert len(after) == len(before) and len(set(after)) == len(after)  # same count, no duplicate edge
        added = set(after) - before
        # every co-expression link among the cell's token genes that is not already an edge
        candidates = {(u, v) for u in genes for v in genes if u != v and (u, v) in co} - {
            (int(slot_genes[b, x]), int(slot_genes[b, y])) for x, y in before}
        assert len(added) == min(round(0.2 * len(before)), len(candidates))  # alpha * E, fewer if not enough
        for u, v in added:
            gu, gv = int(slot_genes[b, u]), int(slot_genes[b, v])
            assert (gu, gv) in candidates  # both genes are tokens of this cell, and linked by co-expression
        assert (nw[nb == b][[p in added for p in after]] == np.float32(0.9)).all()
    assert round(0.2 * (cell == 2).sum()) > 0  # the 4-token cell has fewer candidates than needed: exact fallback
    # seeded: same generator -> same result; alpha = 0 -> unchanged
    again = perturb_edges(cell, s, d, w, *args, 0.2, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(out, again))
    other = perturb_edges(cell, s, d, w, *args, 0.2, np.random.default_rng(2))
    assert not all(np.array_equal(x, y) for x, y in zip(out, other))
    same = perturb_edges(cell, s, d, w, *args, 0.0, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(same, (cell, s, d, w)))


def test_perturbation_draws_candidates_uniformly():
    """Rejection sampling over co-expression entries gives every candidate link the same chance."""
    a = hand_grn(GENES)
    slot_genes, (cell, s, d, w) = _batch_of_cells(np.random.default_rng(3), n_tokens=(25,))
    table = slot_table(slot_genes, N_GENES)
    args = (table, slot_genes, a.coexpr_indptr, a.coexpr_indices, a.coexpr_data)
    hits = {}
    n_runs = 400
    for seed in range(n_runs):
        nb, ns, nd, _ = perturb_edges(cell, s, d, w, *args, 0.2, np.random.default_rng(seed))
        for e in set(zip(ns.tolist(), nd.tolist())) - set(zip(s.tolist(), d.tolist())):
            hits[e] = hits.get(e, 0) + 1
    co = {(i, int(j)) for i in range(N_GENES) for j in a.coexpr_indices[a.coexpr_indptr[i]:a.coexpr_indptr[i + 1]]}
    genes = slot_genes[0]
    candidates = {(x, y) for x in range(1, 26) for y in range(1, 26)
                  if x != y and (int(genes[x]), int(genes[y])) in co} - set(zip(s.tolist(), d.tolist()))
    assert set(hits) == candidates
    counts = np.array(list(hits.values()))
    k = round(0.2 * len(s))
    expected = n_runs * k / len(counts)
    # all candidates seen, each close to n_runs * k / #candidates (binomial spread)
    assert counts.sum() == n_runs * k
    assert abs(counts.mean() - expected) < 1e-9 and counts.min() > expected / 3 and counts.max() < expected * 2.2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("gstore") / "s")


def assert_graphs_match(b, assets, active, column_of_token):
    """Each cell's graphs equal a direct per-cell computation from the GRN assets (``celltype_edges``,
    ``cell_edges`` = union of active regulons), restricted to the cell's gene tokens. active: (n_cells, R) bool by
    global cell index; column_of_token: dict token id -> store gene column."""
    B, L = b["input_ids"].shape
    got_ct_all = _edges(b["celltype_edge_index"], b["celltype_edge_weight"])
    got_cell_all = _edges(b["cell_edge_index"], b["cell_edge_weight"])
    for i, c in enumerate(b["cell_index"].tolist()):
        slot_of = {column_of_token[int(t)]: l for l, t in enumerate(b["input_ids"][i].tolist())
                   if b["attention_mask"][i, l] and int(t) in column_of_token}
        want_ct, want_cell = set(), set()
        ct = int(b["cell_type_ids"][i])
        if ct >= 0:
            for s, d, w, _ in zip(*assets.celltype_edges(ct)):
                if int(s) in slot_of and int(d) in slot_of:
                    want_ct.add((slot_of[int(s)] + i * L, slot_of[int(d)] + i * L, round(float(w), 4)))
        for s, d, w, _ in zip(*assets.cell_edges(active[c])):
            if int(s) in slot_of and int(d) in slot_of:
                want_cell.add((slot_of[int(s)] + i * L, slot_of[int(d)] + i * L, round(float(w), 4)))
        in_cell = lambda e: i * L <= e[0] < (i + 1) * L
        assert {e for e in got_ct_all if in_cell(e)} == want_ct
        assert {e for e in got_cell_all if in_cell(e)} == want_cell


def test_batch_graphs_match_independent_per_cell_computation(store):
    """Bitsets read with the GRN module's own reader; perturbation off; subsetting on (not every gene a token)."""
    from grnformer_ds.grn import read_grn_assets, read_shard_active_regulons, unpack_active

    a = read_grn_assets(store)
    bits = np.concatenate([read_shard_active_regulons(p) for p in sorted((store / "shards").glob("*.zarr"))])
    ds = _ds(store, edge_perturbation=0.0, max_seq_len=16)
    b = next(iter(ds))
    assert_graphs_match(b, a, unpack_active(bits, a.n_regulons), {j + 3: j for j in range(N_GENES)})
    assert b["cell_edge_index"].shape[1] > 0 and b["celltype_edge_index"].shape[1] > 0


def test_perturbation_in_batches_is_seeded_and_training_only(store):
    plain = next(iter(_ds(store, edge_perturbation=0.0)))
    pert = next(iter(_ds(store, edge_perturbation=0.5)))
    pert2 = next(iter(_ds(store, edge_perturbation=0.5)))
    assert torch.equal(pert["cell_edge_index"], pert2["cell_edge_index"])
    assert pert["cell_edge_index"].shape == plain["cell_edge_index"].shape  # edge count kept
    assert not torch.equal(pert["cell_edge_index"], plain["cell_edge_index"])
    assert torch.equal(pert["celltype_edge_index"], plain["celltype_edge_index"])  # only the cell scale changes
    ev = _ds(store, split="eval", edge_perturbation=0.5)
    ev_plain = _ds(store, split="eval", edge_perturbation=0.0)
    assert torch.equal(next(iter(ev))["cell_edge_index"], next(iter(ev_plain))["cell_edge_index"])
