"""GRNs for RNA-only data by reference mapping: the k-nearest-neighbour vote on hand-made clusters, and the whole
route on the demo cells split into a typed reference (500 cells, GRNs, a model pretrained on it) and an untyped
query (200 held-out cells): the query gets the reference's cell types with vote shares, its old labels are kept, its
GRN assets are built from the reference's cell-type networks on its own expression, and the mapped types beat
predicting the most common type."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_knn_majority_on_hand_made_clusters():
    from grnformer_ds.grn.reference_mapping import knn_majority

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    ref = np.concatenate([c + rng.normal(size=(40, 8)) for c in centres])
    ref_labels = np.repeat([0, 1, 2], 40)
    query = np.concatenate([c + rng.normal(size=(10, 8)) for c in centres])
    labels, conf = knn_majority(query, ref, ref_labels, k=7)
    assert labels.tolist() == np.repeat([0, 1, 2], 10).tolist() and conf.min() > 0.7 and conf.max() == 1.0
    # a tie (2 votes each) goes to the type whose voters are closer
    ref2 = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    lab, share = knn_majority(np.array([[1.0, 0.05]]), ref2, np.array([0, 0, 1, 1]), k=4)
    assert lab.tolist() == [0] and share.tolist() == [0.5]


def _sh(args, cwd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{args}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


@pytest.mark.e2e
def test_reference_mapping_types_held_out_demo_cells(tmp_path):
    import anndata as ad
    import pandas as pd
    import zarr

    from grnformer_ds.grn import read_grn_assets
    from grnformer_ds.store import open_store
    from grnformer_ds.store.demo import pbmc68k_counts

    cells = pbmc68k_counts()
    cells.obs_names_make_unique()
    cells[:500].copy().write_h5ad(tmp_path / "ref.h5ad")
    query = cells[500:].copy()
    truth = query.obs["bulk_labels"].astype(str).copy()
    query.obs = query.obs.rename(columns={"bulk_labels": "annotation"})
    query.write_h5ad(tmp_path / "query.h5ad")
    d = lambda *p: os.path.join(REPO, *p)  # noqa: E731
    _sh([d("data_prep", "build_store.py"), "--out", "ref", "--cell-type-key", "bulk_labels", "ref.h5ad"], tmp_path)
    _sh([d("data_prep", "build_grn.py"), "--store", "ref", "--demo", "--quiet"], tmp_path)
    _sh([d("launchers", "pretrain.py"), "--deepspeed_config", d("ds_configs", "zero3.json"), "--data", "ref",
         "--model-preset", "debug", "--max-steps", "300", "--lr", "3e-3", "--output-dir", "run", "--no-progress",
         "--mlflow-tracking-uri", "none"], tmp_path)
    model = str(tmp_path / "run" / "hf_model")
    _sh([d("data_prep", "build_store.py"), "--out", "query", "--gene-vocab", f"{model}/vocab.json",
         "--cell-type-key", "annotation", "query.h5ad"], tmp_path)
    p = _sh([d("data_prep", "build_grn.py"), "--store", "query", "--reference-store", "ref", "--reference-model",
             model, "--k", "15"], tmp_path)
    assert "query cells typed by their 15 nearest reference cells" in p.stdout, p.stdout

    ref, q = open_store(tmp_path / "ref"), open_store(tmp_path / "query")
    assert q.cell_types == ref.cell_types
    obs = pd.concat([ad.io.read_elem(zarr.open_group(s, mode="r")["obs"]) for s in q.shard_paths])
    assert ((obs["cell_type_confidence"] >= 1 / 15) & (obs["cell_type_confidence"] <= 1)).all()
    assert (obs["cell_type_before_mapping"].astype(str) == truth.loc[obs.index].values).all()  # kept, not lost
    accuracy = float((obs["cell_type"].astype(str).values == truth.loc[obs.index].values).mean())
    majority = float(truth.value_counts().iloc[0] / len(truth))
    assert accuracy > majority, (accuracy, majority)
    # the query's cell-type GRNs are the reference's (same vocabulary: every edge maps), its regulons its own AUCell
    ra, qa = read_grn_assets(tmp_path / "ref"), read_grn_assets(tmp_path / "query")
    assert qa.celltype_names.tolist() == ra.celltype_names.tolist()
    assert len(qa.celltype_src) == len(ra.celltype_src)
    assert "active_regulons" in zarr.open_group(q.shard_paths[0], mode="r")["obsm"]
    bad = subprocess.run([sys.executable, d("data_prep", "build_grn.py"), "--store", "query", "--reference-store",
                          "ref", "--reference-model", model], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "already has GRN assets" in bad.stderr, bad.stderr
