"""scGPT-style tokenization equals scGPT 0.2.4's own preprocessing + tokenize_and_pad_batch on the same cells."""
from __future__ import annotations

import importlib
import sys
import types

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from grnformer_ds.data.binning import bin_nonzero, normalize_log1p
from grnformer_ds.data.cells import CellRows
from grnformer_ds.data.masking import IGNORE_INDEX
from grnformer_ds.data.scgpt_collator import ScGPTCollator

PAD, CLS = 0, 1


def _load_scgpt():
    """Import scgpt.preprocess and scgpt.tokenizer.gene_tokenizer without scgpt/__init__ (which pulls IPython,
    flash-attn, torchtext ...): a bare `scgpt` package object with the real __path__ and a logger, and a small
    stand-in for torchtext.vocab (only `vocab[token]` is used by tokenize_and_pad_batch)."""
    if "scgpt.preprocess" not in sys.modules:
        spec = importlib.util.find_spec("scgpt")
        if spec is None:
            pytest.skip("scgpt==0.2.4 not installed (pip install --no-deps scgpt==0.2.4)")
        import logging

        pkg = types.ModuleType("scgpt")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.logger = logging.getLogger("scGPT-reference")
        sys.modules["scgpt"] = pkg

        class Vocab(dict):
            pass

        tt = types.ModuleType("torchtext")
        tt_vocab = types.ModuleType("torchtext.vocab")
        tt_vocab.Vocab = Vocab
        tt_vocab.vocab = lambda ordered, min_freq=1: Vocab(ordered)
        tt.vocab = tt_vocab
        sys.modules.setdefault("torchtext", tt)
        sys.modules.setdefault("torchtext.vocab", tt_vocab)
    pre = importlib.import_module("scgpt.preprocess")
    tok = importlib.import_module("scgpt.tokenizer.gene_tokenizer")
    return pre, tok, sys.modules["torchtext.vocab"].Vocab


class _LegacyRng:
    """np.random.Generator look-alike drawing from the global np.random stream, as scGPT does. The collator draws
    all binning uniforms first (as scGPT's per-row draws), then its subset / mask uniforms, all via ``random``."""

    def random(self, n):
        return np.random.rand(n)


def _counts(n_cells=40, n_genes=120, seed=0):
    rng = np.random.default_rng(seed)
    # Negative-binomial-like counts: many zeros and many tied small integers (ties exercise _digitize "both").
    lam = rng.gamma(0.3, 4.0, size=(n_cells, n_genes))
    x = rng.poisson(lam).astype(np.float32)
    x[:, 0] += 1  # no all-zero cell
    return x


def _rows(x: np.ndarray) -> CellRows:
    csr = sp.csr_matrix(x)
    return CellRows(
        indptr=csr.indptr.astype(np.int64), indices=csr.indices.astype(np.int32), data=csr.data.astype(np.float32),
        cell_index=np.arange(x.shape[0], dtype=np.int64), cell_type=np.zeros(x.shape[0], dtype=np.int64),
    )


def test_binning_and_tokens_equal_scgpt_reference():
    pre, tok, Vocab = _load_scgpt()
    x = _counts()
    n_genes = x.shape[1]
    gene_token_ids = np.arange(n_genes, dtype=np.int64) + 3

    adata = ad.AnnData(sp.csr_matrix(x))
    np.random.seed(1234)
    pre.Preprocessor(normalize_total=1e4, log1p=True, binning=51)(adata)
    ref_binned = adata.layers["X_binned"]
    vocab = Vocab({"<pad>": PAD, "<cls>": CLS})
    ref = tok.tokenize_and_pad_batch(
        ref_binned, gene_token_ids, max_len=n_genes + 1, vocab=vocab, pad_token="<pad>", pad_value=-2,
        append_cls=True, include_zero_gene=False, cls_token="<cls>",
    )

    collate = ScGPTCollator(gene_token_ids, pad_id=PAD, cls_id=CLS, max_seq_len=n_genes + 1, mask_ratio=0.0)
    np.random.seed(1234)  # same tie-breaking uniforms, drawn per cell in the same order
    batch, slot_genes = collate(_rows(x), _LegacyRng())

    assert (ref_binned[x > 0] >= 1).all() and len(np.unique(ref_binned)) > 10  # the reference did real binning
    L = batch["input_ids"].shape[1]
    assert L == ref["genes"].shape[1]
    assert torch.equal(batch["input_ids"], ref["genes"])
    assert torch.equal(batch["values"], ref["values"].float())
    assert torch.equal(batch["attention_mask"], ref["genes"] != PAD)
    assert (batch["labels"] == IGNORE_INDEX).all()
    # slot_genes maps every gene slot back to its store column
    real = slot_genes >= 0
    assert torch.equal(torch.from_numpy(gene_token_ids[slot_genes[real]]), batch["input_ids"][torch.from_numpy(real)])


