"""Finalize: verify every shard and the permutation, then write vocab.json and manifest.json (atomically, last)."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from ..errors import UserInputError
from .atomic import atomic_write_json
from .gather import gather_dir, missing_units, shard_done, shard_record_path
from .manifest import write_manifest
from .plan import Plan, load_plan
from .scatter import load_unit_stats, unit_src_rows
from .schema import FORMAT, SCHEMA_VERSION, SHARDS_DIR, SPECIAL_TOKENS, shard_relpath, vocab_path, work_path
from .vocab import vocab_sha256
from .writer import shard_checksum


def mapping_report(store: str | Path, plan: Plan) -> list[dict]:
    """Per input: cells read / kept / dropped (zero counts), genes mapped, and the fraction of counts mapped."""
    agg = [{"n_cells": 0, "n_cells_kept": 0, "n_zero_cells_dropped": 0, "total": 0.0, "mapped": 0.0}
           for _ in plan.meta["inputs"]]
    for u in plan.units:
        st = load_unit_stats(store, u["unit"])
        a = agg[st["input"]]
        a["n_cells"] += st["n_rows"]
        a["n_cells_kept"] += st["n_kept"]
        a["n_zero_cells_dropped"] += st["n_zero_dropped"]
        a["total"] += st["total_counts"]
        a["mapped"] += st["mapped_counts"]
    report = []
    for inp, a in zip(plan.meta["inputs"], agg):
        report.append({
            "path": inp["given_path"], "name": inp["name"], "matrix": inp["matrix"], "n_cells": a["n_cells"],
            "n_cells_kept": a["n_cells_kept"], "n_zero_cells_dropped": a["n_zero_cells_dropped"],
            "n_genes": inp["n_vars"], "n_genes_mapped": inp["n_genes_mapped"],
            "count_fraction_mapped": (a["mapped"] / a["total"]) if a["total"] > 0 else 0.0,
            "total_counts": a["total"],
        })
    return report


def check_mapping(report: list[dict], min_fraction: float) -> None:
    """Fail (naming the file) when an input's mapped count fraction is below `min_fraction`."""
    for r in report:
        if r["count_fraction_mapped"] < min_fraction:
            raise UserInputError(
                f"only {r['count_fraction_mapped']:.1%} of the counts ({r['n_genes_mapped']} of {r['n_genes']} genes) "
                f"map to the store's genes, below --min-mapped-fraction {min_fraction:g}; check --gene-vocab / "
                "--gene-id-column", path=r["path"])


def _verify_shard(store: Path, rec: dict, verify_data: bool) -> None:
    where = str(store / rec["path"])
    try:
        g = zarr.open_group(store / rec["path"], mode="r")
        indptr = g["X/indptr"][...]
        cell_index = g["obs/cell_index"][...]
        shape = list(g["X"].attrs["shape"])
    except Exception as exc:  # noqa: BLE001 - any failure to read back means a broken shard
        raise UserInputError(f"shard unreadable ({exc.__class__.__name__}: {exc}); delete "
                             f"{shard_record_path(store, rec['shard'])} and rerun to rebuild it", path=where) from None
    n = rec["n_cells"]
    ok = (len(indptr) == n + 1 and int(indptr[-1]) == rec["nnz"] and shape[0] == n
          and np.array_equal(cell_index, rec["cell_offset"] + np.arange(n))
          and shard_checksum(indptr, cell_index) == rec["checksum"])
    if ok and verify_data:
        # decoding checks every inner chunk's crc32c; then the CSR invariants
        try:
            indices = g["X/indices"][...]
            data = g["X/data"][...]
        except Exception as exc:  # noqa: BLE001
            raise UserInputError(f"shard data unreadable or corrupt ({exc.__class__.__name__}: {exc})",
                                 path=where) from None
        ok = (len(indices) == len(data) == rec["nnz"] and (indices.size == 0 or
              (int(indices.min()) >= 0 and int(indices.max()) < shape[1])) and bool(np.all(data > 0)))
    if not ok:
        raise UserInputError("shard does not match its build record (cells, nnz, cell_index or checksum); delete "
                             f"{shard_record_path(store, rec['shard'])} and rerun to rebuild it", path=where)


