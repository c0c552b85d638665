"""End-to-end fine-tuning through the card's engine, `deepspeed launchers/finetune.py --task ...`, on real demo
cells: cell-type on the demo store (with its GRN graphs) on 2 ZeRO-2 ranks, stopped and resumed = uninterrupted; the
exported model reproduces test_metrics.json on the saved test split (it is the best checkpoint, and the metrics are
computed on each test cell once); sc-drug-response on an .h5ad (mapped onto the model's vocabulary) with 5 folds on
1 rank; one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from launch_helpers import launch_cmd, launch_env, read_metrics  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "launchers", "finetune.py")
ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")
torch.set_num_threads(1)



def _run(args, ranks=1, launcher=True, check=True, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run(launch_cmd(FINETUNE, args, ranks, launcher), cwd=REPO, env=launch_env(), capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(demo cache, a debug-size pretrained folder on the demo store's vocabulary, with GRN parts)."""
    from grnformer_ds.modeling import GRNFormerForMaskedLM
    from grnformer_ds.store import open_store
    from grnformer_ds.training.export import save_hf_folder
    from grnformer_ds.training.integration import build_model_config, ensure_demo

    d = tmp_path_factory.mktemp("finetune")
    cache = str(d / "cache")
    store = open_store(ensure_demo(cache, say=lambda line: None))
    config = build_model_config(store, "debug", None)
    config.attention_probs_dropout_prob = config.hidden_dropout_prob = 0.0
    config.fusion_position = "after"  # every transformer layer is kept without graphs (the .h5ad run has none)
    torch.manual_seed(0)
    folder = save_hf_folder(GRNFormerForMaskedLM(config), dict(store.vocab), str(d / "pretrained"))
    return cache, folder


COMMON = ["--task", "cell-type", "--deepspeed_config", ZERO2, "--lr", "3e-3", "--eval-every", "4", "--save-every",
          "4", "--patience", "50", "--precision", "fp32", "--no-progress", "--mlflow-tracking-uri", "none"]


