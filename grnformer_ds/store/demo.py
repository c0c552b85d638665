"""Demo store from data that ships inside the scanpy package: pbmc68k_reduced (700 PBMCs, 765 genes, 10 cell types).

Its ``raw.X`` is log-normalised to 1e4 counts per cell (``log1p(x / n_counts * 1e4)``), so the integer counts are
recovered as ``round(expm1(raw.X) * obs.n_counts / 1e4)``. No download is needed on a fresh machine.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

DEMO_CELL_TYPE_KEY = "bulk_labels"


def pbmc68k_counts():
    """pbmc68k_reduced with integer counts in X (700 × 765, CSR float32) and its obs/var; the scanpy copy is
    unchanged."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.to_adata()
    logn = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.rint(np.expm1(logn) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    X = sp.csr_matrix(counts.astype(np.float32))
    return ad.AnnData(X=X, obs=src.obs.copy(), var=raw.var.copy())


def write_demo_h5ad(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pbmc68k_counts().write_h5ad(path)
    return path


def build_demo_store(out: str | Path, overwrite: bool = False, progress: bool = True, **options):
    """Build the demo store at `out` (one shard, cell types from ``bulk_labels``) and return it opened."""
    from .builder import build_store

    with tempfile.TemporaryDirectory(prefix="grnformer_demo_") as tmp:
        h5ad = write_demo_h5ad(Path(tmp) / "pbmc68k_reduced_counts.h5ad")
        options.setdefault("cell_type_key", DEMO_CELL_TYPE_KEY)
        return build_store([str(h5ad)], out, overwrite=overwrite, progress=progress, **options)


def ensure_demo_store(path: str | Path, progress: bool = False) -> Path:
    """Return `path` holding the demo store, building it first when it is not there yet.

    Safe to call from every rank of a distributed job: an exclusive file lock next to the store makes one process
    build it while the others wait and then find it complete. A non-empty directory that is neither a store nor
    an unfinished build is never overwritten (UserInputError); an outdated demo store is rebuilt.
    """
    import fcntl

    from ..errors import UserInputError
    from .manifest import read_manifest
    from .schema import WORK_DIR, manifest_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if manifest_path(path).exists():
            try:
                read_manifest(path)
                return path
            except UserInputError:
                pass  # a demo store of another schema version or a broken one: rebuild it below
        if path.exists() and any(path.iterdir()) and not (path / WORK_DIR).exists():
            raise UserInputError("exists and is neither a store nor an unfinished build; not overwriting it",
                                 path=str(path))
        build_demo_store(path, overwrite=True, progress=progress)
    return path
