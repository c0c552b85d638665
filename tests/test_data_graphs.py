"""Graph restriction, PyG batching and edge perturbation on hand-made GRNs, the numba kernels against the numpy
reference (``graphs_reference`` / ``perturb_reference``) on random GRNs, and the graphs of real batches against an
independent per-cell computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_stream import N_GENES, _ds, hand_grn, make_store

from grnformer_ds.data import graphs_reference
from grnformer_ds.data.graphs import GraphBuilder, unique_per_row
from grnformer_ds.data.graphs_reference import slot_table
from grnformer_ds.data.perturb import perturb_edges
from grnformer_ds.data.perturb_reference import perturb_edges as perturb_edges_reference

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


def _numba_perturb(cell, s, d, w, slot_genes, a, alpha, rng):
    return perturb_edges(cell, s, d, w, slot_genes, a.coexpr_indptr, a.coexpr_indices, a.coexpr_data, alpha, rng)


def _reference_perturb(cell, s, d, w, slot_genes, a, alpha, rng):
    return perturb_edges_reference(cell, s, d, w, slot_table(slot_genes, a.n_genes), slot_genes, a.coexpr_indptr,
                                   a.coexpr_indices, a.coexpr_data, alpha, rng)


PERTURB = pytest.mark.parametrize("perturb", [_numba_perturb, _reference_perturb], ids=["numba", "reference"])


@PERTURB
def test_perturbation_keeps_count_and_adds_only_coexpressed_links_of_the_cell(perturb):
    a = hand_grn(GENES)
    co = {(i, int(j)) for i in range(N_GENES) for j in a.coexpr_indices[a.coexpr_indptr[i]:a.coexpr_indptr[i + 1]]}
    slot_genes, (cell, s, d, w) = _batch_of_cells(np.random.default_rng(0))
    out = perturb(cell, s, d, w, slot_genes, a, 0.2, np.random.default_rng(1))
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
    again = perturb(cell, s, d, w, slot_genes, a, 0.2, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(out, again))
    other = perturb(cell, s, d, w, slot_genes, a, 0.2, np.random.default_rng(2))
    assert not all(np.array_equal(x, y) for x, y in zip(out, other))
    same = perturb(cell, s, d, w, slot_genes, a, 0.0, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(same, (cell, s, d, w)))


@PERTURB
def test_perturbation_draws_candidates_uniformly(perturb):
    """Rejection sampling over co-expression entries, completed by enumeration, gives every candidate link the same
    chance."""
    a = hand_grn(GENES)
    slot_genes, (cell, s, d, w) = _batch_of_cells(np.random.default_rng(3), n_tokens=(25,))
    hits = {}
    n_runs = 400
    for seed in range(n_runs):
        nb, ns, nd, _ = perturb(cell, s, d, w, slot_genes, a, 0.2, np.random.default_rng(seed))
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


def random_grn(rng, n_genes=300, n_regulons=60, n_types=3, coexpr_degree=12):
    """Random GRN assets: several regulons per TF with overlapping targets and tied |weights| (the union's dedup and
    tie rule), cell-type GRNs with repeated edges, a random co-expression graph (one entry per (u, v))."""
    import scipy.sparse as sp

    from grnformer_ds.grn import GRNAssets

    a = GRNAssets.empty([f"g{j}" for j in range(n_genes)], [f"t{c}" for c in range(n_types)])
    a.regulon_names = np.array([f"r{r}" for r in range(n_regulons)])
    a.regulon_tf = rng.integers(0, n_genes // 10, n_regulons).astype(np.int32)  # ~2 regulons per TF
    targets = [rng.choice(n_genes // 3, rng.integers(0, 40), replace=False) for _ in range(n_regulons)]
    a.regulon_indptr = np.r_[0, np.cumsum([len(t) for t in targets])].astype(np.int64)
    a.regulon_target = np.concatenate(targets).astype(np.int32)
    a.regulon_weight = rng.choice(np.array([0.1, -0.1, 0.2, -0.3, 0.05], np.float32), len(a.regulon_target))
    a.regulon_sign = np.sign(a.regulon_weight).astype(np.int8)
    sizes = rng.integers(0, 400, n_types)
    a.celltype_indptr = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    a.celltype_src = rng.integers(0, n_genes // 5, sizes.sum()).astype(np.int32)
    a.celltype_dst = rng.integers(0, n_genes // 2, sizes.sum()).astype(np.int32)
    a.celltype_weight = rng.random(sizes.sum()).astype(np.float32)
    a.celltype_sign = np.ones(sizes.sum(), np.int8)
    co = sp.random(n_genes, n_genes, density=coexpr_degree / n_genes, random_state=int(rng.integers(1 << 30)),
                   format="csr", dtype=np.float32)
    co.setdiag(0)
    co.eliminate_zeros()
    a.coexpr_indptr, a.coexpr_indices, a.coexpr_data = co.indptr.astype(np.int64), co.indices.astype(np.int32), co.data
    return a


def random_batch(rng, a, n_cells=24, seq_len=60):
    """slot_genes (B, L) with <cls> at 0, padding, some cells without tokens; cell types incl. unknown (-1, C);
    packed active-regulon bits incl. cells with none active."""
    slot_genes = np.full((n_cells, seq_len), -1, np.int64)
    for b in range(n_cells):
        n = int(rng.integers(0, seq_len)) if b % 7 else 0
        slot_genes[b, 1:n + 1] = rng.choice(a.n_genes // 2, n, replace=False)
    cell_type = rng.integers(-1, a.n_celltypes + 1, n_cells)
    active = rng.random((n_cells, a.n_regulons)) < rng.random((n_cells, 1))
    return slot_genes, cell_type, np.packbits(active, axis=1, bitorder="little")


def _per_cell(index, weight, seq_len):
    """{cell: sorted [(src slot, dst slot, weight)]}; asserts the PyG layout (both ends in one cell, cells in order)."""
    index, weight = index.numpy(), weight.numpy()
    cell = index[0] // seq_len
    assert (index[1] // seq_len == cell).all() and (np.diff(cell) >= 0).all()
    out = {}
    for c, s, d, w in zip(cell.tolist(), (index[0] % seq_len).tolist(), (index[1] % seq_len).tolist(), weight):
        out.setdefault(c, []).append((s, d, float(w)))
    return {c: sorted(v) for c, v in out.items()}


@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_numpy_reference_on_random_grns(seed):
    rng = np.random.default_rng(seed)
    a = random_grn(rng)
    builder = GraphBuilder(a, alpha=0.3)
    slot_genes, cell_type, bits = random_batch(rng, a)
    L = slot_genes.shape[1]
    got = builder(slot_genes, cell_type, bits, None, perturb=False)
    want = graphs_reference.build_graphs(a, slot_genes, cell_type, bits, 0.3, None, False)
    for key in ("celltype", "cell"):
        index, weight = got[f"{key}_edge_index"], got[f"{key}_edge_weight"]
        assert index.dtype == torch.int64 and weight.dtype == torch.float32 and index.shape == (2, len(weight))
        assert _per_cell(index, weight, L) == _per_cell(want[f"{key}_edge_index"], want[f"{key}_edge_weight"], L)
    assert got["cell_edge_index"].shape[1] > 0 and got["celltype_edge_index"].shape[1] > 0
    for key in ("batch", "ptr"):
        assert torch.equal(got[key], want[key])
    # perturbed: same edges per cell, deterministic in the generator, the cell-type scale untouched
    p1 = builder(slot_genes, cell_type, bits, np.random.default_rng(5), perturb=True)
    p2 = builder(slot_genes, cell_type, bits, np.random.default_rng(5), perturb=True)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert torch.equal(p1["celltype_edge_index"], got["celltype_edge_index"])
    before, after = _per_cell(got["cell_edge_index"], got["cell_edge_weight"], L), \
        _per_cell(p1["cell_edge_index"], p1["cell_edge_weight"], L)
    assert {c: len(v) for c, v in before.items()} == {c: len(v) for c, v in after.items()}
    assert before != after


def test_union_keeps_a_target_listed_twice_in_one_regulon_once():
    a = hand_grn(GENES)  # regulon 0 = TF 0 -> 1..5: list target 3 again, stronger
    a.regulon_target = np.insert(a.regulon_target, 5, 3).astype(np.int32)
    a.regulon_weight = np.insert(a.regulon_weight, 5, -0.7).astype(np.float32)
    a.regulon_sign = np.insert(a.regulon_sign, 5, -1).astype(np.int8)
    a.regulon_indptr = np.r_[0, a.regulon_indptr[1:] + 1].astype(np.int64)
    ptr, idx, w = unique_per_row(a.regulon_indptr, a.regulon_target, a.regulon_weight)
    assert ptr.tolist() == np.r_[0, np.arange(1, 7) * 5].tolist() and idx[:5].tolist() == [1, 2, 4, 5, 3]
    assert w[4] == np.float32(-0.7) and np.array_equal(idx[5:], a.regulon_target[6:])  # the strongest copy stays
    slot_genes = np.array([[-1, 0, 1, 3, 4, -1]])
    g = GraphBuilder(a, alpha=0.0)(slot_genes, np.array([-1]), np.packbits([[1, 0, 0, 0, 0, 0]], axis=1,
                                                                            bitorder="little"), None, False)
    src, dst, w, _ = a.cell_edges(np.array([0]))  # the GRN module's own union rule
    slot = {0: 1, 1: 2, 3: 3, 4: 4}
    want = {(slot[int(x)], slot[int(y)], round(float(v), 4)) for x, y, v in zip(src, dst, w) if int(y) in slot}
    assert _edges(g["cell_edge_index"], g["cell_edge_weight"]) == want and len(want) == 3


def test_numba_perturbation_uniform_when_rejection_alone_suffices():
    """A large cell: the rejection proposals find all k links (no enumeration); the hits of the candidates over many
    seeds pass a chi-square test against the uniform distribution."""
    rng = np.random.default_rng(0)
    a = random_grn(rng, n_genes=2000, coexpr_degree=10)
    L = 402
    slot_genes = np.full((1, L), -1, np.int64)
    slot_genes[0, 1:401] = rng.choice(a.n_genes, 400, replace=False)
    key = np.unique(rng.integers(1, 401, 50) * 1000 + rng.integers(1, 401, 50))
    key = key[key // 1000 != key % 1000]
    s, d = key // 1000, key % 1000
    cell, w = np.zeros(len(s), np.int64), np.full(len(s), 0.5, np.float32)
    tok = {int(g): l for l, g in enumerate(slot_genes[0]) if g >= 0}
    co = a.coexpr_csr()
    candidates = sorted({(tok[u], tok[int(v)]) for u in tok for v in co.indices[co.indptr[u]:co.indptr[u + 1]]
                         if int(v) in tok and int(v) != u} - set(zip(s.tolist(), d.tolist())))
    k = round(0.2 * len(s))
    assert len(candidates) > 20 * k  # expected proposals ~ k / acceptance, far below the budget (entries / 16)
    hits = dict.fromkeys(candidates, 0)
    n_runs = 1500
    for seed in range(n_runs):
        _, ns, nd, _ = perturb_edges(cell, s, d, w, slot_genes, a.coexpr_indptr, a.coexpr_indices, a.coexpr_data,
                                     0.2, np.random.default_rng(seed))
        added = set(zip(ns.tolist(), nd.tolist())) - set(zip(s.tolist(), d.tolist()))
        assert len(added) == k
        for e in added:
            hits[e] += 1
    counts = np.array(list(hits.values()), np.float64)
    expected = n_runs * k / len(candidates)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(candidates) - 1
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof), (chi2, dof)


def test_batch_perturbation_adds_only_coexpressed_links_of_each_cell(store):
    """Real batches: per cell, the perturbed graph has the unperturbed edge count; the new edges are co-expression
    links between two different token genes of the cell, with their co-expression weight."""
    from grnformer_ds.grn import read_grn_assets

    a = read_grn_assets(store)
    co = a.coexpr_csr().todok()
    plain = next(iter(_ds(store, edge_perturbation=0.0)))
    pert = next(iter(_ds(store, edge_perturbation=0.3)))
    B, L = plain["input_ids"].shape
    before = _per_cell(plain["cell_edge_index"], plain["cell_edge_weight"], L)
    after = _per_cell(pert["cell_edge_index"], pert["cell_edge_weight"], L)
    n_added = 0
    for b in range(B):
        col = {l: int(t) - 3 for l, t in enumerate(plain["input_ids"][b].tolist()) if plain["attention_mask"][b, l]
               and int(t) >= 3}
        old, new = before.get(b, []), after.get(b, [])
        assert len(old) == len(new) and len({e[:2] for e in new}) == len(new)
        added = set(new) - set(old)
        assert len(added) == len(set(old) - set(new))
        for s, d, w in added:
            assert s in col and d in col and col[s] != col[d] and co[col[s], col[d]] == np.float32(w)
        n_added += len(added)
    assert n_added > 0


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

        def in_cell(e):
            return i * L <= e[0] < (i + 1) * L

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