def test_bin_nonzero_equals_scgpt_binning_function():
    pre, _, _ = _load_scgpt()
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 50, 400):
        counts = rng.poisson(2.0, size=n).astype(np.float32) + 1
        values = normalize_log1p(counts)
        row = np.concatenate([values, np.zeros(5, np.float32)])  # binning() handles zeros separately
        np.random.seed(n)
        ref = pre.binning(row, n_bins=51)[:n]
        np.random.seed(n)
        ours = bin_nonzero(values, 51, np.random.rand(n))
        np.testing.assert_array_equal(ours, ref)
        assert ours.min() >= 1 and ours.max() <= 50


def test_quantile_edges_equal_numpy_quantile_bit_for_bit():
    from grnformer_ds.data.binning import quantile_edges

    rng = np.random.default_rng(11)
    # sizes where (n - 1) * k / 49 is often an integer (exact order statistics) or not; heavy ties from counts
    for n in list(range(1, 120)) + [148, 197, 246, 491, 1000, 2451]:
        counts = rng.poisson(rng.uniform(0.3, 5), size=n).astype(np.float32) + 1
        values = normalize_log1p(counts, total=float(counts.sum()) + rng.integers(0, 50))
        for n_bins in (51, 11, 3):
            ref = np.quantile(values, np.linspace(0, 1, n_bins - 1))
            ours = quantile_edges(values, n_bins)
            assert ours.dtype == ref.dtype and np.array_equal(ours, ref), (n, n_bins)


def test_long_cells_keep_a_random_subset_with_their_own_bins():
    pre, _, _ = _load_scgpt()
    x = _counts(n_cells=8, n_genes=300, seed=1)
    gene_token_ids = np.arange(300, dtype=np.int64) + 3
    adata = ad.AnnData(sp.csr_matrix(x))
    # With the same uniforms, our bins equal scGPT's for every gene, before any subsetting.
    np.random.seed(7)
    pre.Preprocessor(normalize_total=1e4, log1p=True, binning=51)(adata)
    ref_binned = adata.layers["X_binned"]

    collate = ScGPTCollator(gene_token_ids, pad_id=PAD, cls_id=CLS, max_seq_len=33, mask_ratio=0.0)
    rows = _rows(x)
    # reproduce scGPT's uniform draws for binning (drawn first), the subset comes from later draws
    np.random.seed(7)
    batch, slot = collate(rows, _LegacyRng())
    assert batch["input_ids"].shape == (8, 33)
    for b in range(8):
        cols = slot[b, 1:]
        assert (cols >= 0).all() and len(set(cols.tolist())) == 32
        assert (x[b, cols] > 0).all()  # only expressed genes
        np.testing.assert_array_equal(batch["values"][b, 1:].numpy(), ref_binned[b, cols].astype(np.float32))
        assert batch["values"][b, 0] == 0 and batch["input_ids"][b, 0] == CLS


def test_masking_exact_count_labels_and_determinism():
    x = _counts(n_cells=16, n_genes=200, seed=2)
    gene_token_ids = np.arange(200, dtype=np.int64) + 3
    collate = ScGPTCollator(gene_token_ids, pad_id=PAD, cls_id=CLS, max_seq_len=101, mask_ratio=0.4)
    b1, _ = collate(_rows(x), np.random.default_rng(5))
    b2, _ = collate(_rows(x), np.random.default_rng(5))
    b3, _ = collate(_rows(x), np.random.default_rng(6))
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    assert not torch.equal(b1["values"], b3["values"])
    unmasked, _ = ScGPTCollator(gene_token_ids, pad_id=PAD, cls_id=CLS, max_seq_len=101, mask_ratio=0.0)(
        _rows(x), np.random.default_rng(5))
    masked = b1["values"] == -1
    for b in range(16):
        n_genes = int(b1["attention_mask"][b].sum()) - 1
        assert int(masked[b].sum()) == int(n_genes * 0.4)
    assert not masked[:, 0].any() and not masked[~b1["attention_mask"]].any()  # never <cls> or padding
    assert torch.equal(b1["labels"][masked], unmasked["values"][masked])  # same uniforms drawn first -> same bins
    assert (b1["labels"][~masked] == IGNORE_INDEX).all()
    assert (b1["values"][~b1["attention_mask"]] == -2).all()
    assert b1["values"].dtype == torch.float32 and b1["input_ids"].dtype == torch.int64
    assert b1["attention_mask"].dtype == torch.bool