def test_cell_type_two_ranks_resume_equals_uninterrupted_and_export_reproduces_test(pretrained, tmp_path):
    cache, folder = pretrained
    base = [*COMMON, "--model", folder, "--demo-cache-dir", cache]
    full = str(tmp_path / "full")
    p = _run([*base, "--output-dir", full, "--max-steps", "12"], ranks=2)
    assert "labels: cell_type, 10 classes" in p.stdout and "(task head)" in p.stdout, p.stdout
    report = json.load(open(os.path.join(full, "test_metrics.json")))
    assert report["n_train"] + report["n_val"] + report["n_test"] == 700 and report["n_test"] == 70
    assert set(report["test"]) == {"loss", "accuracy", "macro_f1"} and report["steps_trained"] == 12
    evals = [m for m in read_metrics(full) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8, 12]
    best = max(evals, key=lambda m: m["eval_macro_f1"])  # the first of equals: a tie is not an improvement
    assert report["best_step"] == best["step"] and report["val"]["macro_f1"] == pytest.approx(best["eval_macro_f1"])

    # killed after its step-8 checkpoint and resumed: the same losses, evaluations and test report as the
    # uninterrupted run (the kill is simulated by removing what was written after that checkpoint)
    import shutil

    part = str(tmp_path / "part")
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "global_step12"), ignore_errors=True)
    shutil.rmtree(os.path.join(part, "hf_model"))
    os.remove(os.path.join(part, "test_metrics.json"))
    with open(os.path.join(part, "checkpoints", "latest"), "w") as fh:
        fh.write("global_step8")
    p = _run([*base, "--output-dir", part, "--max-steps", "12", "--resume"], ranks=2)
    assert "resumed from" in p.stdout and "at step 8" in p.stdout, p.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6) and x["data_digest"] == y["data_digest"]
    again = json.load(open(os.path.join(part, "test_metrics.json")))
    assert again["best_step"] == report["best_step"]
    assert again["test"]["accuracy"] == report["test"]["accuracy"]

    # the export is the best checkpoint: run alone on the saved test cells it gives the reported test metrics
    from transformers import AutoModelForSequenceClassification

    from grnformer_ds.inference import embedding_dataset
    from grnformer_ds.tasks.metrics import classification_metrics

    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(full, "hf_model")).eval()
    assert type(model).__name__ == "GRNFormerForCellClassification" and model.config.num_labels == 10
    splits = np.load(os.path.join(full, "splits.npz"))
    ds = embedding_dataset(model, os.path.join(cache, "demo_store"), batch_size=50)
    cells, logits = [], []
    with torch.no_grad():
        for batch in ds:
            cells.append(batch["cell_index"].numpy())
            logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.numpy())
    cells, logits = np.concatenate(cells), np.concatenate(logits)
    _, first = np.unique(cells, return_index=True)
    logits = logits[first]
    test = splits["test"]
    got = classification_metrics(splits["codes"][test], logits[test])
    assert got["accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert got["loss"] == pytest.approx(report["test"]["loss"], rel=1e-3)


def test_sc_drug_response_on_an_h5ad_with_folds(pretrained, tmp_path):
    """Labels from an obs column of an .h5ad (the file is mapped onto the model's vocabulary in the run directory):
    'sensitive' = the demo's monocytes and dendritic cells, a label real expression carries."""
    import anndata as ad

    from grnformer_ds.store.demo import write_demo_h5ad

    cache, folder = pretrained
    h5ad = write_demo_h5ad(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(h5ad)
    adata.obs_names_make_unique()
    myeloid = adata.obs["bulk_labels"].astype(str).isin(["CD14+ Monocyte", "Dendritic"])
    adata.obs["response"] = np.where(myeloid, "sensitive", "resistant")
    adata.obs.loc[adata.obs_names[:5], "response"] = None  # unlabelled cells are in no split
    adata.write_h5ad(h5ad)
    root = str(tmp_path / "cv")
    p = _run(["--task", "sc-drug-response", "--model", folder, "--data", str(h5ad), "--output-dir", root,
              "--folds", "3", "--fold", "all", "--epochs", "1", "--lr", "3e-3", "--no-progress",
              "--mlflow-tracking-uri", "none", "--no-export"])
    assert "of the file's genes are in the model's vocabulary" in p.stdout, p.stdout
    assert "fold 1 of 3" in p.stdout and "3-fold test: accuracy" in p.stdout, p.stdout
    reports = [json.load(open(os.path.join(root, f"fold{k}", "test_metrics.json"))) for k in range(3)]
    report = reports[1]
    assert report["classes"] == ["resistant", "sensitive"]  # the positive class last: roc_auc scores it
    assert report["n_train"] + report["n_val"] + report["n_test"] == 695
    assert abs(report["n_test"] - 695 / 3) <= 2
    assert 0.0 <= report["test"]["roc_auc"] <= 1.0 and "roc_auc" in report["val"]
    tests = [set(np.load(os.path.join(root, f"fold{k}", "splits.npz"))["test"].tolist()) for k in range(3)]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1] | tests[2]) == 695  # the folds partition the cells
    splits = np.load(os.path.join(root, "fold1", "splits.npz"))
    codes = splits["codes"]
    assert (codes == -100).sum() == 5 and not set(np.flatnonzero(codes == -100)) & set(splits["test"])
    cv = json.load(open(os.path.join(root, "cv_metrics.json")))
    assert cv["test"]["roc_auc"]["per_fold"] == [r["test"]["roc_auc"] for r in reports]
    assert cv["test"]["roc_auc"]["mean"] == pytest.approx(np.mean([r["test"]["roc_auc"] for r in reports]))


