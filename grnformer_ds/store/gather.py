"""Gather stage: assemble output shard k from the scatter units' rows of shard k, in shuffled order, and write it.

Needs every scatter unit done (the barrier). The shard is written to a temporary name and renamed into place; only
then is its done record ``_work/gather/shard-00000k.json`` written, so a shard without a record is redone on rerun.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserInputError
from .atomic import atomic_write_json
from .plan import Plan, source_names
from .scatter import load_unit_stats, unit_dir, unit_done
from .kernels import take_rows
from .spill import read_range, spill_dtype
from .schema import X_INDICES_DTYPE, shard_relpath, work_path
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
def _data_spill_dtypes(store: str, plan_id: str, n_units: int) -> frozenset:
    return frozenset(spill_dtype(unit_dir(store, u) / "data.npy").str for u in range(n_units))


def store_x_dtypes(store: str | Path, plan: Plan) -> tuple[np.dtype, np.dtype]:
    """(X/data dtype, X/indices dtype) of every shard of the store (schema.py): counts stay uint16 only when every
    scatter unit of the whole store could spill them as uint16, so all shards share one dtype."""
    spilled = _data_spill_dtypes(str(store), plan.id, len(plan.units))
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


def run_gather_shard(store: str | Path, plan: Plan, k: int) -> dict:
    """Build output shard `k` (idempotent: returns its record when it is already done)."""
    if shard_done(store, k):
        return json.loads(shard_record_path(store, k).read_text())
    missing = missing_units(store, plan)
    if missing:
        raise UserInputError(f"scatter stage unfinished: {len(missing)} of {len(plan.units)} units missing "
                             f"(first: {missing[0]}); run --stage scatter for every task first", path=str(store))
    meta = plan.meta
    counts, _ = _unit_table(str(store), plan.id, len(plan.units))
    offset = int(counts[:, :k].sum())

    # Read this shard's rows of every unit straight into preallocated arrays (sizes known from the unit stats),
    # values in the store's dtype (read_range widens a uint16 spill when the store needs float32), gene columns in the
    # spills' uint16 (take_rows widens them to int32 while reordering).
    pieces = [(u["unit"], u["input"]) for u in plan.units if counts[u["unit"], k] > 0]
    _, nnz_table = _unit_table(str(store), plan.id, len(plan.units))
    n_rows = int(counts[:, k].sum())
    n_nnz = int(nnz_table[:, k].sum())
    data_dtype, index_dtype = store_x_dtypes(store, plan)
    spill_index_dtypes = {spill_dtype(unit_dir(store, unit) / "indices.npy") for unit, _ in pieces}
    cat = {"dest": np.empty(n_rows, np.int64), "src_row": np.empty(n_rows, np.int64),
           "library_size": np.empty(n_rows, np.float32), "cell_type": np.empty(n_rows, np.int32),
           "input": np.empty(n_rows, np.int32), "indptr": np.zeros(n_rows + 1, np.int64),
           "data": np.empty(n_nnz, data_dtype),
           "indices": np.empty(n_nnz, spill_index_dtypes.pop() if len(spill_index_dtypes) == 1 else index_dtype)}
    name_parts = []
    r = e = 0
    for unit, inp in pieces:
        d = unit_dir(store, unit)
        sp_ = read_range(d / "shard_ptr.npy", k, k + 2)
        a, b = int(sp_[0]), int(sp_[1])
        ip = read_range(d / "indptr.npy", a, b + 1)
        lo, hi = int(ip[0]), int(ip[-1])
        read_range(d / "data.npy", lo, hi, cat["data"][e:e + hi - lo])
        read_range(d / "indices.npy", lo, hi, cat["indices"][e:e + hi - lo])
        cat["indptr"][r + 1:r + b - a + 1] = ip[1:] - lo + e
        for key in ("dest", "src_row", "library_size", "cell_type"):
            read_range(d / f"{key}.npy", a, b, cat[key][r:r + b - a])
        cat["input"][r:r + b - a] = inp
        name_parts.append(read_range(d / "names.npy", a, b))
        r += b - a
        e += hi - lo
    if r != n_rows or e != n_nnz:
        raise UserInputError(f"scatter records of shard {k} disagree with their data; delete _work/scatter and "
                             "rerun", path=str(store))
    names = np.concatenate([n.astype(object) for n in name_parts]) if name_parts else np.zeros(0, dtype=object)
    n_genes = len(meta["gene_keys"])
    order = np.argsort(cat["dest"], kind="stable")  # shuffled order (dest values are unique)
    # one pass: rows in shuffled order, gene columns widened to int32
    indptr, indices, data = take_rows(cat.pop("indptr"), cat.pop("indices"), cat.pop("data"), order,
                                      index_dtype=index_dtype, value_dtype=data_dtype)
    X = CsrArrays(data=data, indices=indices, indptr=indptr, shape=(n_rows, n_genes))
    rel = shard_relpath(k)
    writer = ShardWriter(Path(store) / rel, X)  # X encodes and writes on tensorstore's threads meanwhile
    n = n_rows
    cell_index = offset + np.arange(n, dtype=np.int64)

    obs = pd.DataFrame(index=pd.Index([x.decode("utf-8") for x in names[order]], dtype=object))
    obs["cell_index"] = cell_index
    obs["cell_type"] = pd.Categorical.from_codes(cat["cell_type"][order], categories=meta["cell_types"])
    obs["source_file"] = pd.Categorical.from_codes(cat["input"][order], categories=source_names(meta))
    obs["library_size"] = cat["library_size"][order].astype(np.float32)
    obs["n_genes"] = np.diff(X.indptr).astype(np.int32)

    writer.finish(obs, store_var(plan))
    gather_dir(store).mkdir(parents=True, exist_ok=True)
    # The global input rows held by this shard, for finalize's "every kept cell exactly once" check.
    np.save(gather_dir(store) / f"shard-{k:06d}.rows.npy", cat["src_row"][order])
    record = {"shard": k, "path": rel, "n_cells": int(n), "nnz": int(X.nnz), "cell_offset": offset,
              "checksum": shard_checksum(X.indptr, cell_index)}
    atomic_write_json(shard_record_path(store, k), record)
    return record


