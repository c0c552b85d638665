"""Per-cell labels of a fine-tuning task, as codes over store positions: from the store's own cell types, or from an
obs column of the .h5ad the store was built from (matched by cell name)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from grnformer_ds.errors import UserInputError

NO_LABEL = -100  # cells without a label: in no split, ignored by the loss


@dataclass
class CellLabels:
    """codes: (n_cells,) int64 class of each store position (index into `classes`), `NO_LABEL` for none.
    classes: class names. key: where they came from."""

    codes: np.ndarray
    classes: list[str]
    key: str

    def counts(self) -> dict[str, int]:
        n = np.bincount(self.codes[self.codes >= 0], minlength=len(self.classes))
        return dict(zip(self.classes, n.tolist()))


def _encode(values: pd.Series, key: str, classes: list[str] | None) -> CellLabels:
    known = values.notna() & (values.astype(str).str.len() > 0)
    names = values[known].astype(str)
    found = sorted(names.unique())
    if classes is None:
        classes = found
    else:  # a fixed order (e.g. the binary task's positive class last)
        extra = sorted(set(found) - set(classes))
        if extra:
            raise UserInputError(f"label column {key!r} holds {extra[:3]} besides the expected {classes}")
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.full(len(values), NO_LABEL, dtype=np.int64)
    codes[np.flatnonzero(known.to_numpy())] = names.map(lookup).to_numpy(dtype=np.int64)
    return CellLabels(codes=codes, classes=list(classes), key=key)


def store_cell_types(store) -> CellLabels:
    """The store's cell types (`build_store.py --cell-type-key`)."""
    from grnformer_ds.data.readers import StoreReader

    codes = StoreReader(store.path).cell_type_codes().astype(np.int64)
    codes[codes < 0] = NO_LABEL
    if not store.cell_types or (codes == NO_LABEL).all():
        raise UserInputError("the store has no cell types (build it with --cell-type-key, or give the .h5ad with "
                             "--label-key)", str(store.path))
    return CellLabels(codes=codes, classes=[str(c) for c in store.cell_types], key="cell_type")


def h5ad_labels(store, h5ad: str, key: str, classes: list[str] | None = None) -> CellLabels:
    """obs[`key`] of `h5ad` for each store position, matched by cell name (the store was built from that file)."""
    from grnformer_ds.inference.output import input_obs, store_obs

    source = input_obs(h5ad)
    if key not in source.columns:
        raise UserInputError(f"obs has no column {key!r} (it has: {', '.join(map(str, source.columns[:12]))})", h5ad)
    source.index = source.index.astype(str)
    if not source.index.is_unique:
        raise UserInputError("cell names (obs index) are not unique; labels cannot be matched to cells", h5ad)
    obs = store_obs(store)
    names = obs.index.astype(str)
    missing = ~names.isin(source.index)
    if missing.any():
        raise UserInputError(f"{int(missing.sum())} of the store's cells are not in the file (e.g. "
                             f"{names[missing][0]!r})", h5ad)
    return _encode(source[key].reindex(names).reset_index(drop=True), key, classes)
