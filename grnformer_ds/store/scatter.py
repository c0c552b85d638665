"""Scatter stage: read one row block of one input, check and map it, route its rows to output shards.

A unit's result is one directory ``_work/scatter/u000042/`` of .npy arrays whose rows are sorted by their shuffled
global position (so grouped by output shard); ``shard_ptr[k]:shard_ptr[k+1]`` are the rows of output shard k. It is
written under a temporary name and renamed into place, so an existing unit directory is always complete and a killed
unit is simply redone.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import UserInputError
from .atomic import replace_dir, tmp_suffix
from .direct import OpenedSource, direct_source
from .h5ad_reader import H5adSource
from .kernels import FLAG_NEGATIVE, FLAG_NONFINITE, FLAG_NONINTEGER, FLAG_OVER_U16, count_block, emit_block
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


def unit_src_rows(store: str | Path, unit: int) -> np.ndarray:
    """Global input rows of a unit's kept cells (both unit layouts)."""
    d = unit_dir(store, unit)
    if (d / "cells.npy").is_file():
        return np.load(d / "cells.npy", mmap_mode="r")["src_row"]
    return np.load(d / "src_row.npy")


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


# Per-cell records of a unit (cells.npy), sorted by destination: everything the gather stage needs besides X.
CELL_DTYPE = np.dtype([("dest", "<i8"), ("src_row", "<i8"), ("row_len", "<i8"), ("library_size", "<f4"),
                       ("cell_type", "<i4")])
UNIT_LAYOUT = 2  # stats.json "layout": 2 = cells.npy + names.npy (+ X spill in "spill" mode); absent = older layout


def _direct_enabled() -> bool:
    """GRNFORMER_STORE_DIRECT=0 forces the spill path for every unit (tests compare both; the store is the same)."""
    return os.environ.get("GRNFORMER_STORE_DIRECT", "1") != "0"


def _direct_scan(src: H5adSource, r0: int, r1: int, cmap: np.ndarray):
    """(row_len, lib, flags, total) read with direct.py's pread kernel, or None when this block needs the h5py path
    (input layout not directly readable, non-canonical rows, or invalid values: the h5py path names the problem)."""
    if not _direct_enabled():
        return None
    ds = direct_source(src)
    if ds is None:
        return None
    ip = np.asarray(src._indptr[r0:r1 + 1], dtype=np.int64)
    n_data = int(src._data.shape[0])
    if (len(ip) != r1 - r0 + 1 or int(src._indices.shape[0]) != n_data or (len(ip) and (ip[0] < 0 or ip[-1] > n_data))
            or bool((np.diff(ip) < 0).any())):
        return None
    with OpenedSource(ds) as f:
        status, row_len, lib, flags, total = f.scan(ip, cmap, src.n_vars)
    if status != 0 or flags & (FLAG_NONFINITE | FLAG_NEGATIVE | FLAG_NONINTEGER):
        return None  # non-integer values are rare; the h5py path checks them against --allow-non-integer
    return row_len, lib, flags, total


