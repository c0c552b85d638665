"""Gather stage: assemble output shard k from the scatter units' rows of shard k, in shuffled order, and write it.

Needs every scatter unit done (the barrier). The shard is written to a temporary name and renamed into place; only
then is its done record ``_work/gather/shard-00000k.json`` written, so a shard without a record is redone on rerun.
"""
from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserInputError
from .atomic import atomic_write_json
from .direct import OpenedSource, direct_source
from .h5ad_reader import H5adSource
from .kernels import put_rows, run_tasks
from .plan import Plan, source_names
from .scatter import CELL_DTYPE, UNIT_LAYOUT, load_unit_stats, unit_dir, unit_done
from .schema import X_INDICES_DTYPE, shard_relpath, work_path
from .spill import read_range, spill_dtype
from .writer import CsrArrays, ShardWriter, shard_checksum


def gather_dir(store: str | Path) -> Path:
    return work_path(store) / "gather"


def shard_record_path(store: str | Path, k: int) -> Path:
    return gather_dir(store) / f"shard-{k:06d}.json"


def shard_done(store: str | Path, k: int) -> bool:
    return shard_record_path(store, k).is_file()


def missing_units(store: str | Path, plan: Plan) -> list[int]:
    return [u["unit"] for u in plan.units if not unit_done(store, u["unit"])]


