"""The TF-attention statistic (the paper's rho): attention received per key on hand-made fusion weights for each key
layout (slots, leading T / S keys, gene patches), rho and its permutation p-value against direct computations, and
`launchers/attention_report.py` on the demo store."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from grnformer_ds.inference.tf_attention import KeyAttention, permutation_p_value, received_attention, rho

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(bsz, heads, lq, lk, seed=0):
    w = torch.rand(bsz, heads, lq, lk, generator=torch.Generator().manual_seed(seed))
    return w / w.sum(-1, keepdim=True)


def test_received_attention_is_the_mean_over_heads_and_real_queries():
    w = _weights(2, 3, 5, 5)
    ids = torch.tensor([[1, 7, 8, 9, 0], [1, 7, 8, 0, 0]])
    mask = ids != 0
    got = received_attention(w, ids, mask)
    for b in range(2):
        real = [q for q in range(5) if mask[b, q]]
        for k in range(5):
            expected = np.mean([w[b, h, q, k].item() for h in range(3) for q in real])
            assert got[b, k].item() == pytest.approx(expected, rel=1e-6)
    # scFoundation's layout: two leading keys (T, S) and two leading real queries before the L slots
    w2 = _weights(1, 2, 6, 6, seed=1)
    got2 = received_attention(w2, ids[:1, :4], mask[:1, :4])
    expected = w2[0, :, :, 2:].mean(0).mean(0)  # all 6 queries are real
    torch.testing.assert_close(got2[0], expected)


def test_received_attention_through_gene_patches():
    """Patch tokens: a patch's attention is shared equally among its genes; real queries are <cls> and the patches."""
    w = _weights(1, 2, 4, 4, seed=2)  # tokens: <cls>, patch 1, patch 2, padding
    token_index = torch.tensor([[-1, 1, 1, 2, 2, 2]])  # slot 0 is <cls>'s input slot (no patch)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    got = received_attention(w, ids, ids != 0, token_index)
    per_token = w[0, :, :3, :].mean(0).mean(0)  # queries <cls>, patch 1, patch 2
    expected = torch.tensor([0.0, per_token[1] / 2, per_token[1] / 2, per_token[2] / 3, per_token[2] / 3,
                             per_token[2] / 3])
    torch.testing.assert_close(got[0], expected)


def test_rho_and_its_permutation_p_value():
    rng = np.random.default_rng(0)
    n_cells, per_cell = 60, 20
    cell = np.repeat(np.arange(n_cells), per_cell)
    is_tf = np.zeros(n_cells * per_cell, bool)
    is_tf[::5] = True  # 4 TF keys per cell
    values = rng.gamma(5.0, 0.2, size=cell.size)
    biased = np.where(is_tf, values * 2.0, values)
    assert rho(biased, is_tf) == pytest.approx(biased[is_tf].mean() / biased[~is_tf].mean())
    keys = KeyAttention(biased, is_tf, cell, np.zeros(n_cells, np.int64))
    r, p = permutation_p_value(keys, n_permutations=200, seed=1)
    assert r > 1.8 and p == pytest.approx(1 / 201)  # no permutation reaches a twofold bias
    r0, p0 = permutation_p_value(KeyAttention(values, is_tf, cell, np.zeros(n_cells, np.int64)), 200, seed=1)
    assert 0.8 < r0 < 1.2 and p0 > 0.05
    # permutations keep each cell's number of TF keys: a cell whose keys are all TF contributes the same always
    assert np.isnan(rho(values, np.ones_like(is_tf)))


def test_attention_report_command_on_the_demo_store(tmp_path):
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.export import save_hf_folder
    from grnformer_ds.training.integration import build_model_config, ensure_demo

    store_path = ensure_demo(str(tmp_path / "cache"), say=lambda line: None)
    store = open_store(store_path)
    torch.manual_seed(0)
    folder = save_hf_folder(GRNFormerForMaskedLM(build_model_config(store, "debug", None)), dict(store.vocab),
                            str(tmp_path / "model"))
    cmd = [sys.executable, os.path.join(REPO, "launchers", "attention_report.py"), "--model", folder, "--data",
           store_path, "--out-dir", str(tmp_path / "report"), "--max-cells", "48", "--permutations", "50"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stdout.startswith("rho = "), p.stderr[-3000:]
    report = json.load(open(tmp_path / "report" / "tf_attention.json"))
    assert report["cells"] == 48 and report["tf_keys"] > 0 and 0 < report["p_value"] <= 1
    assert report["rho"] == pytest.approx(report["mean_attention_tf"] / report["mean_attention_non_tf"])
    assert set(report["per_cell_type"]) <= set(store.cell_types) and report["per_cell_type"]
    assert os.path.getsize(tmp_path / "report" / "tf_attention.png") > 1000
    bad = subprocess.run(cmd[:4] + ["--data", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("backbone", ["scfoundation", "scpalm"])
def test_every_key_layout_reports_on_real_cells(tmp_path, backbone):
    """scFoundation (leading T / S keys) and scPaLM (gene patches) map their fusion keys to the cells' genes as
    scGPT's slots do: TF and non-TF gene keys for every cell, whose normalised attention averages 1 per cell."""
    from grnformer_ds.inference.tf_attention import collect_key_attention
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.integration import build_model_config, ensure_demo

    store = open_store(ensure_demo(str(tmp_path / "cache"), say=lambda line: None))
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(build_model_config(store, "debug", None, backbone=backbone)).eval()
    keys = collect_key_attention(model, store, max_cells=8, batch_size=8)
    assert len(keys.cell_type) == 8 and keys.is_tf.any()
    for c in range(8):
        assert keys.values[keys.cell == c].mean() == pytest.approx(1.0, rel=1e-5)
