"""The GRN ablation: the random-GRN control keeps every TF's and every target's degree while rewiring the edges (a
store view sharing the real shards), every GRN arm runs the same transformer layers as the plain backbone, and
`launchers/ablation.py` trains two arms on the demo store, fine-tunes each for cell types with the GRN it was
pretrained with (none for no-grn, the shuffled store for random-grn) on the same split, and writes its table; the
linear probe on cell types reads the store's own labels and recovers them from PCA of the expression."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from grnformer_ds.training.integration import ensure_demo

    return ensure_demo(str(tmp_path_factory.mktemp("ablation") / "cache"), say=lambda line: None)


def test_random_grn_keeps_degrees_and_rewires(demo_store, tmp_path):
    from grnformer_ds.grn import read_grn_assets
    from grnformer_ds.grn.shuffle import random_grn_store
    from grnformer_ds.store import open_store

    real = read_grn_assets(demo_store)
    view = random_grn_store(demo_store, tmp_path / "random", seed=3)
    rand = read_grn_assets(view)
    # regulons: same TFs and sizes; target in-degrees the same; most edges moved
    assert np.array_equal(real.regulon_tf, rand.regulon_tf) and np.array_equal(real.regulon_indptr,
                                                                               rand.regulon_indptr)
    assert np.array_equal(np.bincount(real.regulon_target, minlength=real.n_genes),
                          np.bincount(rand.regulon_target, minlength=real.n_genes))
    assert (real.regulon_target != rand.regulon_target).mean() > 0.5
    for c in range(real.n_celltypes):
        lo, hi = real.celltype_indptr[c], real.celltype_indptr[c + 1]
        assert np.array_equal(real.celltype_src[lo:hi], rand.celltype_src[lo:hi])
        assert sorted(real.celltype_dst[lo:hi]) == sorted(rand.celltype_dst[lo:hi])
    assert np.array_equal(real.tf_mask, rand.tf_mask)
    store = open_store(view)  # a complete store: the real shards, its own GRN assets
    assert store.n_cells == open_store(demo_store).n_cells and os.path.islink(view / "shards")
    assert store.assets["grn"]["shuffle_seed"] == 3


def test_every_grn_arm_has_the_plain_backbones_layers():
    from grnformer_ds.modeling import GRNFormerConfig
    from grnformer_ds.training.ablation import ARMS, arm_config

    layers = {name: GRNFormerConfig.from_preset("debug", vocab_size=50, **arm_config(arm)).num_encoder_layers
              for name, arm in ARMS.items()}
    assert set(layers.values()) == {layers["no-grn"]}, layers


@pytest.mark.e2e
def test_ablation_command_on_the_demo_store(demo_store, tmp_path):
    out = tmp_path / "ablation"
    cmd = [sys.executable, os.path.join(REPO, "launchers", "ablation.py"), "--data", demo_store, "--arms",
           "no-grn,random-grn", "--seeds", "0", "--max-steps", "3", "--out-dir", str(out), "--finetune-epochs", "1",
           "--finetune-args", "--max-steps 2 --eval-every 2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.load(open(out / "ablation.json"))
    assert set(summary["arms"]) == {"no-grn", "random-grn"}
    for arm in summary["arms"].values():
        assert np.isfinite(arm["eval_loss_mean"]) and arm["baseline_gene_mean"] < arm["baseline_global_mean"]
        assert 0 <= arm["probe_accuracy"][0] <= 1 and len(arm["runs"][0]["probe"]) == 4
        # the downstream column: cell-type fine-tuning of the run, scored on the test split
        assert 0 <= arm["finetune_accuracy"][0] <= 1 and 0 <= arm["finetune_macro_f1"][0] <= 1
        assert arm["runs"][0]["finetune"]["steps_trained"] == 2 and arm["runs"][0]["finetune"]["n_test"] > 0
    assert summary["probe_baseline_pca"]["accuracy"] > 0.6  # cell types are recoverable from expression
    assert summary["finetune_baseline_pca"]["accuracy"][0] > 0.5  # on the fine-tuning runs' own test cells
    random_run = json.load(open(out / "random-grn" / "seed0" / "run_settings.resolved.json"))
    assert "random_grn_store_seed0" in random_run["data"]
    # each arm fine-tuned with the GRN it was pretrained with: none for no-grn (finetune.py would add GRN parts
    # without --no-graph), the same shuffled store view for random-grn; both on the same split
    runs = {name: out / name / "seed0_cell-type" for name in summary["arms"]}
    models = {name: json.load(open(d / "checkpoints" / "model_config.json")) for name, d in runs.items()}
    settings = {name: json.load(open(d / "run_settings.resolved.json")) for name, d in runs.items()}
    assert models["no-grn"]["use_graph"] is False and models["random-grn"]["use_graph"] is True
    assert settings["random-grn"]["data"] == random_run["data"]
    assert "random_grn_store_seed0" not in settings["no-grn"]["data"]
    assert "--no-graph" in (out / "no-grn" / "seed0_cell-type.log").read_text().splitlines()[0]
    assert "--no-graph" not in (out / "random-grn" / "seed0_cell-type.log").read_text().splitlines()[0]
    splits = [np.load(d / "splits.npz") for d in runs.values()]
    assert all(np.array_equal(splits[0][k], splits[1][k]) for k in ("train", "val", "test"))
    table = (out / "ablation.md").read_text()
    assert "| no-grn |" in table and "downstream: fine-tuned cell-type accuracy" in table
    bad = subprocess.run(cmd[:2] + ["--data", demo_store, "--arms", "nonsense", "--out-dir", str(out)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "unknown arm 'nonsense'" in bad.stderr, bad.stderr


def test_linear_probe_reads_the_stores_cell_types(demo_store):
    from grnformer_ds.data.readers import StoreReader
    from grnformer_ds.inference.probe import linear_probe, pca_features, probe_split, store_cell_types
    from grnformer_ds.store import open_store

    store = open_store(demo_store)
    labels = store_cell_types(store)
    rows = StoreReader(demo_store).read_range(0, store.n_cells, False)
    assert np.array_equal(labels, rows.cell_type)  # what the loader hands the model as cell_type_ids
    train, test = probe_split(len(labels))
    assert len(test) == 140 and train[-1] + 1 == test[0]
    scores = linear_probe(pca_features(store), labels, train, test)
    majority = (labels[test] == np.bincount(labels[train]).argmax()).mean()
    assert scores["accuracy"] > majority + 0.3 and 0 < scores["macro_f1"] <= 1, (scores, majority)
