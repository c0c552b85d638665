"""A linear probe of cell embeddings on the store's cell types, and the same probe on PCA of the expression: the
cheapest downstream check of a pretrained model (the ablation's downstream column until fine-tuning exists).

Split: the store's cells are shuffled when it is written, so its first `1 - test_fraction` cells train the probe and
the rest test it; cells of unknown type (-1) are left out. Probe: scikit-learn's multinomial logistic regression on
standardised features. Metrics: accuracy and macro-F1 (scikit-learn's). Baseline: the same probe on the top
`n_components` principal components of log1p(counts / total * 1e4), the usual scanpy representation.
"""
from __future__ import annotations

import numpy as np

from grnformer_ds.errors import UserInputError


def store_cell_types(store) -> np.ndarray:
    """(n_cells,) int64 cell-type code of every cell in store order (-1 unknown), as the loader reads them."""
    from grnformer_ds.data.readers import StoreReader

    return StoreReader(store.path, backend="zarr").cell_type_codes()


def probe_split(n_cells: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    n_test = max(1, int(round(n_cells * test_fraction)))
    return np.arange(n_cells - n_test), np.arange(n_cells - n_test, n_cells)


def linear_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                 seed: int = 0) -> dict:
    """Fit on `train` rows, score on `test` rows (rows with label -1 dropped): accuracy, macro-F1, counts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = train[labels[train] >= 0], test[labels[test] >= 0]
    if len(np.unique(labels[train])) < 2 or len(test) == 0:
        raise UserInputError("a linear probe needs cells of at least two known types in both splits")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(features[train], labels[train])
    pred = clf.predict(features[test])
    return {"accuracy": float(accuracy_score(labels[test], pred)),
            "macro_f1": float(f1_score(labels[test], pred, average="macro")),
            "train_cells": int(len(train)), "test_cells": int(len(test))}


def pca_features(store, n_components: int = 50) -> np.ndarray:
    """(n_cells, n_components) PCA of log1p-normalised counts, store order (in memory: for probe-sized stores)."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    blocks = []
    for i in range(len(store.shard_paths)):
        x = store.read_shard(i).X
        x = sp.csr_matrix(x, dtype=np.float32)
        totals = np.asarray(x.sum(1)).ravel()
        x = sp.diags(1e4 / np.maximum(totals, 1)) @ x
        x.data = np.log1p(x.data)
        blocks.append(x)
    x = sp.vstack(blocks).toarray()
    x -= x.mean(0, keepdims=True)  # centred: PCA
    k = min(n_components, x.shape[1] - 1, x.shape[0] - 1)
    return TruncatedSVD(k, random_state=0).fit_transform(x)
