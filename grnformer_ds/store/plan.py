"""The build plan: inputs, gene vocabulary, per-input column maps, cell-type categories, scatter units and the global
seeded permutation. Computed from the inputs' metadata only (no X reads beyond CSR indptr), deterministic, and
written once under STORE/_work/plan/ so every job of a build (workers, array tasks, reruns) shares it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserInputError
from .atomic import atomic_write_json, tmp_suffix
from .h5ad_reader import H5adSource
from .options import BuildOptions
from .schema import SPECIAL_TOKENS, work_path
from .vocab import (
    build_union_vocab,
    check_unique_genes,
    complete_vocab,
    load_vocab,
    normalize_gene_keys,
    vocab_genes,
)

PLAN_VERSION = 1


def input_fingerprint(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except OSError:
        raise UserInputError("input file not found", path=path) from None
    if not Path(path).is_file():
        raise UserInputError("input is not a file", path=path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_id(opts: BuildOptions) -> str:
    """Hash of the content options and every input's (path, size, mtime): a changed input means a new plan."""
    payload = {"v": PLAN_VERSION, "options": opts.content(),
               "inputs": [input_fingerprint(p) for p in opts.inputs]}
    if opts.gene_vocab:
        payload["vocab_file"] = hashlib.sha256(load_vocab_bytes(opts.gene_vocab)).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def load_vocab_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        raise UserInputError("vocabulary file not found or unreadable", path=path) from None


@dataclass
class Plan:
    """The loaded plan. ``meta`` is plan.json; the arrays are memory-mapped from _work/plan/."""

    dir: Path
    meta: dict

    @property
    def id(self) -> str:
        return self.meta["plan_id"]

    @property
    def n_out_shards(self) -> int:
        return self.meta["n_out_shards"]

    @property
    def units(self) -> list[dict]:
        return self.meta["units"]

    def dest(self) -> np.ndarray:
        """(N,) int64: shuffled position of every input row (inputs concatenated in the given order)."""
        return np.load(self.dir / "dest.npy", mmap_mode="r")

    def colmap(self, input_index: int) -> np.ndarray:
        """(n_vars,) int64 store column of each gene of input `input_index`, -1 where unmapped."""
        return np.load(self.dir / f"colmap-{input_index:05d}.npy")

    def colmap_monotone(self, input_index: int) -> bool:
        """True when the input's mapped genes are already in store-column order (rows then need no sort)."""
        cmap = self.colmap(input_index)
        cmap = cmap[cmap >= 0]
        return bool(np.all(np.diff(cmap) > 0))

    def cell_type_codes(self, input_index: int) -> np.ndarray:
        """(n_obs,) int32 index into ``meta["cell_types"]`` of each cell of the input, -1 = unknown."""
        return np.load(self.dir / f"celltype-{input_index:05d}.npy", mmap_mode="r")


def source_names(meta: dict) -> list[str]:
    """Name of each input as recorded in obs["source_file"]: the file name, or the given path when names clash."""
    names = [inp["name"] for inp in meta["inputs"]]
    if len(set(names)) != len(names):
        names = [inp["given_path"] for inp in meta["inputs"]]
    return names


def plan_dir(store: str | Path) -> Path:
    return work_path(store) / "plan"


def load_plan(store: str | Path) -> Plan | None:
    d = plan_dir(store)
    try:
        meta = json.loads((d / "plan.json").read_text())
    except FileNotFoundError:
        return None
    return Plan(d, meta)


