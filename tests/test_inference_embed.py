"""Cell embeddings after pretraining (`grnformer_ds.inference.embed`, `launchers/embed.py`) on the real demo store:
every cell exactly once in store order, the same embeddings whatever the batching (packed, padded, split over ranks)
and equal to the model run on each cell alone; GRN graphs used when present; an .h5ad input mapped on the fly gives
the store route's embeddings in the file's own order; bad input is one line."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from grnformer_ds.inference import embed, gather_embeddings, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBED = os.path.join(REPO, "launchers", "embed.py")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo store path, a model folder on its vocabulary with GRN parts: a debug-size scGPT-style export)."""
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.export import save_hf_folder
    from grnformer_ds.training.integration import build_model_config, ensure_demo

    d = tmp_path_factory.mktemp("embed")
    store_path = ensure_demo(str(d / "cache"), say=lambda line: None)
    store = open_store(store_path)
    config = build_model_config(store, "debug", None)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(config)
    folder = save_hf_folder(model, dict(store.vocab), str(d / "model"))
    return store_path, folder


def _one_cell_reference(model, store_path, positions):
    """Each cell alone (a padded batch of one, same deterministic tokenization)."""
    from grnformer_ds.inference import embedding_dataset

    ds = embedding_dataset(model, store_path, batch_size=1)
    out = {}
    for step in positions:
        batch = ds.batch(step)
        with torch.no_grad():
            out[int(batch["cell_index"][0])] = model.grnformer(**batch).cell_embedding[0].numpy()
    return out


def test_every_cell_once_in_store_order_whatever_the_batching(demo):
    store_path, folder = demo
    model = load_model(folder, device="cpu")
    assert model.config.use_graph
    packed = embed(model, store_path, max_tokens=3000)
    n = 700
    assert packed.cell_index.tolist() == list(range(n)) and packed.cells.shape == (n, model.config.hidden_size)
    padded = embed(model, store_path, batch_size=7)
    np.testing.assert_allclose(padded.cells, packed.cells, atol=2e-5, rtol=2e-5)
    halves = [embed(model, store_path, max_tokens=3000, rank=r, world_size=2) for r in (0, 1)]
    assert 0 < len(halves[0].cell_index) < n
    joined = gather_embeddings(halves, n)
    np.testing.assert_allclose(joined.cells, packed.cells, atol=2e-5, rtol=2e-5)
    alone = _one_cell_reference(model, store_path, [0, 123, 699])
    for i, e in alone.items():
        np.testing.assert_allclose(packed.cells[i], e, atol=2e-5, rtol=2e-5)
    no_graph = embed(model, store_path, max_tokens=3000, graphs=False)
    assert not np.allclose(no_graph.cells, packed.cells)  # the GRN path ran by default


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO, **kw)


def test_embed_command_on_a_store_and_on_an_h5ad(demo, tmp_path):
    import anndata as ad

    from grnformer_ds.store.demo import write_demo_h5ad

    store_path, folder = demo
    out = tmp_path / "cells.h5ad"
    p = _run([sys.executable, EMBED, "--model", folder, "--data", store_path, "--out", str(out), "--no-progress",
              "--gene-embeddings", "--no-graph"])
    assert p.returncode == 0, p.stderr[-3000:]
    cells = ad.read_h5ad(out)
    assert cells.n_obs == 700 and cells.obs["cell_index"].tolist() == list(range(700))
    assert cells.obsm["X_grnformer"].shape == (700, 32) and "cell_type" in cells.obs
    assert cells.varm["X_grnformer_gene"].shape == (cells.n_vars, 32)
    model = load_model(folder, device="cpu")
    direct = embed(model, store_path, graphs=False)
    np.testing.assert_allclose(cells.obsm["X_grnformer"], direct.cells, atol=2e-5, rtol=2e-5)

    h5ad = write_demo_h5ad(tmp_path / "pbmc.h5ad")
    source = ad.read_h5ad(h5ad)
    source.obs_names_make_unique()
    source.write_h5ad(h5ad)
    out2 = tmp_path / "from_h5ad.h5ad"
    p = _run([sys.executable, EMBED, "--model", folder, "--data", str(h5ad), "--out", str(out2), "--no-progress",
              "--cell-type-key", "bulk_labels"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "of the file's genes are in the model's vocabulary" in p.stdout, p.stdout
    assert not os.path.exists(str(out2) + ".store.tmp")  # the temporary store is gone
    from_file = ad.read_h5ad(out2)
    assert from_file.obs_names.tolist() == source.obs_names.tolist()  # the file's order, its obs kept
    assert "louvain" in from_file.obs and "X_grnformer" in from_file.obsm
    # the same cells' embeddings as through the demo store (same counts, same vocabulary; no graphs either way)
    by_name = dict(zip(cells.obs_names, cells.obsm["X_grnformer"]))
    common = [n for n in from_file.obs_names if n in by_name][:50]
    assert len(common) == 50
    got = from_file[common].obsm["X_grnformer"]
    np.testing.assert_allclose(got, np.stack([by_name[n] for n in common]), atol=2e-5, rtol=2e-5)


def test_embed_command_bad_input_is_one_line(demo, tmp_path):
    store_path, folder = demo
    for args, needle in (
        (["--model", str(tmp_path), "--data", store_path, "--out", str(tmp_path / "x.h5ad")], "config.json is missing"),
        (["--model", folder, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5ad")], "not found"),
        (["--model", folder, "--data", store_path, "--out", str(tmp_path / "x.csv")], "--out must end in .h5ad"),
    ):
        p = _run([sys.executable, EMBED, *args])
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


@pytest.mark.e2e
def test_embed_command_on_two_ranks_equals_one(demo, tmp_path):
    import anndata as ad

    store_path, folder = demo
    one, two = tmp_path / "one.h5ad", tmp_path / "two.h5ad"
    p = _run([sys.executable, EMBED, "--model", folder, "--data", store_path, "--out", str(one), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    from launch_helpers import free_port  # tests/ is on sys.path (pytest rootdir import)

    port = free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), EMBED, "--model", folder, "--data",
              store_path, "--out", str(two), "--no-progress"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = ad.read_h5ad(one), ad.read_h5ad(two)
    assert b.obs["cell_index"].tolist() == list(range(700))
    np.testing.assert_allclose(a.obsm["X_grnformer"], b.obsm["X_grnformer"], atol=2e-5, rtol=2e-5)


def test_automodel_from_a_masked_lm_folder_loads_quietly_and_embeds_the_same(demo):
    """`AutoModel` on an export gives the base model: the head's weights are expected leftovers (no UNEXPECTED
    report), the base model takes a training batch as it is (labels ignored), and its embeddings are the LM's."""
    from transformers import AutoModel

    store_path, folder = demo
    base, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert type(base).__name__ == "GRNFormerModel"
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    lm = load_model(folder, device="cpu")
    got, expected = embed(base.eval(), store_path, max_tokens=3000), embed(lm, store_path, max_tokens=3000)
    np.testing.assert_array_equal(got.cells, expected.cells)
