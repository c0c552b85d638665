"""`CellRows`: a batch of raw cells as read from the store (CSR arrays + per-cell metadata), before tokenization."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CellRows:
    """B cells in CSR form. Gene references are store gene columns ``j in [0, G)`` (docs/design.md section 1).

    indptr: (B+1,) int64; indices: (nnz,) int32 gene columns; data: (nnz,) float32 raw counts (a block straight from
    `StoreReader.read_range` keeps the store's narrower X dtypes, e.g. uint16; batches are always int32 / float32);
    cell_index: (B,) int64 global store positions; cell_type: (B,) int64 index into manifest ``cell_types``
    (-1 unknown);
    active_regulons: (B, ceil(R/8)) uint8 little-endian packed bitsets, or None when the store has no GRN assets.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    cell_index: np.ndarray
    cell_type: np.ndarray
    active_regulons: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.cell_index)

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(gene columns (n,) int32, counts (n,) float32) of cell ``b``, explicit zeros removed."""
        lo, hi = self.indptr[b], self.indptr[b + 1]
        cols, vals = self.indices[lo:hi], self.data[lo:hi]
        keep = vals != 0
        if not keep.all():
            cols, vals = cols[keep], vals[keep]
        return cols, vals

    @staticmethod
    def concat(parts: list["CellRows"]) -> "CellRows":
        """Stack several CellRows (in order) into one."""
        if len(parts) == 1:
            return parts[0]
        nnz = [int(p.indptr[-1] - p.indptr[0]) for p in parts]
        offsets = np.cumsum([0] + nnz[:-1])
        indptr = np.concatenate([np.zeros(1, np.int64)]
                                + [p.indptr[1:] - p.indptr[0] + o for p, o in zip(parts, offsets)])
        act = None
        if parts[0].active_regulons is not None:
            act = np.concatenate([p.active_regulons for p in parts])
        return CellRows(
            indptr=indptr.astype(np.int64),
            indices=np.concatenate([p.indices[p.indptr[0]:p.indptr[-1]] for p in parts]),
            data=np.concatenate([p.data[p.indptr[0]:p.indptr[-1]] for p in parts]),
            cell_index=np.concatenate([p.cell_index for p in parts]),
            cell_type=np.concatenate([p.cell_type for p in parts]),
            active_regulons=act,
        )

    def take(self, order: np.ndarray) -> "CellRows":
        """Cells ``order`` (int array of row positions), in that order, as a new compact CellRows."""
        lo, hi = self.indptr[order], self.indptr[order + 1]
        lengths = hi - lo
        indptr = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # Gather positions of every kept nonzero: for each row, lo + arange(len).
        pos = np.repeat(lo - indptr[:-1], lengths) + np.arange(indptr[-1])
        return CellRows(
            indptr=indptr,
            indices=self.indices[pos],
            data=self.data[pos],
            cell_index=self.cell_index[order],
            cell_type=self.cell_type[order],
            active_regulons=None if self.active_regulons is None else self.active_regulons[order],
        )
