"""--infer on scanpy's krumsiek11 simulation: known 11-TF network (scanpy/sim_models/krumsiek11.txt)."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import hypergeom

from grnformer_ds.grn.infer import filter_prior_by_expression, grnboost2_edges, pair_correlations

sc = pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def krumsiek():
    """Expression (640 × 11), gene names and the true regulator → target edges of the Boolean model."""
    adata = sc.datasets.krumsiek11()
    genes = list(adata.var_names)
    # The coupling list of scanpy's model file: "target  regulator  coupling"; self-couplings are not edges.
    model = Path(sc.__file__).parent / "sim_models" / "krumsiek11.txt"
    true = set()
    for line in model.read_text().splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+(-?[0-9.]+)\s*$", line)
        if m and not line.startswith("#") and m.group(1) != m.group(2):
            true.add((genes.index(m.group(2)), genes.index(m.group(1))))
    X = np.clip(np.asarray(adata.X, dtype=np.float64), 0, None)  # tiny simulation noise below 0
    return X, genes, true


def _complete_prior(n):
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return pd.DataFrame({"src": [p[0] for p in pairs], "dst": [p[1] for p in pairs], "weight": 1.0,
                         "sign": np.ones(len(pairs), np.int8)})


def test_correlation_inference_recovers_known_edges_better_than_chance(krumsiek):
    X, genes, true = krumsiek
    assert len(true) == 26  # 26 regulator → target pairs in the model (self-loops excluded)
    prior = _complete_prior(len(genes))  # an uninformative prior: every ordered pair
    kept = filter_prior_by_expression(sp.csr_matrix(X), prior, min_expr_frac=0.05, min_abs_corr=0.5)
    edges = set(zip(kept["src"].tolist(), kept["dst"].tolist()))
    hits = len(edges & true)
    base_rate = len(true) / len(prior)
    assert hits / len(edges) > 1.4 * base_rate
    # Probability of at least this many true edges in a random draw of the same size.
    assert hypergeom.sf(hits - 1, len(prior), len(true), len(edges)) < 0.01
    # weight = |r|, sign from r for an unsigned prior
    r = pair_correlations(sp.csr_matrix(X), kept["src"].to_numpy(), kept["dst"].to_numpy())
    np.testing.assert_allclose(kept["weight"], np.abs(r))
    assert (kept["sign"] == np.where(r < 0, -1, 1)).all()


def test_pair_correlations_equal_numpy(krumsiek):
    X = krumsiek[0][:200]
    src, dst = np.array([0, 3, 7]), np.array([1, 9, 2])
    ref = [np.corrcoef(X[:, s], X[:, d])[0, 1] for s, d in zip(src, dst)]
    np.testing.assert_allclose(pair_correlations(sp.csr_matrix(X), src, dst), ref, atol=1e-12)


def test_expression_filter_and_signed_prior():
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(200, 4)).astype(float)
    X[:, 1] = X[:, 0] * 2 + rng.normal(0, 0.1, 200).clip(0)  # strongly correlated with gene 0
    X[:, 3] = 0
    X[:3, 3] = 1  # expressed in 1.5 % of cells only
    prior = pd.DataFrame({"src": [0, 0, 2], "dst": [1, 3, 1], "weight": 1.0, "sign": np.array([-1, 1, 1], np.int8)})
    kept = filter_prior_by_expression(sp.csr_matrix(X), prior, min_expr_frac=0.05, min_abs_corr=0.5)
    assert list(zip(kept["src"], kept["dst"])) == [(0, 1)]
    assert kept["sign"].tolist() == [-1]  # a signed prior keeps its sign


def test_grnboost2_better_than_chance(krumsiek):
    pytest.importorskip("arboreto")
    X, genes, true = krumsiek
    edges = grnboost2_edges(sp.csr_matrix(X), np.arange(len(genes)), genes, top_targets=3, seed=0)
    found = set(zip(edges["src"].tolist(), edges["dst"].tolist()))
    hits = len(found & true)
    assert hits / len(found) > len(true) / 110
    assert hypergeom.sf(hits - 1, 110, len(true), len(found)) < 0.05