def test_finetune_bad_input_is_one_line(pretrained, tmp_path):
    cache, folder = pretrained
    store = os.path.join(cache, "demo_store")
    replacing = str(tmp_path / "replacing")  # a GRN model whose fusion took its last layer's place
    import shutil

    shutil.copytree(folder, replacing)
    config = json.load(open(os.path.join(replacing, "config.json")))
    json.dump({**config, "fusion_position": "replace", "num_hidden_layers": config["num_hidden_layers"] + 1},
              open(os.path.join(replacing, "config.json"), "w"))
    for args, needle in (
        (["--task", "cell-type", "--model", str(tmp_path), "--data", store], "config.json is missing"),
        (["--task", "cell-type", "--model", folder, "--data", store, "--label-key", "donor"],
         "a store keeps only cell_type"),
        (["--task", "sc-drug-response", "--model", folder, "--data", store], "reads the labels from an .h5ad"),
        (["--task", "cell-type", "--model", folder, "--data", str(tmp_path / "x.csv")], "not found"),
        (["--task", "cell-type", "--model", replacing, "--data", store, "--no-graph"], "replaces its last"),
    ):
        p = _run([*args, "--output-dir", str(tmp_path / "bad"), "--mlflow-tracking-uri", "none"], launcher=False,
                 check=False, timeout=120)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, \
            (args, p.stdout[-1500:], p.stderr[-1500:])


DRUGS = {"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
         "ibuprofen": "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "paracetamol": "CC(=O)Nc1ccc(O)cc1",
         "nicotine": "CN1CCCC1c1cccnc1", "metformin": "CN(C)C(=N)N=C(N)N", "broken": "C1CC(("}


def test_drug_response_two_ranks_resume_on_cell_lines_from_real_cells(pretrained, tmp_path):
    """60 demo cells stand for cell lines; ln IC50 depends on each one's real LYZ expression with a per-drug slope
    (a signal the model can learn); one drug's SMILES does not parse and one row names an unknown cell line."""
    import shutil

    import anndata as ad
    import pandas as pd

    from grnformer_ds.store.demo import write_demo_h5ad

    cache, folder = pretrained
    cells = ad.read_h5ad(write_demo_h5ad(tmp_path / "all.h5ad"))[:60].copy()
    cells.obs_names = [f"CL{i:02d}" for i in range(60)]
    cells.write_h5ad(tmp_path / "lines.h5ad")
    lyz = np.log1p(np.asarray(cells[:, "LYZ"].X.todense()).ravel())
    z = (lyz - lyz.mean()) / lyz.std()
    rows = [(line, drug, smi, 2.0 + (k - 2.5) * z[i] + 0.3 * k)
            for k, (drug, smi) in enumerate(DRUGS.items()) for i, line in enumerate(cells.obs_names)]
    rows.append(("NOT_A_LINE", "aspirin", DRUGS["aspirin"], 1.0))
    pd.DataFrame(rows, columns=["cell_line", "drug", "smiles", "ln_ic50"]).to_csv(tmp_path / "gdsc.csv", index=False)
    base = ["--task", "drug-response", "--model", folder, "--data", str(tmp_path / "lines.h5ad"), "--drug-table",
            str(tmp_path / "gdsc.csv"), "--deepspeed_config", ZERO2, "--max-steps", "12", "--eval-every", "4",
            "--save-every", "4", "--patience", "50", "--lr", "3e-3", "--precision", "fp32", "--no-progress",
            "--mlflow-tracking-uri", "none"]
    full = str(tmp_path / "full")
    p = _run([*base, "--output-dir", full], ranks=2)
    assert "360 pairs of 60 cell lines x 6 drugs" in p.stdout and "1 table rows left out" in p.stdout, p.stdout
    assert "SMILES RDKit cannot parse" in p.stdout and "'broken'" in p.stdout, p.stdout
    report = json.load(open(os.path.join(full, "test_metrics.json")))
    assert set(report["test"]) == {"loss", "rmse", "pearson", "spearman"} and report["n_test"] == 36
    assert report["early_stopping"]["metric"] == "pearson"

    part = str(tmp_path / "part")  # killed after the step-8 checkpoint, resumed
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "global_step12"), ignore_errors=True)
    shutil.rmtree(os.path.join(part, "hf_model"))
    with open(os.path.join(part, "checkpoints", "latest"), "w") as fh:
        fh.write("global_step8")
    _run([*base, "--output-dir", part, "--resume"], ranks=2)
    for x, y in zip(read_metrics(full), read_metrics(part)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6) and x["data_digest"] == y["data_digest"]
    again = json.load(open(os.path.join(part, "test_metrics.json")))
    assert again["test"]["pearson"] == pytest.approx(report["test"]["pearson"], rel=1e-4)

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(full, "hf_model"))
    assert model.config.problem_type == "regression" and model.config.condition_feature_size == 1024