def make_plan(opts: BuildOptions, log=print) -> Plan:
    """Load the plan of this build from STORE/_work, or compute and write it. Raises UserInputError on bad input."""
    pid = plan_id(opts)
    existing = load_plan(opts.out)
    if existing is not None:
        if existing.id == pid:
            return existing
        raise UserInputError(
            "holds an unfinished build of other inputs or options; rerun with the same arguments to resume, or "
            "pass --overwrite to discard it", path=opts.out)

    by = "gene_id" if opts.gene_id_column else "symbol"
    inputs: list[dict] = []
    gene_keys: list[list[str]] = []
    symbols_by_key: dict[str, str] = {}
    cell_type_cols: list[pd.Categorical | None] = []
    name_hashes: list[np.ndarray] = []
    row_offset = 0
    for path in opts.inputs:
        with H5adSource(path, layer=opts.layer, use_raw=opts.use_raw, gene_id_column=opts.gene_id_column) as src:
            keys = normalize_gene_keys(src.gene_ids if by == "gene_id" else src.gene_symbols, by)
            check_unique_genes(keys, path, "gene ids" if by == "gene_id" else "gene names")
            for k, s in zip(keys, src.gene_symbols):
                symbols_by_key.setdefault(k, s)
            ct = None
            if opts.cell_type_key:
                ct = src.obs_column(opts.cell_type_key)
                if ct is None:
                    raise UserInputError(f"obs has no column {opts.cell_type_key!r} (--cell-type-key)", path=path)
            names = src.obs_names_bytes_slice(0, src.n_obs)  # UTF-8 bytes: equal names <=> equal bytes
            if len(names) != src.n_obs:
                raise UserInputError(f"obs has {len(names)} cells but {src.matrix_name} has {src.n_obs} rows",
                                     path=path)
            hashes = _name_hashes(names)
            names_unique = _all_distinct(hashes, [names])
            name_hashes.append((hashes, names))
            units = _split_units(src, opts)
            inputs.append({
                **input_fingerprint(path), "name": Path(path).name, "given_path": path, "n_obs": src.n_obs,
                "n_vars": src.n_vars, "format": src.format, "matrix": src.matrix_name, "dtype": str(src.dtype),
                "row_offset": row_offset, "names_unique": bool(names_unique), "n_units": len(units)})
            inputs[-1]["_units"] = units
            gene_keys.append(keys)
            cell_type_cols.append(ct)
            row_offset += src.n_obs
    n_total = row_offset
    if n_total == 0:
        raise UserInputError("the inputs hold no cells", path=opts.inputs[0])

    # Globally unique cell names: prefix the source file name only when names clash across inputs.
    prefix_source = not _all_distinct(np.concatenate([h for h, _ in name_hashes]), [n for _, n in name_hashes])
    del name_hashes

    # Vocabulary and the store's gene columns.
    if opts.gene_vocab:
        vocab = complete_vocab(load_vocab(opts.gene_vocab))
        store_keys = vocab_genes(vocab)
    else:
        vocab = build_union_vocab(gene_keys)
        store_keys = [k for k in vocab if k not in SPECIAL_TOKENS]
    col_of = {k: j for j, k in enumerate(store_keys)}

    # Cell types: sorted union of every input's categories. Cells of an input without the column, or with a missing
    # value, get code -1 (NaN in the shard's categorical, cell_type_ids -1 in batches).
    cats: set[str] = set()
    for ct in cell_type_cols:
        if ct is not None:
            cats.update(str(c) for c in ct.categories)
    cell_types = sorted(cats)

    tmp = plan_dir(opts.out).with_name(f"plan.{tmp_suffix()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    units: list[dict] = []
    for i, (inp, keys) in enumerate(zip(inputs, gene_keys)):
        cmap = np.array([col_of.get(k, -1) if k else -1 for k in keys], dtype=np.int64)
        np.save(tmp / f"colmap-{i:05d}.npy", cmap)
        inp["n_genes_mapped"] = int((cmap >= 0).sum())
        if inp["n_genes_mapped"] == 0:
            raise UserInputError(
                f"no gene of this input is in the {'given vocabulary' if opts.gene_vocab else 'store'} "
                f"(matched by {by}{' column ' + repr(opts.gene_id_column) if opts.gene_id_column else ''}; first "
                f"genes: {', '.join(keys[:3])})", path=inp["given_path"])
        ct = cell_type_cols[i]
        if ct is not None:
            pos = {c: j for j, c in enumerate(cell_types)}
            code_map = np.array([pos[str(c)] for c in ct.categories] + [-1], dtype=np.int32)
            codes = np.asarray(ct.codes, dtype=np.int64)
            np.save(tmp / f"celltype-{i:05d}.npy", code_map[codes])  # code -1 (NaN) → last entry → -1 = unknown
        else:
            np.save(tmp / f"celltype-{i:05d}.npy", np.full(inp["n_obs"], -1, dtype=np.int32))
        for r0, r1 in inp.pop("_units"):
            units.append({"unit": len(units), "input": i, "r0": r0, "r1": r1})

    # Global seeded permutation: dest[g] = shuffled position of input row g (inputs concatenated in order).
    dest = np.random.default_rng(opts.seed).permutation(n_total).astype(np.int64)
    np.save(tmp / "dest.npy", dest)
    del dest

    store_symbols = [symbols_by_key.get(k, k) for k in store_keys]
    meta = {
        "plan_version": PLAN_VERSION, "plan_id": pid, "options": opts.content(), "gene_key": by,
        "inputs": inputs, "n_total": n_total, "shard_size": opts.shard_size,
        "n_out_shards": math.ceil(n_total / opts.shard_size), "units": units, "prefix_source": prefix_source,
        "vocab": vocab, "gene_keys": store_keys, "gene_symbols": store_symbols, "cell_types": cell_types,
    }
    atomic_write_json(tmp / "plan.json", meta, compact=True)
    final = plan_dir(opts.out)
    if final.exists():  # another array task finished the same deterministic plan first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        plan = load_plan(opts.out)
        if plan is None or plan.id != pid:
            raise UserInputError("holds a build plan written concurrently with other arguments", path=opts.out)
        return plan
    try:
        os.rename(tmp, final)
    except OSError:  # lost a race to another task writing the identical plan
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"plan: {n_total} cells in {len(inputs)} input(s), {len(store_keys)} genes, "
        f"{meta['n_out_shards']} output shard(s), {len(units)} scatter unit(s)")
    return load_plan(opts.out)


