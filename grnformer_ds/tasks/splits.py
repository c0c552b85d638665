"""Seeded train / validation / test splits of labelled cells, stratified by label.

Every class is split on its own (its cells permuted by a generator seeded by (seed, class)), so each split holds
about the same share of every class whatever the others are, a class too small to split stays in training, and the
splits depend only on the labels and the seed (not on the number of ranks). k-fold: the test split is fold `fold`
of k (each class dealt round-robin over the folds after its permutation); validation is drawn from the rest the same
way.
"""
from __future__ import annotations

import numpy as np

from grnformer_ds.errors import UserInputError

from .cell_labels import NO_LABEL

SPLITS = ("train", "val", "test")


def _class_rng(seed: int, code: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(code), 0x5B11]))


def _take(positions: np.ndarray, codes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified `fraction` of `positions` (round(fraction x class size) of each class with at least 2 cells)."""
    picked = []
    for code in np.unique(codes):
        members = positions[codes == code]
        n = int(round(fraction * len(members)))
        if len(members) >= 2 and n > 0:
            picked.append(_class_rng(seed, code).permutation(members)[:min(n, len(members) - 1)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def stratified_split(codes: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.1,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """{"train", "val", "test"}: sorted store positions of the labelled cells (`codes` != NO_LABEL)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                             f"and leave cells for training")
    labelled = np.flatnonzero(codes != NO_LABEL).astype(np.int64)
    test = _take(labelled, codes[labelled], test_fraction, seed)
    rest = np.setdiff1d(labelled, test, assume_unique=True)
    # validation's share of what is left, so that it is val_fraction of all labelled cells
    val = _take(rest, codes[rest], val_fraction / (1 - test_fraction), seed + 1)
    return {"train": np.setdiff1d(rest, val, assume_unique=True), "val": val, "test": test}


def kfold_split(codes: np.ndarray, n_folds: int, fold: int, val_fraction: float = 0.1,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified k-fold: test = fold `fold` of `n_folds`; val = a stratified `val_fraction` of the other folds."""
    if n_folds < 2 or not 0 <= fold < n_folds:
        raise UserInputError(f"--fold {fold} must be in [0, --folds {n_folds}) with at least 2 folds")
    labelled = np.flatnonzero(codes != NO_LABEL).astype(np.int64)
    fold_of = np.empty(len(codes), np.int64)
    for code in np.unique(codes[labelled]):
        members = _class_rng(seed, code).permutation(labelled[codes[labelled] == code])
        fold_of[members] = np.arange(len(members)) % n_folds
    test = np.sort(labelled[fold_of[labelled] == fold])
    rest = np.setdiff1d(labelled, test, assume_unique=True)
    val = _take(rest, codes[rest], val_fraction, seed + 1)
    return {"train": np.setdiff1d(rest, val, assume_unique=True), "val": val, "test": test}
