"""Fine-tuning's parts against references: splits (stratified, disjoint, seeded, k-fold covers every cell once),
metrics (scikit-learn / torch's cross-entropy / hand-counted values), the dataset's cell subsets and labels (each
subset cell once per epoch, labels aligned), the classification model (loads a masked-LM folder's encoder exactly,
loss = torch cross-entropy, packed = padded), and early stopping's rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grnformer_ds.errors import UserInputError
from grnformer_ds.tasks.cell_labels import NO_LABEL
from grnformer_ds.tasks.metrics import classification_metrics
from grnformer_ds.tasks.splits import kfold_split, stratified_split

torch.set_num_threads(1)


def _codes(seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.choice(4, size=1000, p=[0.5, 0.3, 0.15, 0.05]).astype(np.int64)
    codes[rng.choice(1000, 50, replace=False)] = NO_LABEL
    codes[:1] = 4  # a class of one cell
    return codes


def test_stratified_split_is_disjoint_complete_stratified_and_seeded():
    codes = _codes()
    s = stratified_split(codes, 0.1, 0.2, seed=3)
    labelled = np.flatnonzero(codes != NO_LABEL)
    joined = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(joined.tolist()) == labelled.tolist()  # every labelled cell in exactly one split
    for c in range(4):  # each class's share of each split is the asked fraction (rounded per class)
        n = (codes == c).sum()
        assert abs((codes[s["test"]] == c).sum() - 0.2 * n) <= 1
        assert abs((codes[s["val"]] == c).sum() - 0.1 * n) <= 1
    assert 0 in s["train"]  # the one-cell class stays in training
    again = stratified_split(codes, 0.1, 0.2, seed=3)
    other = stratified_split(codes, 0.1, 0.2, seed=4)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["test"], other["test"])
    with pytest.raises(UserInputError):
        stratified_split(codes, 0.5, 0.6)


def test_kfold_tests_cover_every_labelled_cell_once():
    codes = _codes(1)
    folds = [kfold_split(codes, 5, k, 0.1, seed=0) for k in range(5)]
    tests = np.concatenate([f["test"] for f in folds])
    assert sorted(tests.tolist()) == np.flatnonzero(codes != NO_LABEL).tolist()
    for f in folds:
        assert not set(f["test"]) & set(f["train"]) and not set(f["val"]) & set(f["train"])
        assert abs((codes[f["test"]] == 0).sum() - (codes == 0).sum() / 5) <= 1


def test_classification_metrics_match_sklearn_and_torch():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 2.0 * np.eye(3)[labels]
    m = classification_metrics(labels, logits)
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert m["loss"] == pytest.approx(ce, rel=1e-9)
    assert m["accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))
    # a class never predicted nor present counts as 0 in the macro average (4 classes, only 0 and 1 used)
    two = classification_metrics(np.array([0, 1, 1, 0]), np.array([[3.0, 0, 0, 0], [0, 3, 0, 0], [0, 3, 0, 0],
                                                                  [0, 3, 0, 0]]))
    assert two["accuracy"] == 0.75 and two["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 4)
    b_labels = rng.integers(0, 2, 100)
    b_logits = rng.normal(size=(100, 2))
    b = classification_metrics(b_labels, b_logits)
    p1 = np.exp(b_logits[:, 1]) / np.exp(b_logits).sum(1)
    assert b["roc_auc"] == pytest.approx(roc_auc_score(b_labels, p1))


def test_early_stopping_counts_evaluations_without_improvement():
    from grnformer_ds.training.early_stopping import EarlyStopping

    es = EarlyStopping("macro_f1", "max", patience=2)
    assert es.update(1, {"macro_f1": 0.2}) and not es.should_stop
    assert not es.update(2, {"macro_f1": 0.2})  # equal is not better
    assert es.update(3, {"macro_f1": 0.3}) and es.best_step == 3
    assert not es.update(4, {"macro_f1": float("nan")}) and not es.should_stop
    assert not es.update(5, {"macro_f1": 0.1}) and es.should_stop
    restored = EarlyStopping("macro_f1", "max", patience=2)
    restored.load_state_dict(es.state_dict())
    assert restored.state_dict() == es.state_dict()
    with pytest.raises(UserInputError):
        EarlyStopping("roc_auc", "max").load_state_dict(es.state_dict())


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from grnformer_ds.training.integration import ensure_demo

    return ensure_demo(str(tmp_path_factory.mktemp("tasks") / "cache"), say=lambda line: None)


@pytest.mark.parametrize("layout", [dict(batch_size=7), dict(max_tokens=3000)])
def test_dataset_streams_a_cell_subset_once_per_epoch_with_its_labels(demo_store, layout):
    from grnformer_ds.data import StreamingCellDataset

    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(700, 300, replace=False))
    labels = np.arange(700, dtype=np.int64) * 10
    ds = StreamingCellDataset(demo_store, seed=0, split="all", cells=subset, sample_labels=labels[subset],
                              training=False, shuffle=False, drop_last=False, mask_ratio=0.0, block_size=64, **layout)
    seen = []
    for batch in ds:
        assert torch.equal(batch["labels"], batch["cell_index"] * 10)  # each cell's own label
        assert torch.equal(batch["cell_index"], torch.from_numpy(subset)[batch["sample_index"]])
        seen.append(batch["cell_index"].numpy())
    assert np.array_equal(np.unique(np.concatenate(seen)), subset)
    # samples may repeat a cell (one per (cell, drug) pair): each sample once, with its own label and features
    pairs = np.r_[subset[:40], subset[:40], subset[40:50]]
    feats = np.arange(len(pairs), dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    ds = StreamingCellDataset(demo_store, seed=0, split="all", cells=pairs, sample_labels=np.arange(len(pairs)),
                              sample_inputs={"condition_features": feats}, training=False, shuffle=False,
                              drop_last=False, mask_ratio=0.0, block_size=16, **layout)
    got = {}
    for batch in ds:
        for i, c, lab, f in zip(batch["sample_index"].tolist(), batch["cell_index"].tolist(),
                                batch["labels"].tolist(), batch["condition_features"][:, 0].tolist()):
            assert pairs[i] == c and lab == i and f == i
            got[i] = c
    assert sorted(got) == list(range(len(pairs)))
    # the same cells read from the whole store give the same tokens (a subset changes what is read, not how)
    full = StreamingCellDataset(demo_store, seed=0, split="all", training=False, shuffle=False, drop_last=False,
                                mask_ratio=0.0, batch_size=700, cell_keyed_random=True)
    part = StreamingCellDataset(demo_store, seed=0, split="all", cells=subset, training=False, shuffle=False,
                                drop_last=False, mask_ratio=0.0, batch_size=300, cell_keyed_random=True)
    a, b = next(iter(full)), next(iter(part))
    rows = b["cell_index"].numpy()
    assert torch.equal(a["input_ids"][rows][:, :b["input_ids"].shape[1]], b["input_ids"])
    # a training subset reshuffles per epoch and resumes only on the same cells
    train = StreamingCellDataset(demo_store, seed=0, split="all", cells=subset, batch_size=8, mask_ratio=0.0)
    state = train.state_dict()
    swapped = np.sort(np.r_[subset[1:], np.setdiff1d(np.arange(700), subset)[0]])  # same size, one cell other
    other = StreamingCellDataset(demo_store, seed=0, split="all", cells=swapped, batch_size=8, mask_ratio=0.0)
    with pytest.raises(UserInputError, match="cells changed"):
        other.load_state_dict(state)


def test_classifier_keeps_the_pretrained_encoder_and_its_loss_is_cross_entropy(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from grnformer_ds.modeling import (
        GRNFormerConfig,
        GRNFormerForCellClassification,
        GRNFormerForMaskedLM,
        make_dummy_batch,
    )
    from grnformer_ds.training.export import save_hf_folder

    config = GRNFormerConfig.from_preset("debug", vocab_size=64)
    torch.manual_seed(0)
    lm = GRNFormerForMaskedLM(config).eval()
    folder = save_hf_folder(lm, {f"g{i}": i for i in range(64)}, str(tmp_path / "lm"))
    clf = GRNFormerForCellClassification.from_pretrained(folder, num_labels=3).eval()
    lm_state = lm.state_dict()
    for k, v in clf.state_dict().items():
        if k.startswith("grnformer."):
            assert torch.equal(v, lm_state[k]), k
    batch = make_dummy_batch(config, batch_size=4, seq_len=12, seed=1)
    batch.pop("labels")
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out = clf(**batch, labels=labels)
        emb = lm.grnformer(**batch).cell_embedding
    assert torch.allclose(out.cell_embedding, emb)  # the classifier reads the pretrained cell embedding
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), rel=1e-6)
    summed = clf(**batch, labels=labels, num_items_in_batch=torch.tensor(8.0)).loss
    assert summed.item() == pytest.approx(out.loss.item() * 4 / 8, rel=1e-6)
    # saved as a fine-tuned model it reloads through the Auto class, with its label names
    clf.config.id2label = {0: "a", 1: "b", 2: "c"}
    clf.config.label2id = {"a": 0, "b": 1, "c": 2}
    saved = save_hf_folder(clf, {f"g{i}": i for i in range(64)}, str(tmp_path / "clf"))
    again = AutoModelForSequenceClassification.from_pretrained(saved, trust_remote_code=True).eval()
    assert type(again).__name__ == "GRNFormerForCellClassification" and again.config.id2label[2] == "c"
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, out.logits, atol=1e-6)


def test_classifier_packed_layout_equals_padded():
    from grnformer_ds.data.packing import pack_padded_batch
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForCellClassification, make_dummy_batch

    config = GRNFormerConfig.from_preset("debug", vocab_size=64, num_labels=4, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = GRNFormerForCellClassification(config).eval()
    batch = make_dummy_batch(config, batch_size=3, seq_len=10, lengths=[10, 6, 8], graphs=False, seed=2)
    batch.pop("labels")
    packed = pack_padded_batch(batch, lead=0, pad_id=config.pad_token_id, pad_value=config.pad_value)
    packed.pop("labels", None)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**packed).logits
    assert a.shape == (3, 4) and torch.allclose(a, b, atol=1e-5)


def test_morgan_fingerprints_match_rdkits_reference_bit_vectors():
    from rdkit import Chem, DataStructs
    from rdkit.Chem import AllChem

    from grnformer_ds.tasks.drug_features import morgan_fingerprints

    smiles = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "not a molecule", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"]
    fps, bad = morgan_fingerprints(smiles, radius=2, n_bits=512)
    assert bad == [2] and not fps[2].any() and fps.shape == (4, 512)
    for i in (0, 1, 3):
        ref = AllChem.GetMorganFingerprintAsBitVect(Chem.MolFromSmiles(smiles[i]), 2, nBits=512)
        arr = np.zeros(512)
        DataStructs.ConvertToNumpyArray(ref, arr)
        assert np.array_equal(fps[i], arr)


def test_drug_pair_splits_random_and_leave_drug_out():
    from grnformer_ds.tasks.drug_response import pair_splits

    rng = np.random.default_rng(0)
    drug_of_pair = rng.integers(0, 20, 500)
    for mode in ("random", "leave-drug-out"):
        s = pair_splits(drug_of_pair, 20, mode, 0.1, 0.2, seed=1)
        assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(500))
        assert s["train"].size and s["val"].size and s["test"].size
    s = pair_splits(drug_of_pair, 20, "leave-drug-out", 0.1, 0.2, seed=1)
    drugs = {k: set(drug_of_pair[v].tolist()) for k, v in s.items()}
    assert not drugs["test"] & drugs["train"] and not drugs["val"] & drugs["train"] and len(drugs["test"]) == 4


def test_regression_metrics():
    from scipy.stats import pearsonr, spearmanr

    from grnformer_ds.tasks.metrics import regression_metrics

    rng = np.random.default_rng(0)
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.5, size=100)
    m = regression_metrics(y, p)
    assert m["pearson"] == pytest.approx(pearsonr(y, p)[0]) and m["spearman"] == pytest.approx(spearmanr(y, p)[0])
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2))) and m["loss"] == pytest.approx(m["rmse"] ** 2)
    assert np.isnan(regression_metrics(y, np.zeros(100))["pearson"])


def test_condition_features_join_the_cell_embedding():
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForCellClassification, make_dummy_batch

    config = GRNFormerConfig.from_preset("debug", vocab_size=64, num_labels=1, condition_feature_size=16)
    torch.manual_seed(0)
    model = GRNFormerForCellClassification(config).eval()
    batch = make_dummy_batch(config, batch_size=4, seq_len=10, graphs=False, seed=3)
    batch.pop("labels")
    feats = torch.rand(4, 16)
    y = torch.randn(4)
    with torch.no_grad():
        out = model(**batch, condition_features=feats, labels=y)
        other = model(**batch, condition_features=torch.rand(4, 16)).logits
    assert out.logits.shape == (4, 1) and not torch.allclose(out.logits, other)  # the condition matters
    assert out.loss.item() == pytest.approx(torch.mean((out.logits[:, 0] - y) ** 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="condition_features"):
        model(**batch)


def _gears_inference():
    """GEARS' own gears/inference.py (cell-gears 0.1.2, --no-deps), loaded without its package __init__."""
    import importlib.util

    spec = importlib.util.find_spec("gears")
    if spec is None:
        pytest.skip("cell-gears is not installed (pip install --no-deps cell-gears==0.1.2)")
    import os

    path = os.path.join(list(spec.submodule_search_locations)[0], "inference.py")
    module_spec = importlib.util.spec_from_file_location("gears_inference_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_perturbation_metrics_equal_gears_own_formulas():
    from scipy.stats import pearsonr

    from grnformer_ds.tasks.metrics import perturbation_metrics

    gears = _gears_inference()
    rng = np.random.default_rng(0)
    n_genes, conds = 60, np.array(["A+ctrl"] * 7 + ["B+ctrl"] * 5 + ["A+B"] * 6)
    truth = rng.gamma(2.0, 1.0, size=(len(conds), n_genes)).astype(np.float32)
    pred = truth + rng.normal(scale=0.7, size=truth.shape).astype(np.float32)
    pred[conds == "B+ctrl"] = 1.0  # a constant prediction: GEARS counts its undefined Pearson as 0
    ctrl = rng.gamma(2.0, 1.0, size=n_genes).astype(np.float32)
    de = {c: rng.choice(n_genes, 20, replace=False) for c in np.unique(conds)}
    ours = perturbation_metrics(conds, pred, truth, ctrl, de)
    de_rows = np.stack([de[c] for c in conds])
    results = {"pert_cat": conds, "pred": pred, "truth": truth,
               "pred_de": np.take_along_axis(pred, de_rows, 1), "truth_de": np.take_along_axis(truth, de_rows, 1)}
    ref, _ = gears.compute_metrics(results)
    for k in ("pearson", "pearson_de", "mse", "mse_de"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    # the delta correlations, as gears.inference.deeper_analysis computes them per perturbation
    deltas, deltas_de = [], []
    for c in np.unique(conds):
        p, t = pred[conds == c].mean(0), truth[conds == c].mean(0)
        v = pearsonr(p - ctrl, t - ctrl)[0]
        deltas.append(0 if np.isnan(v) else v)
        v = pearsonr(p[de[c]] - ctrl[de[c]], t[de[c]] - ctrl[de[c]])[0]
        deltas_de.append(0 if np.isnan(v) else v)
    assert ours["pearson_delta"] == pytest.approx(np.mean(deltas))
    assert ours["pearson_delta_de"] == pytest.approx(np.mean(deltas_de))


def test_perturbation_conditions_and_log_normalized_targets():
    import scipy.sparse as sp

    from grnformer_ds.data.cells import CellRows
    from grnformer_ds.tasks.perturbation import condition_genes, log_normalized

    assert condition_genes("ctrl") == [] and condition_genes("LYZ+ctrl") == ["LYZ"]
    assert condition_genes("ctrl+LYZ") == ["LYZ"] and condition_genes("A+B") == ["A", "B"]
    counts = sp.random(5, 12, density=0.4, random_state=0, format="csr") * 20
    counts.data = np.ceil(counts.data)
    rows = CellRows(indptr=counts.indptr.astype(np.int64), indices=counts.indices, data=counts.data.astype(np.uint16),
                    cell_index=np.arange(5), cell_type=np.zeros(5, np.int64))
    dense = counts.toarray()
    expected = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)  # scanpy's normalize_total(1e4) + log1p
    np.testing.assert_allclose(log_normalized(rows, 12), expected, rtol=1e-6)


def test_gene_conditions_read_the_models_own_gene_embeddings():
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForCellClassification, make_dummy_batch

    config = GRNFormerConfig.from_preset("debug", vocab_size=64, num_labels=20, condition_genes=True,
                                         problem_type="regression")
    torch.manual_seed(0)
    model = GRNFormerForCellClassification(config).eval()
    ids = torch.tensor([[5, 7], [5, config.pad_token_id]])
    table = model.get_input_embeddings().weight
    got = model._condition(None, ids)
    assert torch.allclose(got[0], (table[5] + table[7]) / 2) and torch.allclose(got[1], table[5])
    batch = make_dummy_batch(config, batch_size=2, seq_len=10, graphs=False, seed=4)
    batch.pop("labels")
    target = torch.rand(2, 20)
    with torch.no_grad():
        out = model(**batch, condition_gene_ids=ids, labels=target)
    assert out.logits.shape == (2, 20)
    assert out.loss.item() == pytest.approx(torch.mean((out.logits - target) ** 2).item(), rel=1e-6)