def test_scfoundation_encoder_decoder_inputs():
    from grnformer_ds.data.scfoundation_collator import ScFoundationCollator

    x = _counts(n_cells=6, n_genes=50, seed=4)
    ids = np.arange(50, dtype=np.int64) + 3
    collate = ScFoundationCollator(ids, pad_id=PAD, mask_ratio=0.3, mask_value=-1.0)
    b, slot = collate(_rows(x), np.random.default_rng(0))
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    np.testing.assert_allclose(b["total_counts"].numpy(), np.log10(x.sum(1))[:, None].repeat(2, 1), rtol=1e-6)
    assert torch.equal(b["decoder_input_ids"], torch.from_numpy(ids).expand(6, 50))
    dec, lab = b["decoder_values"].numpy(), b["labels"].numpy()
    for i in range(6):
        nz = x[i] > 0
        masked = dec[i] == -1
        assert masked.sum() == int(nz.sum() * 0.3) and not (masked & ~nz).any()
        np.testing.assert_allclose(lab[i][masked], expected[i][masked], rtol=1e-6)
        assert (lab[i][~masked] == IGNORE_INDEX).all()
        np.testing.assert_allclose(dec[i][nz & ~masked], expected[i][nz & ~masked], rtol=1e-6)
        assert (dec[i][~nz] == 0).all()
        # encoder: exactly the nonzero unmasked genes, in column order, with their values
        enc = slot[i][slot[i] >= 0]
        np.testing.assert_array_equal(enc, np.flatnonzero(nz & ~masked))
        np.testing.assert_allclose(b["values"][i, :len(enc)].numpy(), expected[i][enc], rtol=1e-6)
        assert torch.equal(b["input_ids"][i, :len(enc)], torch.from_numpy(ids[enc]))
        assert not b["attention_mask"][i, len(enc):].any() and (b["input_ids"][i, len(enc):] == PAD).all()

    down_collate = ScFoundationCollator(ids, pad_id=PAD, mask_ratio=0.0, downsample_prob=1.0)
    down = down_collate(_rows(x), np.random.default_rng(0))[0]
    t, s = down["total_counts"][:, 0], down["total_counts"][:, 1]
    assert torch.allclose(t, torch.from_numpy(np.log10(x.sum(1)).astype(np.float32)))
    assert (s <= t).all() and (s < t).any()  # S = log10 of the down-sampled total


def test_bin_batch_equals_per_cell_binning():
    """The batched binning of the collator gives the per-cell `bin_nonzero` bins bit for bit (raw counts, empty and
    one-gene cells, and non-integer values through the fallback)."""
    from grnformer_ds.data.binning import bin_batch

    rng = np.random.default_rng(3)
    for trial in range(60):
        lens = rng.integers(0, 400, rng.integers(1, 30))
        lens[rng.random(len(lens)) < 0.15] = 1
        indptr = np.r_[0, np.cumsum(lens)].astype(np.int64)
        counts = rng.geometric(rng.uniform(0.05, 0.9), indptr[-1]).astype(np.float32)
        if trial % 5 == 0:
            counts = (rng.gamma(0.5, 3.0, indptr[-1]) + 0.01).astype(np.float32)
        uniforms = rng.random(indptr[-1])
        n_bins = int(rng.choice([3, 11, 51]))
        expected = np.concatenate([np.zeros(0, np.int64)] + [
            bin_nonzero(normalize_log1p(counts[a:b]), n_bins, uniforms[a:b]) for a, b in zip(indptr[:-1], indptr[1:])])
        assert np.array_equal(bin_batch(indptr, counts, n_bins, uniforms), expected)