def run_scatter_unit(store: str | Path, plan: Plan, unit: int) -> dict:
    """Do scatter unit `unit` (idempotent: returns the recorded stats when it is already done).

    "direct" units (the input's CSR arrays can be pread, see direct.py) record only per-cell metadata: gather reads
    their rows from the input. "spill" units also write their rows, mapped and sorted, for gather to read back.
    """
    if unit_done(store, unit):
        return load_unit_stats(store, unit)
    meta = plan.meta
    opts = meta["options"]
    u = meta["units"][unit]
    i, r0, r1 = u["input"], u["r0"], u["r1"]
    inp = meta["inputs"][i]
    path = inp["given_path"]
    cmap = plan.colmap(i)
    G = len(meta["gene_keys"])
    m = None
    with H5adSource(path, layer=opts["layer"], use_raw=opts["use_raw"], gene_id_column=opts["gene_id_column"],
                    read_genes=False) as src:
        if (src.n_obs, src.n_vars) != (inp["n_obs"], inp["n_vars"]):
            raise UserInputError("changed since the build was planned; rerun with --overwrite", path=path)
        scanned = _direct_scan(src, r0, r1, cmap)
        if scanned is None:
            m = src.read_rows(r0, r1)
            # One fused pass: validate values, count each row's mapped nonzero genes and their sum (library size).
            scanned = count_block(m, cmap)
            flags = scanned[2]
            if flags & (FLAG_NONFINITE | FLAG_NEGATIVE) or (flags & FLAG_NONINTEGER and not opts["allow_non_integer"]):
                check_counts(m, path, src.matrix_name, r0, opts["allow_non_integer"])  # raises, naming the row
                raise UserInputError(f"{src.matrix_name} holds invalid values (rows {r0}:{r1})", path=path)
        names = src.obs_names_bytes_slice(r0, r1)
    row_len, lib, flags, total_counts = scanned
    mode = "spill" if m is not None else "direct"
    n = r1 - r0
    mapped_counts = float(lib.sum())

    # Zero-count cells (no counts in store genes) are dropped; the rest are sorted by shuffled position, so the
    # rows of each output shard are one contiguous range of the unit's records.
    kept = np.nonzero(row_len > 0)[0]
    dest = np.asarray(plan.dest()[inp["row_offset"] + r0 + kept])
    order = np.argsort(dest, kind="stable")
    rows = kept[order]
    dest = dest[order]
    # Counts are stored as uint16 when every unit of the store can (schema.py); spills use the same dtypes, and
    # uint16 gene columns below 65,536 genes.
    value_dtype = np.dtype(np.float32 if flags & (FLAG_NONINTEGER | FLAG_OVER_U16) else np.uint16)
    shard_of = dest // meta["shard_size"]
    K = meta["n_out_shards"]
    shard_ptr = np.searchsorted(shard_of, np.arange(K + 1), side="left").astype(np.int64)
    cell_row_len = row_len[rows]
    csum = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(cell_row_len, out=csum[1:])
    shard_nnz = csum[shard_ptr[1:]] - csum[shard_ptr[:-1]]

    name_bytes = names[rows] if len(rows) else np.zeros(0, "S1")
    if len(rows) and (not inp["names_unique"] or meta["prefix_source"]):
        name_list = [nm.decode("utf-8") for nm in name_bytes]
        if not inp["names_unique"]:
            name_list = [f"{nm}-{r0 + r}" for nm, r in zip(name_list, rows.tolist())]
        if meta["prefix_source"]:
            src_name = source_names(meta)[i]
            name_list = [f"{src_name}:{nm}" for nm in name_list]
        name_bytes = np.array([nm.encode("utf-8") for nm in name_list], dtype="S")

    cells = np.empty(len(rows), dtype=CELL_DTYPE)
    cells["dest"] = dest
    cells["src_row"] = inp["row_offset"] + r0 + rows
    cells["row_len"] = cell_row_len
    cells["library_size"] = lib[rows]
    cells["cell_type"] = np.asarray(plan.cell_type_codes(i)[r0 + rows], dtype=np.int32)
    arrays = {"cells": cells, "names": name_bytes}
    if m is not None:
        out_indptr, out_indices, out_data = emit_block(m, cmap, rows, row_len, G, plan.colmap_monotone(i),
                                                       _index_dtype(G), value_dtype)
        del m
        arrays.update({"indptr": out_indptr, "indices": out_indices, "data": out_data})

    final = unit_dir(store, unit)
    tmp = final.with_name(f"{final.name}.{tmp_suffix()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for key, arr in arrays.items():
        np.save(tmp / f"{key}.npy", arr)
    stats = {
        "unit": unit, "input": i, "r0": r0, "r1": r1, "n_rows": n, "n_kept": int(len(rows)),
        "n_zero_dropped": int(n - len(rows)), "total_counts": total_counts, "mapped_counts": mapped_counts,
        "nnz": int(csum[-1]), "shard_counts": np.diff(shard_ptr).tolist(), "shard_nnz": np.asarray(shard_nnz).tolist(),
        "layout": UNIT_LAYOUT, "mode": mode, "value_dtype": value_dtype.name,
    }
    (tmp / "stats.json").write_text(json.dumps(stats))
    replace_dir(tmp, final)
    return stats