@functools.lru_cache(maxsize=4)
def _unit_table(store: str, plan_id: str, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_units, K) kept-cell and nnz counts of every (unit, output shard): the shards' cell offsets come from it."""
    counts, nnz = [], []
    for u in range(n_units):
        st = load_unit_stats(store, u)
        counts.append(st["shard_counts"])
        nnz.append(st["shard_nnz"])
    return np.asarray(counts, dtype=np.int64), np.asarray(nnz, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _unit_value_dtypes(store: str, plan_id: str, n_units: int) -> frozenset:
    """The value dtype each unit could store its counts in (recorded in stats.json; older units: their data spill)."""
    out = set()
    for u in range(n_units):
        st = load_unit_stats(store, u)
        out.add(np.dtype(st["value_dtype"]).str if "value_dtype" in st
                else spill_dtype(unit_dir(store, u) / "data.npy").str)
    return frozenset(out)


@functools.lru_cache(maxsize=4)
def _unit_modes(store: str, plan_id: str, n_units: int) -> tuple[str, ...]:
    """Per unit: "direct" (rows are read from the input), "spill" (rows in the unit dir), "legacy" (older layout)."""
    modes = []
    for u in range(n_units):
        st = load_unit_stats(store, u)
        modes.append(st.get("mode", "legacy") if st.get("layout") == UNIT_LAYOUT else "legacy")
    return tuple(modes)


def store_x_dtypes(store: str | Path, plan: Plan) -> tuple[np.dtype, np.dtype]:
    """(X/data dtype, X/indices dtype) of every shard of the store (schema.py): counts stay uint16 only when every
    scatter unit of the whole store could store them as uint16, so all shards share one dtype."""
    spilled = _unit_value_dtypes(str(store), plan.id, len(plan.units))
    data = np.dtype(np.uint16) if spilled <= {np.dtype(np.uint16).str} else np.dtype(np.float32)
    return data, np.dtype(X_INDICES_DTYPE)


def shard_layout(store: str | Path, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(K,) cells and (K,) nnz of every output shard (after zero-count cells were dropped)."""
    counts, nnz = _unit_table(str(store), plan.id, len(plan.units))
    return counts.sum(0), nnz.sum(0)


def store_var(plan: Plan) -> pd.DataFrame:
    """The store's gene table (same in every shard): index = symbol (made unique), token_id, gene_id when known."""
    meta = plan.meta
    symbols = pd.Index(meta["gene_symbols"])
    if not symbols.is_unique:  # two ids with one symbol (id matching): keep both, suffixed by their id
        dup = symbols.duplicated(keep=False)
        symbols = pd.Index([f"{s}-{k}" if d else s for s, k, d in zip(symbols, meta["gene_keys"], dup)])
    var = pd.DataFrame(index=symbols.astype(str))
    var["token_id"] = np.array([meta["vocab"][k] for k in meta["gene_keys"]], dtype=np.int32)
    if meta["gene_key"] == "gene_id":
        var["gene_id"] = np.array(meta["gene_keys"], dtype=object)
    return var


@functools.lru_cache(maxsize=64)
def _direct_input(plan_dir: str, plan_id: str, i: int, path: str, layer, use_raw: bool):
    """(DirectSource, whole indptr int64) of input i, once per worker process."""
    with H5adSource(path, layer=layer, use_raw=use_raw, read_genes=False) as src:
        ds = direct_source(src)
        if ds is None:
            raise UserInputError("changed since the build was planned (its count matrix can no longer be read "
                                 "directly); rerun with --overwrite", path=path)
        return ds, np.asarray(src._indptr[:], dtype=np.int64)


def _read_unit_piece(d: Path, mode: str, a: int, b: int, cells: np.ndarray) -> None:
    """Records [a, b) of a unit into `cells` (CELL_DTYPE); older unit layouts kept one .npy per field."""
    if mode != "legacy":
        read_range(d / "cells.npy", a, b, cells)
        return
    for key in ("dest", "src_row", "library_size", "cell_type"):
        cells[key] = read_range(d / f"{key}.npy", a, b)
    cells["row_len"] = np.diff(read_range(d / "indptr.npy", a, b + 1))


_BUFFERS = threading.local()


def _buffer(name: str, n: int, dtype) -> np.ndarray:
    """An uninitialized (n,) array of `dtype`, reusing this thread's buffer `name` from the previous shard.

    A shard's X arrays are hundreds of MB: fresh ones cost a page fault and the kernel zeroing of every page (~10% of
    the gather stage, measured with perf), and the previous shard's are free again once its writes are done (the
    writer waits for them before returning). Grow-only, so a worker's RSS stays flat at its largest shard.
    """
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    pool = getattr(_BUFFERS, "pool", None)
    if pool is None:
        pool = _BUFFERS.pool = {}
    buf = pool.get(name)
    if buf is None or buf.nbytes < nbytes:
        pool[name] = None
        buf = pool[name] = np.empty(nbytes + nbytes // 16, dtype=np.uint8)
    return buf[:nbytes].view(dtype)


def _decode_names(b: np.ndarray) -> np.ndarray:
    """A fixed-width bytes array of UTF-8 names as an object array of str (vectorized when all ASCII)."""
    b = np.ascontiguousarray(b)
    if b.size and b.dtype.kind == "S" and int(b.view(np.uint8).max()) < 128:
        return b.astype("U").astype(object)
    return np.array([x.decode("utf-8") for x in b], dtype=object)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(x), int(y)) for x, y in zip(cuts[:-1], cuts[1:]) if y > x]


def run_gather_shard(store: str | Path, plan: Plan, k: int) -> dict:
    """Build output shard `k` (idempotent: returns its record when it is already done)."""
    if shard_done(store, k):
        return json.loads(shard_record_path(store, k).read_text())
    missing = missing_units(store, plan)
    if missing:
        raise UserInputError(f"scatter stage unfinished: {len(missing)} of {len(plan.units)} units missing "
                             f"(first: {missing[0]}); run --stage scatter for every task first", path=str(store))
    meta = plan.meta
    opts = meta["options"]
    n_units = len(plan.units)
    counts, nnz_table = _unit_table(str(store), plan.id, n_units)
    modes = _unit_modes(str(store), plan.id, n_units)
    offset = int(counts[:, :k].sum())
    starts = np.zeros((n_units, counts.shape[1] + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=starts[:, 1:])

    # 1. this shard's cell records of every unit, and the X rows of the units that spilled them (read straight into
    #    preallocated staging arrays, values in the store's dtype, gene columns in the spills' dtype)
    pieces = [(u["unit"], u["input"]) for u in plan.units if counts[u["unit"], k] > 0]
    n_rows = int(counts[:, k].sum())
    data_dtype, index_dtype = store_x_dtypes(store, plan)
    spilled = [(unit, inp) for unit, inp in pieces if modes[unit] != "direct"]
    st_nnz = int(sum(nnz_table[unit, k] for unit, _ in spilled))
    spill_index_dtypes = {spill_dtype(unit_dir(store, unit) / "indices.npy") for unit, _ in spilled}
    st_indices = np.empty(st_nnz, spill_index_dtypes.pop() if len(spill_index_dtypes) == 1 else index_dtype)
    st_data = np.empty(st_nnz, data_dtype)
    st_indptr = [np.zeros(1, np.int64)]
    cells = np.empty(n_rows, dtype=CELL_DTYPE)
    cell_input = np.empty(n_rows, np.int32)
    staged = np.full(n_rows, -1, np.int64)  # staging row of a spilled cell, -1 for a direct one
    name_parts = []
    r = e = s_rows = 0
    for unit, inp in pieces:
        d = unit_dir(store, unit)
        a, b = int(starts[unit, k]), int(starts[unit, k + 1])
        _read_unit_piece(d, modes[unit], a, b, cells[r:r + b - a])
        cell_input[r:r + b - a] = inp
        name_parts.append(read_range(d / "names.npy", a, b))
        if modes[unit] != "direct":
            ip = read_range(d / "indptr.npy", a, b + 1)
            lo, hi = int(ip[0]), int(ip[-1])
            read_range(d / "data.npy", lo, hi, st_data[e:e + hi - lo])
            read_range(d / "indices.npy", lo, hi, st_indices[e:e + hi - lo])
            st_indptr.append(ip[1:] - lo + e)
            staged[r:r + b - a] = np.arange(s_rows, s_rows + b - a)
            s_rows += b - a
            e += hi - lo
        r += b - a
    if r != n_rows or e != st_nnz or int(cells["row_len"].sum()) != int(nnz_table[:, k].sum()):
        raise UserInputError(f"scatter records of shard {k} disagree with their data; delete _work/scatter and "
                             "rerun", path=str(store))
    names = np.concatenate(name_parts) if name_parts else np.zeros(0, dtype="S1")
    n_genes = len(meta["gene_keys"])
    order = np.argsort(cells["dest"], kind="stable")  # shuffled order (dest values are unique)
    cells = cells[order]
    cell_input = cell_input[order]
    staged = staged[order]

    # 2. X in shuffled order: each row copied once, to its final place (rows of different tasks are disjoint)
    indptr = _buffer("indptr", n_rows + 1, np.int64)
    indptr[0] = 0
    np.cumsum(cells["row_len"], out=indptr[1:])
    nnz = int(indptr[-1])
    indices = _buffer("indices", nnz, index_dtype)
    data = _buffer("data", nnz, data_dtype)
    tasks = []
    is_direct = staged < 0
    if (~is_direct).any():
        sel = np.nonzero(~is_direct)[0]
        st_ip = np.concatenate(st_indptr)
        for x, y in _split(len(sel), 2):
            tasks.append((put_rows, (st_ip, st_indices, st_data, staged[sel[x:y]], indptr[sel[x:y]], indices, data)))
    opened = []
    try:
        for i in np.unique(cell_input[is_direct]).tolist():
            inp = meta["inputs"][i]
            ds, in_indptr = _direct_input(str(plan.dir), plan.id, i, inp["given_path"], opts["layer"],
                                          bool(opts["use_raw"]))
            f = OpenedSource(ds, fingerprint=inp)
            opened.append(f)
            sel = np.nonzero(is_direct & (cell_input == i))[0]
            local = cells["src_row"][sel] - inp["row_offset"]
            # read in file order (each row lands at its own shuffled place anyway): one forward sweep per input, so
            # the OS read-ahead helps when the inputs are not in the page cache (files larger than RAM)
            by_row = np.argsort(local, kind="stable")
            sel, local = sel[by_row], local[by_row]
            cmap, monotone = plan.colmap(i).astype(np.int32), plan.colmap_monotone(i)
            for x, y in _split(len(sel), 2):
                tasks.append((f.read_rows, (in_indptr, local[x:y], indptr[sel[x:y]], cells["row_len"][sel[x:y]],
                                            cmap, n_genes, monotone, indices, data)))
        if any(status != 0 for status in run_tasks(tasks)):
            raise UserInputError("input changed since the scatter stage (rows differ); rerun with --overwrite",
                                 path=str(store))
    finally:
        for f in opened:
            f.__exit__()

    X = CsrArrays(data=data, indices=indices, indptr=indptr, shape=(n_rows, n_genes))
    rel = shard_relpath(k)
    writer = ShardWriter(Path(store) / rel, X)  # X encodes and writes on tensorstore's threads meanwhile
    n = n_rows
    cell_index = offset + np.arange(n, dtype=np.int64)

    obs = pd.DataFrame(index=pd.Index(_decode_names(names[order]), dtype=object))
    obs["cell_index"] = cell_index
    obs["cell_type"] = pd.Categorical.from_codes(cells["cell_type"], categories=meta["cell_types"])
    obs["source_file"] = pd.Categorical.from_codes(cell_input, categories=source_names(meta))
    obs["library_size"] = cells["library_size"].astype(np.float32)
    obs["n_genes"] = np.diff(X.indptr).astype(np.int32)

    writer.finish(obs, store_var(plan))
    gather_dir(store).mkdir(parents=True, exist_ok=True)
    # The global input rows held by this shard, for finalize's "every kept cell exactly once" check.
    np.save(gather_dir(store) / f"shard-{k:06d}.rows.npy", np.ascontiguousarray(cells["src_row"]))
    record = {"shard": k, "path": rel, "n_cells": int(n), "nnz": int(X.nnz), "cell_offset": offset,
              "checksum": shard_checksum(X.indptr, cell_index)}
    atomic_write_json(shard_record_path(store, k), record)
    return record