def _name_hashes(names: np.ndarray) -> np.ndarray:
    """(n,) uint64 hash of each fixed-width bytes name (vectorized FNV-1a over its non-NUL bytes)."""
    n = len(names)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    if n == 0 or names.dtype.itemsize == 0:
        return h
    cols = np.ascontiguousarray(names).view(np.uint8).reshape(n, names.dtype.itemsize)
    prime = np.uint64(0x100000001B3)
    for j in range(cols.shape[1]):
        c = cols[:, j]
        # NUL bytes are padding (an "S" array of another width holds the same name): they do not change the hash
        h = np.where(c != 0, (h ^ c) * prime, h)
    return h


def _all_distinct(hashes: np.ndarray, names: list[np.ndarray]) -> bool:
    """True when no two names are equal: a sort of the hashes, and an exact check only when two hashes collide."""
    s = np.sort(hashes)
    if not bool((s[1:] == s[:-1]).any()):
        return True
    seen: set[bytes] = set()
    for arr in names:
        for nm in arr.tolist():
            if nm in seen:
                return False
            seen.add(nm)
    return True


def _split_units(src: H5adSource, opts: BuildOptions) -> list[tuple[int, int]]:
    """Row blocks of one input: at most `block_cells` rows and about `block_nnz` stored entries each."""
    n = src.n_obs
    if n == 0:
        return []
    if src.format == "csr":
        indptr = np.asarray(src._indptr[:], dtype=np.int64)
        out, r0 = [], 0
        while r0 < n:
            # largest r1 with nnz(r0:r1) <= block_nnz (at least one row), capped by block_cells
            r1 = int(np.searchsorted(indptr, indptr[r0] + opts.block_nnz, side="right")) - 1
            r1 = max(r0 + 1, min(r1, r0 + opts.block_cells, n))
            out.append((r0, r1))
            r0 = r1
        return out
    if src.format == "dense":
        step = max(1, min(opts.block_cells, opts.block_nnz // max(1, src.n_vars)))
    else:  # CSC: each block scans the whole matrix once, so use few, large blocks (memory ~ block's entries)
        total = max(1, int(src._indptr[-1]))
        step = max(1, min(n, int(n * (4 * opts.block_nnz) / total)))
    return [(r, min(n, r + step)) for r in range(0, n, step)]