PERTURBED = ["LYZ+ctrl", "CD74+ctrl", "HLA-DRA+ctrl", "S100A9+ctrl", "NKG7+ctrl", "GNLY+ctrl", "LYZ+CD74",
             "NOTAGENE+ctrl"]


def _perturbation_h5ad(path):
    """GEARS-style data from real cells: 300 demo cells are controls; each perturbation takes 50 other real cells,
    knocks its genes out (counts 0) and triples a few downstream genes of its own (a response to learn)."""
    import anndata as ad
    import scipy.sparse as sp

    from grnformer_ds.store.demo import write_demo_h5ad

    cells = ad.read_h5ad(write_demo_h5ad(path.parent / "demo.h5ad"))
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(cells.X).astype(np.float32).tolil()
    conditions = np.array(["ctrl"] * cells.n_obs, dtype=object)
    genes = list(cells.var_names)
    order = rng.permutation(cells.n_obs)
    for k, cond in enumerate(PERTURBED):
        rows = order[300 + 50 * k: 300 + 50 * (k + 1)]
        conditions[rows] = cond
        downstream = rng.choice(len(genes), 5, replace=False)
        for r in rows:
            for g in cond.split("+"):
                if g in genes:
                    X[r, genes.index(g)] = 0
            for j in downstream:
                X[r, j] = X[r, j] * 3 + 2
    cells.X = sp.csr_matrix(X)
    cells.obs["condition"] = conditions
    cells.write_h5ad(path)
    return path


def test_perturbation_on_unseen_perturbations_of_real_cells(pretrained, tmp_path):
    cache, folder = pretrained
    h5ad = _perturbation_h5ad(tmp_path / "perturb.h5ad")
    out = str(tmp_path / "run")
    p = _run(["--task", "perturbation", "--model", folder, "--data", str(h5ad), "--output-dir", out,
              "--deepspeed_config", ZERO2, "--epochs", "2", "--lr", "3e-3", "--precision", "fp32", "--no-progress",
              "--mlflow-tracking-uri", "none"], ranks=2)
    assert "'NOTAGENE+ctrl'" in p.stdout and "perturbations: 7 (test 1" in p.stdout, p.stdout
    report = json.load(open(os.path.join(out, "test_metrics.json")))
    assert set(report["test"]) == {"loss", "pearson", "pearson_de", "mse", "mse_de", "pearson_delta",
                                   "pearson_delta_de"}
    assert report["early_stopping"]["metric"] == "pearson_delta" and report["n_genes"] == 765
    groups = [set(report[f"{k}_perturbations"]) for k in ("train", "val", "test")]
    assert not groups[0] & groups[2] and not groups[1] & groups[2]  # test perturbations are unseen in training
    splits = np.load(os.path.join(out, "splits.npz"), allow_pickle=True)
    classes, codes = list(splits["classes"]), splits["codes"]
    control = classes.index("ctrl")
    assert (codes[splits["control_of"][splits["test"]]] == control).all()  # every input is a control cell

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "hf_model"))
    assert model.config.condition_genes and model.config.num_labels == 765 and model.config.id2label[0]
