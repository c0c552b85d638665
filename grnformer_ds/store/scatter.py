"""Scatter stage: read one row block of one input, check and map it, route its rows to output shards.

A unit's result is one directory ``_work/scatter/u000042/`` of .npy arrays whose rows are sorted by their shuffled
global position (so grouped by output shard); ``shard_ptr[k]:shard_ptr[k+1]`` are the rows of output shard k. It is
written under a temporary name and renamed into place, so an existing unit directory is always complete and a killed
unit is simply redone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserInputError
from .atomic import replace_dir, tmp_suffix
from .h5ad_reader import H5adSource
from .kernels import FLAG_NONFINITE, FLAG_NEGATIVE, FLAG_NONINTEGER, FLAG_OVER_U16, count_block, emit_block
from .plan import Plan, source_names
from .schema import work_path


def scatter_dir(store: str | Path) -> Path:
    return work_path(store) / "scatter"


def unit_dir(store: str | Path, unit: int) -> Path:
    return scatter_dir(store) / f"u{unit:06d}"


def unit_done(store: str | Path, unit: int) -> bool:
    return (unit_dir(store, unit) / "stats.json").is_file()


def load_unit_stats(store: str | Path, unit: int) -> dict:
    return json.loads((unit_dir(store, unit) / "stats.json").read_text())


def check_counts(m: sp.csr_matrix, path: str, matrix: str, r0: int, allow_non_integer: bool) -> None:
    """Raise UserInputError for NaN/inf, negative or (unless allowed) non-integer stored values.

    The common (valid) case costs two reductions and one rint comparison; the slower per-kind masks only run to
    name the first bad row.
    """
    d = m.data
    if d.size == 0:
        return
    lo, hi = d.min(), d.max()
    if d.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        bad = ~np.isfinite(d)
        raise UserInputError(f"{matrix} holds NaN or infinite values (first at row {_row_of(m, bad, r0)})", path=path)
    if lo < 0:
        raise UserInputError(f"{matrix} holds negative counts (first at row {_row_of(m, d < 0, r0)}); expected raw "
                             "counts", path=path)
    if d.dtype.kind == "f" and not allow_non_integer and not np.array_equal(d, np.rint(d)):
        bad = d != np.rint(d)
        raise UserInputError(
            f"{matrix} holds non-integer values (first at row {_row_of(m, bad, r0)}, e.g. {d[bad][0]:.4g}); "
            "expected raw counts: pick them with --layer/--use-raw, or pass --allow-non-integer for normalized "
            "data", path=path)


def _row_of(m: sp.csr_matrix, bad: np.ndarray, r0: int) -> int:
    first = int(np.argmax(bad))
    return r0 + int(np.searchsorted(m.indptr, first, side="right")) - 1


def _index_dtype(n_genes: int) -> np.dtype:
    """Narrowest dtype for gene columns in the spill (uint16 below 65,536 genes: a quarter less spill IO)."""
    return np.dtype(np.uint16) if n_genes <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def run_scatter_unit(store: str | Path, plan: Plan, unit: int) -> dict:
    """Do scatter unit `unit` (idempotent: returns the recorded stats when it is already done)."""
    if unit_done(store, unit):
        return load_unit_stats(store, unit)
    meta = plan.meta
    opts = meta["options"]
    u = meta["units"][unit]
    i, r0, r1 = u["input"], u["r0"], u["r1"]
    inp = meta["inputs"][i]
    path = inp["given_path"]
    with H5adSource(path, layer=opts["layer"], use_raw=opts["use_raw"], gene_id_column=opts["gene_id_column"],
                    read_genes=False) as src:
        if (src.n_obs, src.n_vars) != (inp["n_obs"], inp["n_vars"]):
            raise UserInputError("changed since the build was planned; rerun with --overwrite", path=path)
        m = src.read_rows(r0, r1)
        names = src.obs_names_slice(r0, r1)
    n = r1 - r0
    G = len(meta["gene_keys"])

    # One fused pass: validate values, count each row's mapped nonzero genes and their sum (library size).
    cmap = plan.colmap(i)
    row_len, lib, flags, total_counts = count_block(m, cmap)
    if flags & (FLAG_NONFINITE | FLAG_NEGATIVE) or (flags & FLAG_NONINTEGER and not opts["allow_non_integer"]):
        check_counts(m, path, src.matrix_name, r0, opts["allow_non_integer"])  # raises, naming the first bad row
        raise UserInputError(f"{src.matrix_name} holds invalid values (rows {r0}:{r1})", path=path)
    mapped_counts = float(lib.sum())

    # Zero-count cells (no counts in store genes) are dropped; the rest are sorted by shuffled position, so the
    # rows of each output shard are one contiguous range of the spill.
    kept = np.nonzero(row_len > 0)[0]
    dest = np.asarray(plan.dest()[inp["row_offset"] + r0 + kept])
    order = np.argsort(dest, kind="stable")
    rows = kept[order]
    dest = dest[order]
    # Spill dtypes: uint16 columns below 65,536 genes and uint16 values for counts below 65,536 (nearly always),
    # halving the bytes written here and read back by gather; shards store int32 / float32 either way.
    value_dtype = np.float32 if flags & (FLAG_NONINTEGER | FLAG_OVER_U16) else np.uint16
    out_indptr, out_indices, out_data = emit_block(m, cmap, rows, row_len, G, plan.colmap_monotone(i),
                                                   _index_dtype(G), value_dtype)
    del m
    shard_of = dest // meta["shard_size"]
    K = meta["n_out_shards"]
    shard_ptr = np.searchsorted(shard_of, np.arange(K + 1), side="left").astype(np.int64)
    shard_nnz = out_indptr[shard_ptr[1:]] - out_indptr[shard_ptr[:-1]]

    name_list = names[rows]
    if not inp["names_unique"]:
        name_list = np.array([f"{nm}-{r0 + r}" for nm, r in zip(name_list, rows)], dtype=object)
    if meta["prefix_source"]:
        src_name = source_names(meta)[i]
        name_list = np.array([f"{src_name}:{nm}" for nm in name_list], dtype=object)
    name_bytes = np.array([nm.encode("utf-8") for nm in name_list], dtype="S") if len(rows) else np.zeros(0, "S1")

    final = unit_dir(store, unit)
    tmp = final.with_name(f"{final.name}.{tmp_suffix()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays = {
        "shard_ptr": shard_ptr, "dest": dest.astype(np.int64), "indptr": out_indptr,
        "indices": out_indices, "data": out_data,
        "src_row": (inp["row_offset"] + r0 + rows).astype(np.int64), "library_size": lib[rows].astype(np.float32),
        "cell_type": np.asarray(plan.cell_type_codes(i)[r0 + rows], dtype=np.int32), "names": name_bytes,
    }
    for key, arr in arrays.items():
        np.save(tmp / f"{key}.npy", arr)
    stats = {
        "unit": unit, "input": i, "r0": r0, "r1": r1, "n_rows": n, "n_kept": int(len(rows)),
        "n_zero_dropped": int(n - len(rows)), "total_counts": total_counts, "mapped_counts": mapped_counts,
        "nnz": int(out_indptr[-1]), "shard_counts": np.diff(shard_ptr).tolist(), "shard_nnz": np.asarray(shard_nnz).tolist(),
    }
    (tmp / "stats.json").write_text(json.dumps(stats))
    replace_dir(tmp, final)
    return stats
