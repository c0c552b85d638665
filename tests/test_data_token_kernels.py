"""The tokenization kernels equal their plain-numpy references, and the batch-wide subset / mask draw scheme gives
exact counts and uniformly random choices."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from grnformer_ds.data.binning import bin_batch, bin_batch_numpy, bin_nonzero, normalize_log1p, normalize_log1p_batch
from grnformer_ds.data.binning_kernels import TIE_TABLE_SIZE, bin_rows
from grnformer_ds.data.cells import CellRows
from grnformer_ds.data.masking import DROPPED, KEPT, MASKED, draw_partition, partition_numpy


def _batch(rng, kind):
    lens = rng.integers(0, 700, rng.integers(1, 25))
    lens[rng.random(len(lens)) < 0.15] = 1
    indptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
    nnz = int(indptr[-1])
    if kind == "counts":  # heavy ties: the per-count path
        counts = rng.geometric(rng.uniform(0.002, 0.9), nnz).astype(np.float32)
    elif kind == "large":  # counts beyond the tie table: the sort path for those rows
        counts = rng.geometric(0.3, nnz).astype(np.float32)
        counts[rng.random(nnz) < 0.05] += TIE_TABLE_SIZE
    else:  # non-integer values: per-row numpy normalisation, sort path
        counts = (rng.gamma(0.5, 3.0, nnz) + 0.01).astype(np.float32)
    return indptr, counts


@pytest.mark.parametrize("kind", ["counts", "large", "real"])
def test_bin_batch_kernel_equals_numpy_reference_and_quantiles(kind):
    rng = np.random.default_rng({"counts": 0, "large": 1, "real": 2}[kind])
    for _ in range(25):
        indptr, counts = _batch(rng, kind)
        uniforms = rng.random(int(indptr[-1]))
        n_bins = int(rng.choice([3, 11, 51]))
        edges = np.full((len(indptr) - 1, n_bins - 1), np.nan)
        got = bin_batch(indptr, counts, n_bins, uniforms, edges_out=edges)
        assert np.array_equal(got, bin_batch_numpy(indptr, counts, n_bins, uniforms))
        for r, (a, b) in enumerate(zip(indptr[:-1], indptr[1:])):
            if b > a:
                values = normalize_log1p(counts[a:b])
                assert np.array_equal(edges[r], np.quantile(values, np.linspace(0, 1, n_bins - 1)))
                assert np.array_equal(got[a:b], bin_nonzero(values, n_bins, uniforms[a:b]))


def test_tie_path_equals_sort_path():
    """The per-count path and the sort path (the reference algorithm) give the same bins and edges."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        indptr, counts = _batch(rng, "counts")
        values, largest = normalize_log1p_batch(indptr, counts)
        assert largest < TIE_TABLE_SIZE
        uniforms = rng.random(len(values))
        q = np.linspace(0, 1, 50)
        out = [np.zeros(len(values), np.int64) for _ in range(2)]
        edges = [np.zeros((len(indptr) - 1, 50)) for _ in range(2)]
        for k, ties in enumerate((True, False)):
            bin_rows(indptr, values, counts, uniforms, q, ties, out[k], edges[k])
        assert np.array_equal(out[0], out[1]) and np.array_equal(edges[0], edges[1])


def test_normalize_log1p_batch_equals_per_row():
    rng = np.random.default_rng(6)
    for kind in ("counts", "large", "real"):
        indptr, counts = _batch(rng, kind)
        values, _ = normalize_log1p_batch(indptr, counts)
        expected = [normalize_log1p(counts[a:b]) for a, b in zip(indptr[:-1], indptr[1:])]
        assert np.array_equal(values, np.concatenate([np.zeros(0, np.float32)] + expected))


def _partition_case(rng, n_cells=200):
    lens = rng.integers(0, 60, n_cells)
    indptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
    n_drop = np.where(rng.random(n_cells) < 0.5, (lens * rng.random(n_cells)).astype(np.int64), 0)
    n_mask = ((lens - n_drop) * rng.uniform(0, 0.9, n_cells)).astype(np.int64)
    return indptr, n_mask, n_drop


def test_partition_kernel_equals_reference_with_exact_counts():
    rng = np.random.default_rng(7)
    indptr, n_mask, n_drop = _partition_case(rng)
    state = draw_partition(indptr, n_mask, n_drop, np.random.default_rng(3))
    # the same uniforms, as the kernel consumes them: one draw for the batch, cells in order
    uniforms = np.random.default_rng(3).random(int((n_mask + n_drop).sum()))
    d = 0
    for b, (a, e) in enumerate(zip(indptr[:-1], indptr[1:])):
        k = int(n_mask[b] + n_drop[b])
        ref = partition_numpy(int(e - a), int(n_mask[b]), int(n_drop[b]), uniforms[d:d + k])
        d += k
        assert np.array_equal(state[a:e], ref)
        assert (ref == MASKED).sum() == n_mask[b] and (ref == DROPPED).sum() == n_drop[b]
    assert np.array_equal(state, draw_partition(indptr, n_mask, n_drop, np.random.default_rng(3)))