def finalize_store(store: str | Path, verify_data: bool = False, keep_work: bool = False, log=print) -> dict:
    """Verify a fully gathered build and publish it (manifest.json last). Returns the manifest."""
    store = Path(store)
    plan = load_plan(store)
    if plan is None:
        raise UserInputError("no unfinished build here (no _work/plan); nothing to finalize", path=str(store))
    missing = missing_units(store, plan)
    if missing:
        raise UserInputError(f"cannot finalize: {len(missing)} scatter unit(s) unfinished (first: {missing[0]})",
                             path=str(store))
    K = plan.n_out_shards
    todo = [k for k in range(K) if not shard_done(store, k)]
    if todo:
        raise UserInputError(f"cannot finalize: {len(todo)} of {K} shard(s) not gathered (first: {todo[0]})",
                             path=str(store))
    report = mapping_report(store, plan)
    check_mapping(report, plan.meta["options"]["min_mapped_fraction"])

    records = [json.loads(shard_record_path(store, k).read_text()) for k in range(K)]
    # Permutation coverage: every kept input row appears in exactly one shard, and nothing else does.
    N = plan.meta["n_total"]
    expected = np.zeros(N, dtype=bool)
    for u in plan.units:
        expected[unit_src_rows(store, u["unit"])] = True
    seen = np.zeros(N, dtype=bool)
    offset = 0
    for rec in records:
        if rec["cell_offset"] != offset:
            raise UserInputError(f"shard {rec['shard']} starts at cell {rec['cell_offset']}, expected {offset}",
                                 path=str(store))
        offset += rec["n_cells"]
        rows = np.load(gather_dir(store) / f"shard-{rec['shard']:06d}.rows.npy")
        if len(rows) != rec["n_cells"] or len(np.unique(rows)) != len(rows) or seen[rows].any():
            raise UserInputError(f"shard {rec['shard']} duplicates cells; delete _work/gather and rerun",
                                 path=str(store))
        seen[rows] = True
        _verify_shard(store, rec, verify_data)
    if not np.array_equal(seen, expected):
        raise UserInputError(f"{int((expected & ~seen).sum())} kept cells are missing from the shards",
                             path=str(store))

    meta = plan.meta
    vocab = meta["vocab"]
    atomic_write_json(vocab_path(store), vocab)
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "complete": True,
        "n_cells": int(offset), "n_genes": len(meta["gene_keys"]), "nnz": int(sum(r["nnz"] for r in records)),
        "vocab_size": int(max(vocab.values()) + 1),
        "special_tokens": {t: vocab[t] for t in SPECIAL_TOKENS}, "vocab_sha256": vocab_sha256(vocab),
        "gene_key": meta["gene_key"], "gene_id_column": meta["options"]["gene_id_column"],
        "cell_type_key": meta["options"]["cell_type_key"], "cell_types": meta["cell_types"],
        "matrix": meta["options"]["layer"] and f"layers/{meta['options']['layer']}" or (
            "raw.X" if meta["options"]["use_raw"] else "X"),
        "integer_counts": not meta["options"]["allow_non_integer"],
        "shard_size": meta["shard_size"],
        "shards": [{k: r[k] for k in ("path", "n_cells", "nnz", "cell_offset", "checksum")} for r in records],
        "inputs": [{k: v for k, v in r.items() if k != "total_counts"} for r in report],
        "n_zero_cells_dropped": int(sum(r["n_zero_cells_dropped"] for r in report)),
        "seed": meta["options"]["seed"],
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "assets": {},
    }
    write_manifest(store, manifest)
    # Leftovers of killed jobs (tmp shard dirs) and shards of an older plan are not part of the store.
    listed = {shard_relpath(r["shard"]) for r in records}
    for p in (store / SHARDS_DIR).iterdir():
        if f"{SHARDS_DIR}/{p.name}" not in listed:
            shutil.rmtree(p, ignore_errors=True)
    if not keep_work:
        shutil.rmtree(work_path(store), ignore_errors=True)
    return manifest
