"""AUCell must equal pySCENIC/ctxcore's on the same input (rankings with seeded ties, cutoff, normalisation)."""
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from grnformer_ds.grn.aucell import RegulonMatrix, aucell, rank_cutoff, tie_break_order

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
pyscenic_aucell = pytest.importorskip("pyscenic.aucell")
ctx_genesig = pytest.importorskip("ctxcore.genesig")
ctx_recovery = pytest.importorskip("ctxcore.recovery")


def _problem(n=150, n_genes=300, n_reg=12, seed=0, negative=False):
    rng = np.random.default_rng(seed)
    X = rng.poisson(0.4, size=(n, n_genes)).astype(np.float32)  # many tied zeros and ones
    X[:4] = 0  # empty cells: the ranking is the tie-break permutation alone
    X[4, :3] = 2.0  # a cell with fewer expressed genes than the cutoff
    if negative:
        X = X - rng.uniform(0, 0.5, size=X.shape).astype(np.float32) * (X == 0)
    genes = [f"g{i}" for i in range(n_genes)]
    sigs, indptr, members, weights = [], [0], [], []
    for r in range(n_reg):
        m = np.sort(rng.choice(n_genes, size=int(rng.integers(2, 40)), replace=False))
        w = rng.uniform(0.1, 3.0, len(m))
        sigs.append(ctx_genesig.GeneSignature(name=f"r{r}", gene2weight=dict(zip([genes[i] for i in m], w))))
        members.extend(m), weights.extend(w), indptr.append(len(members))
    frame = pd.DataFrame(X, columns=genes, index=[f"c{i}" for i in range(n)])
    return X, frame, sigs, np.array(indptr), np.array(members), np.array(weights)


def _reference(frame, sigs, seed, weighted):
    ref = pyscenic_aucell.aucell(frame, sigs, seed=seed, num_workers=1, noweights=not weighted)
    # pySCENIC's unstack sorts cells by name: put them back in input order.
    return ref.loc[frame.index, [s.name for s in sigs]].to_numpy()


@pytest.mark.parametrize("seed,weighted", [(0, False), (7, True)])
def test_aucell_equals_pyscenic(seed, weighted):
    X, frame, sigs, indptr, members, weights = _problem(seed=seed)
    regs = RegulonMatrix.from_csr(indptr, members, X.shape[1], weights=weights if weighted else None)
    ref = _reference(frame, sigs, seed, weighted)
    for block_size, workers in ((1000, 1), (17, 1), (40, 2)):  # result independent of blocks and workers
        ours = aucell(sp.csr_matrix(X), regs, seed=seed, block_size=block_size, n_workers=workers)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert ref.max() > 0.2 and (ref == 0).any()  # the comparison covers both signal and empty recovery


def test_aucell_with_negative_values_equals_pyscenic():
    """Scaled data (negative values) takes the dense path; same definition."""
    X, frame, sigs, indptr, members, _ = _problem(n=40, seed=3, negative=True)
    regs = RegulonMatrix.from_csr(indptr, members, X.shape[1])
    np.testing.assert_allclose(aucell(X, regs, seed=3, block_size=16), _reference(frame, sigs, 3, False), atol=1e-6)


def test_ranking_rules_match_pyscenic():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.poisson(0.5, size=(5, 50)).astype(float), columns=[f"g{i}" for i in range(50)])
    shuffled = frame.sample(frac=1.0, replace=False, axis=1, random_state=11)
    assert shuffled.columns.tolist() == [f"g{i}" for i in tie_break_order(50, 11)]
    for n_genes, a in ((300, 0.05), (765, 0.05), (20000, 0.05), (1000, 0.2)):
        assert rank_cutoff(n_genes, a) == ctx_recovery.derive_rank_cutoff(a, n_genes)
    with pytest.raises(ValueError):
        rank_cutoff(10, 0.01)  # keeps no gene


def test_packed_sort_key_equals_lexsort():
    from grnformer_ds.grn.aucell import _row_major_order

    rng = np.random.default_rng(5)
    row = np.sort(rng.integers(0, 50, 5000))
    value = rng.integers(0, 4, 5000).astype(np.float32) * 0.5  # many ties
    position = rng.permutation(5000)
    ref = np.lexsort((position, -value, row))
    np.testing.assert_array_equal(_row_major_order(row, value, position, 50, 5000), ref)
    np.testing.assert_array_equal(_row_major_order(row, value, position, 50, 1 << 40), ref)  # lexsort fallback


def test_regulon_matrix_rejects_bad_regulons():
    with pytest.raises(ValueError, match="same gene twice"):
        RegulonMatrix.from_csr(np.array([0, 2]), np.array([3, 3]), 100)
    with pytest.raises(ValueError, match="positive weight"):
        RegulonMatrix.from_csr(np.array([0, 1]), np.array([3]), 100, weights=np.array([0.0]))