def test_partition_is_uniform_over_ordered_partitions():
    """n=6 genes, 2 masked, 2 dropped: each of the 6!/(2!2!2!) = 90 (masked, dropped) assignments equally likely
    (chi-square), so the kept set is a uniform subset and the masked set a uniform subset of the kept."""
    n, n_mask, n_drop, n_cells = 6, 2, 2, 90 * 400
    indptr = np.arange(n_cells + 1, dtype=np.int64) * n
    state = draw_partition(indptr, np.full(n_cells, n_mask), np.full(n_cells, n_drop), np.random.default_rng(11))
    state = state.reshape(n_cells, n)
    assert ((state == MASKED).sum(1) == n_mask).all() and ((state == DROPPED).sum(1) == n_drop).all()
    codes = (state.astype(np.int64) * 3 ** np.arange(n)).sum(1)
    all_codes = sorted({sum(s * 3 ** i for i, s in enumerate(p))
                        for p in itertools.permutations([KEPT] * 2 + [MASKED] * 2 + [DROPPED] * 2)})
    assert len(all_codes) == 90
    freq = np.array([(codes == c).sum() for c in all_codes])
    assert freq.sum() == n_cells  # nothing outside the 90 assignments
    assert stats.chisquare(freq).pvalue > 1e-3


def test_scgpt_collator_subset_and_mask_uniform_per_gene():
    """Many copies of one 40-gene cell, max_seq_len 21 (20 genes kept), mask_ratio 0.25 (5 masked): every gene is
    kept with probability 1/2 and masked with probability 1/8, exactly 20 kept and 5 masked per cell."""
    from grnformer_ds.data.scgpt_collator import ScGPTCollator

    n_cells, n_genes = 4000, 40
    x = sp.csr_matrix(np.tile(np.arange(1, n_genes + 1, dtype=np.float32) % 7 + 1, (n_cells, 1)))
    rows = CellRows(indptr=x.indptr.astype(np.int64), indices=x.indices.astype(np.int32), data=x.data,
                    cell_index=np.arange(n_cells), cell_type=np.zeros(n_cells, np.int64))
    collate = ScGPTCollator(np.arange(n_genes) + 3, pad_id=0, cls_id=1, max_seq_len=21, mask_ratio=0.25)
    batch, slot = collate(rows, np.random.default_rng(0))
    kept = np.zeros((n_cells, n_genes), bool)
    masked = np.zeros((n_cells, n_genes), bool)
    r = np.repeat(np.arange(n_cells), 20)
    kept[r, slot[:, 1:].ravel()] = True
    masked[r, slot[:, 1:].ravel()] = (batch["values"][:, 1:] == -1).numpy().ravel()
    assert (kept.sum(1) == 20).all() and (masked.sum(1) == 5).all()
    assert (np.diff(slot[:, 1:], axis=1) > 0).all()  # kept genes in column order
    for counts, p in ((kept.sum(0), 0.5), (masked.sum(0), 0.125)):
        assert stats.chisquare(counts, np.full(n_genes, counts.sum() / n_genes)).pvalue > 1e-3
        assert abs(counts.mean() / n_cells - p) < 1e-12
    # labels (a bin >= 1) exactly at the masked slots
    labels = batch["labels"][:, 1:].numpy()
    assert ((labels >= 1) == (batch["values"][:, 1:].numpy() == -1)).all()


def test_scfoundation_encoder_subset_of_unmasked():
    from grnformer_ds.data.scfoundation_collator import ScFoundationCollator

    rng = np.random.default_rng(8)
    x = sp.random(30, 80, density=0.5, random_state=1, data_rvs=lambda k: rng.integers(1, 9, k)).tocsr()
    x = x.astype(np.float32)
    rows = CellRows(indptr=x.indptr.astype(np.int64), indices=x.indices.astype(np.int32), data=x.data,
                    cell_index=np.arange(30), cell_type=np.zeros(30, np.int64))
    collate = ScFoundationCollator(np.arange(80) + 3, pad_id=0, max_seq_len=16, mask_ratio=0.3)
    b, slot = collate(rows, np.random.default_rng(0))
    dec = b["decoder_values"].numpy()
    for i in range(30):
        nz = x[i].toarray()[0] > 0
        n_mask = int(nz.sum() * 0.3)
        masked = dec[i] == -1
        assert masked.sum() == n_mask and not (masked & ~nz).any()
        enc = slot[i][slot[i] >= 0]
        assert len(enc) == min(16, nz.sum() - n_mask) and (np.diff(enc) > 0).all()
        assert nz[enc].all() and not masked[enc].any()
        assert np.array_equal(b["attention_mask"][i].numpy(), slot[i] >= 0)
