"""Regulon thresholds: GMM intersection when bimodal, µ + 2σ otherwise, overrides."""
import numpy as np
import pytest
from scipy.stats import norm

from grnformer_ds.errors import UserInputError
from grnformer_ds.grn.thresholds import derive_threshold, derive_thresholds, gmm_intersection, parse_threshold_overrides


def test_gmm_intersection_analytic():
    # Equal weights and widths: the densities cross half-way.
    assert gmm_intersection(np.array([0.5, 0.5]), np.array([0.1, 0.5]), np.array([0.05, 0.05])) == pytest.approx(0.3)
    w, m, s = np.array([0.8, 0.2]), np.array([0.05, 0.3]), np.array([0.02, 0.05])
    x = gmm_intersection(w, m, s)
    assert m[0] < x < m[1]
    assert w[0] * norm.pdf(x, m[0], s[0]) == pytest.approx(w[1] * norm.pdf(x, m[1], s[1]), rel=1e-6)


def test_bimodal_distribution_uses_gmm_intersection():
    rng = np.random.default_rng(0)
    off = rng.normal(0.05, 0.02, 4000)
    on = rng.normal(0.30, 0.04, 1000)
    t = derive_threshold(np.r_[off, on], seed=0)
    assert t.method == "gmm"
    expected = gmm_intersection(np.array([0.8, 0.2]), np.array([0.05, 0.30]), np.array([0.02, 0.04]))
    assert t.value == pytest.approx(expected, abs=0.01)
    active = np.r_[off, on] > t.value
    assert active[:4000].mean() < 0.01 and active[4000:].mean() > 0.99


def test_unimodal_distribution_uses_mean_plus_two_sd():
    x = np.random.default_rng(1).normal(0.1, 0.02, 5000)
    t = derive_threshold(x, seed=0)
    assert t.method == "mean_sd"
    assert t.value == pytest.approx(x.mean() + 2 * x.std())
    assert derive_threshold(x, method="mean_sd").value == pytest.approx(x.mean() + 2 * x.std())


def test_constant_and_overrides():
    auc = np.c_[np.zeros(50), np.random.default_rng(2).normal(0.1, 0.01, 50)]
    out = derive_thresholds(auc, ["A(+)", "B(+)"], overrides={"B(+)": 0.5})
    assert out[0].method == "constant" and out[0].value == 0.0
    assert (out[1].method, out[1].value) == ("override", 0.5)
    with pytest.raises(UserInputError, match="unknown regulons: C"):
        derive_thresholds(auc, ["A(+)", "B(+)"], overrides={"C(+)": 0.1})


def test_parse_threshold_overrides(tmp_path):
    f = tmp_path / "thr.tsv"
    f.write_text("regulon\tthreshold\nSPI1(+)\t0.2\nGATA1(-)\t0.05\n")
    assert parse_threshold_overrides(["SPI1(+)=0.3"], str(f)) == {"SPI1(+)": 0.3, "GATA1(-)": 0.05}
    with pytest.raises(UserInputError, match="NAME=VALUE"):
        parse_threshold_overrides(["SPI1(+)"])
