"""Loader throughput: StreamingCellDataset vs bionemo-scdl SingleCellMemMapDataset vs AnnData backed mode.

All loaders read the same cells (one synthetic count matrix, written once as .h5ad; the store and the SCDL memmap are
built from it). Peers:

* **SCDL**: ``DataLoader(SingleCellMemMapDataset, shuffle=True, collate_fn=collate_sparse_matrix_batch)``;
* **tiledbsoma-ml**: ``ExperimentDataset`` over a TileDB-SOMA experiment of the same cells (its defaults: 65,536-cell
  I/O batches shuffled in 64-cell chunks; sparse X in one process, dense X in DataLoader workers, where it refuses
  sparse batches);
* **AnnData backed, batched**: ``read_h5ad(backed="r")``, each batch = ``X[sorted random rows]`` in one call (the
  scvi-tools AnnDataLoader pattern, the fastest use of backed mode);
* **AnnData backed, per cell**: a map-style Dataset whose ``__getitem__`` reads ``X[i]``, batched by a shuffling
  DataLoader (the plain PyTorch pattern).

Modes (what a batch is; ``--modes``):

* ``raw``: rows only (what each loader gives out of the box);
* ``tokenized``: scGPT-style batches (binning, gene sampling to max_seq_len 1200, padding, masking). Ours is
  `StreamingCellDataset(graphs=False)`; the peers run scGPT's own pretraining collator
  (``scgpt.data_collator.DataCollator``, scgpt 0.2.4) in their DataLoader's collate — the pipeline a scGPT user
  builds on these loaders;
* ``tokenized+graphs``: the same plus both graph scales and edge perturbation (alpha 0.2); the peers have no GRN code,
  so they get our `GraphBuilder` after scGPT's collator;
* ``tokenized+graphs, same collator``: the peers run our collator + graph builder, so only the data access differs;
* ``packed+graphs``: ours streams token-packed micro-batches (64 x 1,200 tokens, graphs made undirected and sorted by
  destination in the loader, what the trainer uses); the peers as in ``tokenized+graphs``. Cells/s compare.

Usage::

    python launchers/benchmarks/bench_loader.py --workdir /tmp/grnformer_bench --n-cells 20000 --workers 0 2 \
        --out BENCH.md

Synthetic GRN assets (random regulons / cell-type GRNs / co-expression graph, 30 % of regulons active per cell)
stand in for build_grn.py output: only their sizes matter here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from grnformer_ds.errors import UserInputError, cli_main

CELL_TYPES = [f"type{i}" for i in range(10)]


# ----------------------------------------------------------------------------------------------- inputs
def make_h5ad(path: Path, n_cells: int, n_genes: int, genes_per_cell: int, seed: int) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    nnz_per_cell = rng.integers(genes_per_cell // 2, genes_per_cell * 3 // 2, n_cells)
    indptr = np.r_[0, np.cumsum(nnz_per_cell)].astype(np.int64)
    p = rng.gamma(0.5, 1.0, n_genes)
    p /= p.sum()
    indices = np.concatenate([np.sort(rng.choice(n_genes, k, replace=False, p=p)) for k in nnz_per_cell])
    data = (rng.geometric(0.4, indptr[-1])).astype(np.float32)
    X = sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(CELL_TYPES, n_cells), categories=CELL_TYPES)},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(n_genes)])
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)


def make_grn(store: Path, n_regulons: int, seed: int) -> None:
    from grnformer_ds.grn import GRNAssets, write_grn_assets, write_shard_regulon_activity
    from grnformer_ds.store import open_store

    rng = np.random.default_rng(seed)
    st = open_store(store)
    G = st.n_genes
    a = GRNAssets.empty(st.gene_names, st.cell_types)
    tfs = rng.choice(G, n_regulons, replace=False)
    targets = [np.sort(rng.choice(G, rng.integers(20, 200), replace=False)) for _ in tfs]
    a.regulon_names = np.array([f"R{i}(+)" for i in range(n_regulons)])
    a.regulon_tf = tfs.astype(np.int32)
    a.regulon_indptr = np.r_[0, np.cumsum([len(t) for t in targets])].astype(np.int64)
    a.regulon_target = np.concatenate(targets).astype(np.int32)
    a.regulon_weight = rng.random(len(a.regulon_target)).astype(np.float32)
    a.regulon_sign = np.ones(len(a.regulon_target), np.int8)
    src, dst = [], []
    for _ in st.cell_types:
        s = rng.choice(tfs, 5000)
        d = rng.integers(0, G, 5000)
        key = np.unique(s.astype(np.int64) * G + d)
        src.append(key // G), dst.append(key % G)
    a.celltype_indptr = np.r_[0, np.cumsum([len(s) for s in src])].astype(np.int64)
    a.celltype_src = np.concatenate(src).astype(np.int32)
    a.celltype_dst = np.concatenate(dst).astype(np.int32)
    a.celltype_weight = rng.random(len(a.celltype_src)).astype(np.float32)
    a.celltype_sign = np.ones(len(a.celltype_src), np.int8)
    k = 20  # co-expression: 20 neighbours per gene
    a.coexpr_indptr = (np.arange(G + 1) * k).astype(np.int64)
    a.coexpr_indices = np.concatenate([np.sort(rng.choice(G, k, replace=False)) for _ in range(G)]).astype(np.int32)
    a.coexpr_data = rng.random(G * k).astype(np.float32)
    a.tf_mask = np.isin(np.arange(G), tfs)
    write_grn_assets(store, a)
    for path, rec in zip(st.shard_paths, st.shards):
        active = rng.random((rec["n_cells"], n_regulons)) < 0.3
        write_shard_regulon_activity(path, active.astype(np.float32), active, a.regulon_names)


def prepare(workdir: Path, args) -> tuple[Path, Path, Path, Path]:
    """(h5ad, our store, SCDL memmap, SOMA experiment) of the same cells, built once per parameter set."""
    workdir.mkdir(parents=True, exist_ok=True)
    h5ad, store, scdl, soma = workdir / "cells.h5ad", workdir / "store", workdir / "scdl", workdir / "soma"
    tag = workdir / "params.json"
    params = {k: getattr(args, k) for k in ("n_cells", "n_genes", "genes_per_cell", "n_regulons", "seed")}
    if tag.exists() and json.loads(tag.read_text()) == params and (store / "grn").exists() and scdl.exists():
        if not soma.exists():
            _make_soma(h5ad, soma)
        return h5ad, store, scdl, soma
    t = time.perf_counter()
    make_h5ad(h5ad, args.n_cells, args.n_genes, args.genes_per_cell, args.seed)
    print(f"h5ad written in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    from grnformer_ds.store import build_store

    t = time.perf_counter()
    build_store([str(h5ad)], store, cell_type_key="cell_type", overwrite=True, progress=False)
    print(f"store built in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    make_grn(store, args.n_regulons, args.seed)
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    t = time.perf_counter()
    shutil.rmtree(scdl, ignore_errors=True)  # SCDL refuses to overwrite a memmap of an earlier, other input
    SingleCellMemMapDataset(str(scdl), h5ad_path=str(h5ad), use_X_not_raw=True)
    print(f"SCDL memmap built in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    shutil.rmtree(soma, ignore_errors=True)
    _make_soma(h5ad, soma)
    tag.write_text(json.dumps(params))
    return h5ad, store, scdl, soma


def _make_soma(h5ad: Path, soma: Path) -> None:
    """The cells as a TileDB-SOMA experiment (measurement "RNA", X layer "data"), for tiledbsoma-ml."""
    import tiledbsoma.io

    t = time.perf_counter()
    tiledbsoma.io.from_h5ad(str(soma), str(h5ad), measurement_name="RNA")
    print(f"SOMA experiment built in {time.perf_counter() - t:.1f}s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- baselines
def load_scgpt_collator():
    """scGPT's own pretraining collator (``scgpt.data_collator.DataCollator``, scgpt 0.2.4), imported without
    ``scgpt/__init__`` (which pulls IPython, flash-attn, torchtext): it only needs numpy, torch and scgpt.preprocess."""
    import importlib
    import importlib.util
    import logging
    import types

    if "scgpt.data_collator" not in sys.modules:
        spec = importlib.util.find_spec("scgpt")
        if spec is None:
            raise UserInputError("the peer pipelines need scgpt==0.2.4 (pip install --no-deps scgpt==0.2.4)")
        if "scgpt" not in sys.modules:
            pkg = types.ModuleType("scgpt")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.logger = logging.getLogger("scGPT-reference")
            sys.modules["scgpt"] = pkg
    return importlib.import_module("scgpt.data_collator").DataCollator


class _Post:
    """What a peer loader's collate does after reading a batch of rows (picklable, runs in DataLoader workers).

    kind = ``raw``: nothing (the rows are the batch); ``scgpt``: scGPT's own pretraining collator (binning, gene
    sampling to max_len, padding, masking; its per-cell dict input built from the rows); ``scgpt+graphs``: that plus
    our `GraphBuilder` (the peers have no GRN code: they get ours, with the same perturbation); ``ours+graphs``: our
    collator + graph builder (so only the data access differs)."""

    def __init__(self, store: Path, kind: str, max_seq_len: int = 1200):
        from grnformer_ds.data import GraphBuilder, ScGPTCollator
        from grnformer_ds.grn import read_grn_assets, read_shard_active_regulons
        from grnformer_ds.store import open_store

        st = open_store(store)
        self.kind = kind
        self.pad_id, self.cls_id = st.vocab["<pad>"], st.vocab["<cls>"]
        self.token_ids = np.asarray(st.token_ids, dtype=np.int64)
        self.column_of_token = np.full(st.vocab_size, -1, np.int64)  # token id -> store column (-1: special)
        self.column_of_token[self.token_ids] = np.arange(len(self.token_ids))
        self.ours = ScGPTCollator(st.token_ids, pad_id=self.pad_id, cls_id=self.cls_id, max_seq_len=max_seq_len)
        o = self.ours
        self._scgpt_kwargs = dict(  # scGPT's collator is built where it runs (a worker cannot unpickle it: see below)
            do_padding=True, pad_token_id=self.pad_id, pad_value=int(o.pad_value), do_mlm=True, do_binning=True,
            mlm_probability=o.mask_ratio, mask_value=int(o.mask_value), max_length=max_seq_len, sampling=True,
            keep_first_n_tokens=1)
        self._scgpt = None
        self.graphs = GraphBuilder(read_grn_assets(store), alpha=0.2) if kind.endswith("graphs") else None
        # per-cell metadata in the input (h5ad) order: the baselines index cells by h5ad row
        names, ct, bits = [], [], []
        for i, p in enumerate(st.shard_paths):
            sh = st.read_shard(i)
            names.append(sh.obs_names.to_numpy()), ct.append(sh.obs["cell_type"].cat.codes.to_numpy())
            bits.append(read_shard_active_regulons(p))
        order = np.argsort(np.array([int(n.split("cell")[-1]) for n in np.concatenate(names)]))
        self.cell_type = np.concatenate(ct)[order].astype(np.int64)
        self.bits = np.concatenate(bits)[order]
        self.count = 0

    def __getstate__(self):
        # unpickling a scgpt object in a DataLoader worker would import scgpt/__init__ (IPython, torchtext, ...)
        return {**self.__dict__, "_scgpt": None}

    def __call__(self, idx: np.ndarray, indptr, indices, data):
        from grnformer_ds.data import CellRows
        from grnformer_ds.data.sampler import batch_rng

        if self.kind == "raw":
            return torch.as_tensor(np.asarray(indptr))
        self.count += 1
        rows = CellRows(indptr=np.asarray(indptr, np.int64), indices=np.asarray(indices, np.int32),
                        data=np.asarray(data, np.float32), cell_index=np.asarray(idx, np.int64),
                        cell_type=self.cell_type[idx], active_regulons=self.bits[idx])
        if self.kind == "ours+graphs":
            out, slot = self.ours(rows, batch_rng(0, 0, self.count, 0))
        else:
            examples = []
            for b in range(len(idx)):
                lo, hi = rows.indptr[b], rows.indptr[b + 1]
                examples.append({
                    "id": torch.tensor(int(idx[b])),
                    "genes": torch.from_numpy(np.r_[self.cls_id, self.token_ids[rows.indices[lo:hi]]]),
                    "expressions": torch.from_numpy(np.r_[0.0, rows.data[lo:hi]].astype(np.float32))})
            if self._scgpt is None:
                self._scgpt = load_scgpt_collator()(**self._scgpt_kwargs)
            out = self._scgpt(examples)
            slot = self.column_of_token[out["gene"].numpy()]  # the graph builder's (B, L) store columns
        if self.graphs is not None:
            out.update(self.graphs(slot, rows.cell_type, rows.active_regulons, batch_rng(0, 0, self.count, 1), True))
        return out


class _ScdlIndexed(torch.utils.data.Dataset):
    """SCDL rows with their index, so the collate can attach per-cell metadata."""

    def __init__(self, path: str):
        self.path = path
        self.ds = None

    def __len__(self):
        from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

        if self.ds is None:
            self.ds = SingleCellMemMapDataset(self.path)
        return len(self.ds)

    def __getitem__(self, i):
        from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

        if self.ds is None:
            self.ds = SingleCellMemMapDataset(self.path)
        return i, self.ds[i]


class _ScdlCollate:
    def __init__(self, post: _Post):
        self.post = post

    def __call__(self, items):
        from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch

        idx = np.array([i for i, _ in items])
        csr = collate_sparse_matrix_batch([t for _, t in items])  # SCDL's own collate
        if self.post.kind == "raw":
            return csr
        return self.post(idx, csr.crow_indices().numpy(), csr.col_indices().numpy(), csr.values().numpy())


class _Soma(torch.utils.data.IterableDataset):
    """tiledbsoma-ml's ``ExperimentDataset`` (its defaults: shuffle in 64-cell chunks inside 65,536-cell I/O batches;
    sparse X) opened in each worker, its batches passed through the peer post-processing. soma_joinid = h5ad row."""

    def __init__(self, uri: Path, batch_size: int, seed: int, post: _Post):
        self.uri, self.batch_size, self.seed, self.post = str(uri), batch_size, seed, post

    def __iter__(self):
        import scipy.sparse as sp
        import tiledbsoma
        from tiledbsoma_ml import ExperimentDataset

        # tiledbsoma-ml refuses sparse batches inside DataLoader workers (torch cannot share sparse tensors): there
        # it yields dense (B, G) arrays, turned into CSR here as a user would
        sparse = torch.utils.data.get_worker_info() is None
        with tiledbsoma.Experiment.open(self.uri) as exp, exp.axis_query(measurement_name="RNA") as query:
            ds = ExperimentDataset(query, layer_name="data", batch_size=self.batch_size, shuffle=True,
                                   seed=self.seed, return_sparse_X=sparse)
            for x, obs in ds:
                if self.post.kind == "raw":
                    yield torch.as_tensor(x.indptr if sparse else x)
                else:
                    x = x if sparse else sp.csr_matrix(x)
                    yield self.post(obs["soma_joinid"].to_numpy(), x.indptr, x.indices, x.data)


class _AnnDataBatched(torch.utils.data.IterableDataset):
    """AnnData backed mode, batched random access: each batch reads X[sorted random rows] from the .h5ad in one call
    (the access pattern of scvi-tools' AnnDataLoader; the fastest way to use backed mode)."""

    def __init__(self, h5ad: Path, batch_size: int, n_batches: int, post: _Post):
        self.h5ad, self.batch_size, self.n_batches, self.post = h5ad, batch_size, n_batches, post

    def __iter__(self):
        import anndata as ad

        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        adata = ad.read_h5ad(self.h5ad, backed="r")
        rng = np.random.default_rng(w)
        for _ in range(w, self.n_batches, nw):
            idx = np.sort(rng.choice(adata.n_obs, self.batch_size, replace=False))
            x = adata.X[idx]  # scipy CSR rows read from HDF5
            yield self.post(idx, x.indptr, x.indices, x.data)


class _AnnDataPerCell(torch.utils.data.Dataset):
    """AnnData backed mode, per-cell random access: a map-style Dataset whose ``__getitem__`` reads one row
    (``adata.X[i]``), batched by a shuffling DataLoader (the plain PyTorch pattern over a backed AnnData)."""

    def __init__(self, h5ad: Path):
        self.h5ad, self.adata = h5ad, None

    def __len__(self):
        import anndata as ad

        return ad.read_h5ad(self.h5ad, backed="r").n_obs if self.adata is None else self.adata.n_obs

    def __getitem__(self, i):
        import anndata as ad

        if self.adata is None:  # opened in the worker (h5py handles do not survive a fork)
            self.adata = ad.read_h5ad(self.h5ad, backed="r")
        return i, self.adata.X[i]


class _AnnDataPerCellCollate:
    def __init__(self, post: _Post):
        self.post = post

    def __call__(self, items):
        import scipy.sparse as sp

        idx = np.array([i for i, _ in items])
        x = sp.vstack([r for _, r in items], format="csr")
        return self.post(idx, x.indptr, x.indices, x.data)


# ----------------------------------------------------------------------------------------------- timing
def _time(make_loader, n_batches: int, batch_size: int, warmup: int = 2) -> tuple[float, float]:
    """(cells per wall-clock second, cells per CPU second of this process) over n_batches after `warmup` batches
    (worker start-up excluded). The CPU rate is only meaningful without workers: it is what one core sustains,
    whatever the load of the (shared) machine."""
    it = iter(make_loader())
    for _ in range(warmup):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    cells = 0
    for _ in range(n_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        # packed micro-batches hold a varying number of cells
        cells += len(batch["cell_index"]) if isinstance(batch, dict) and "cell_index" in batch else batch_size
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    del it
    return cells / wall, cells / max(cpu, 1e-9)


MODES = {
    # mode: (our dataset's options, the peers' post-processing)
    "raw": (None, "raw"),
    "tokenized": ({"graphs": False}, "scgpt"),
    "tokenized+graphs": ({"edge_perturbation": 0.2}, "scgpt+graphs"),
    "tokenized+graphs, same collator": ({"edge_perturbation": 0.2}, "ours+graphs"),
    # ours: token-packed micro-batches of 64 x 1,200 tokens, graphs undirected and sorted by destination (what the
    # trainer now streams); the peers: as in "tokenized+graphs" (padded scGPT batches of 64 cells + our graphs)
    "packed+graphs": ({"edge_perturbation": 0.2, "max_tokens": 64 * 1200, "graph_layout": "csr"}, "scgpt+graphs"),
}
LOADERS = ("grnformer_ds", "scdl", "tiledbsoma_ml", "anndata_batched", "anndata_per_cell")


def run(args) -> list[dict]:
    """Per (workers, mode): the loaders are timed in `rounds` interleaved rounds (ours, SCDL, AnnData, ours, ...) so
    that load changes on a shared machine hit all alike; the median round is reported."""
    from torch.utils.data import DataLoader

    from grnformer_ds.data import StatefulCellLoader, StreamingCellDataset

    h5ad, store, scdl, soma = prepare(Path(args.workdir), args)
    B = args.batch_size
    results = []
    for nw in args.workers:
        mp = {"multiprocessing_context": "forkserver"} if nw else {}
        for mode in args.modes:
            ours_opts, post_kind = MODES[mode]
            post = _Post(store, post_kind)

            def ours(seed):
                if ours_opts is None:
                    ds = StreamingCellDataset(store, batch_size=B, seed=seed, eval_fraction=0.0)
                    raw = _RawOurs(ds, args.n_cells // B)
                    return raw if nw == 0 else DataLoader(raw, batch_size=None, num_workers=nw, **mp)
                layout = {} if "max_tokens" in ours_opts else {"batch_size": B}
                ds = StreamingCellDataset(store, seed=seed, eval_fraction=0.0, **layout, **ours_opts)
                return StatefulCellLoader(ds, num_workers=nw)

            def scdl_loader(seed):
                torch.manual_seed(seed)
                return DataLoader(_ScdlIndexed(str(scdl)), batch_size=B, shuffle=True, num_workers=nw,
                                  collate_fn=_ScdlCollate(post), **mp)

            def anndata_batched(seed):
                ab = _AnnDataBatched(h5ad, B, args.anndata_batches + 2 + nw, post)
                return DataLoader(ab, batch_size=None, num_workers=nw, **mp)

            def anndata_per_cell(seed):
                torch.manual_seed(seed)
                return DataLoader(_AnnDataPerCell(h5ad), batch_size=B, shuffle=True, num_workers=nw,
                                  collate_fn=_AnnDataPerCellCollate(post), **mp)

            def soma_loader(seed):
                return DataLoader(_Soma(soma, B, seed, post), batch_size=None, num_workers=nw, **mp)

            makers = {"grnformer_ds": ours, "scdl": scdl_loader, "tiledbsoma_ml": soma_loader,
                      "anndata_batched": anndata_batched, "anndata_per_cell": anndata_per_cell}
            # raw: one whole epoch from the first batch (all block / I/O-batch reads and worker start-up included:
            # the buffering loaders front-load their reads); tokenized: a steady-state window after 2 batches
            n_batches = args.n_cells // B if mode == "raw" else args.batches
            warmup = 0 if mode == "raw" else 2
            rounds = {name: [] for name in LOADERS}
            for name in LOADERS:  # untimed: one-time process costs (imports, numba cache loads, file handles)
                _time(lambda: makers[name](99), 3, B, warmup=0)
            for r in range(args.rounds):
                for name in LOADERS:
                    n = args.anndata_batches if name.startswith("anndata") else n_batches
                    rounds[name].append(_time(lambda: makers[name](r), n, B, warmup=warmup))
            row = {"workers": nw, "mode": mode}
            for name, got in rounds.items():
                row[name] = float(np.median([g[0] for g in got]))
                row[name + "_cpu"] = float(np.median([g[1] for g in got]))
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    return results


class _RawOurs(torch.utils.data.IterableDataset):
    """Our read path only (plan + block reader + gather), no tokenization."""

    def __init__(self, ds, n_batches: int):
        self.ds, self.n_batches = ds, n_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.ds.plan()
        for s in range(w, min(self.n_batches, plan.n_steps), nw):
            rows = self.ds._rows(plan, plan.step_cells(s))
            yield torch.from_numpy(rows.indptr)


def report(results: list[dict], args) -> str:
    load = os.getloadavg()
    lines = [
        f"## Loader benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Command: `python launchers/benchmarks/bench_loader.py {' '.join(sys.argv[1:])}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs "
        f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), local disk, torch "
        f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}.",
        f"Data: {args.n_cells} synthetic cells x {args.n_genes} genes, ~{args.genes_per_cell} nonzero genes per cell, "
        f"{args.n_regulons} regulons (30 % active per cell), 10 cell-type GRNs of 5,000 edges, co-expression graph "
        f"with 20 neighbours per gene; batch size {args.batch_size}; max_seq_len 1200. Raw: one whole epoch "
        f"({args.n_cells // args.batch_size} batches) timed from the first batch; tokenized: {args.batches} batches "
        f"after 2 warm-up batches; AnnData: {args.anndata_batches} batches. Median of {args.rounds} interleaved "
        "rounds.",
        "Wall-clock cells/s; with 0 workers also cells per CPU-second of the loading process (= one core's rate, "
        "independent of the machine's load).",
        "",
        "| workers | batch | grnformer_ds | SCDL | tiledbsoma-ml | AnnData backed, batched | AnnData backed, per cell "
        "| x SCDL | x tiledbsoma-ml | x AnnData batched | x AnnData per cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def cell(k):
            return f"{r[k]:,.0f}" + (f" ({r[k + '_cpu']:,.0f}/CPU-s)" if r["workers"] == 0 else "")

        ratio = (lambda k: r["grnformer_ds_cpu"] / r[k + "_cpu"]) if r["workers"] == 0 else \
            (lambda k: r["grnformer_ds"] / r[k])
        lines.append(f"| {r['workers']} | {r['mode']} | " + " | ".join(cell(k) for k in LOADERS) + " | "
                     + " | ".join(f"{ratio(k):.2f}" for k in LOADERS[1:]) + " |")
    lines += ["", "Ratios: per CPU-second with 0 workers, wall-clock with workers."]
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/grnformer_bench")
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--genes-per-cell", type=int, default=1000)
    p.add_argument("--n-regulons", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=60, help="timed batches, tokenized mode")
    p.add_argument("--anndata-batches", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    for name in ("n_cells", "n_genes", "genes_per_cell", "n_regulons", "batch_size", "batches",
                 "anndata_batches", "rounds"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.genes_per_cell * 3 // 2 > args.n_genes or args.n_regulons > args.n_genes:
        raise UserInputError("--genes-per-cell x 1.5 and --n-regulons must not exceed --n-genes")
    if args.n_cells < args.batch_size * (args.batches + 4):
        raise UserInputError(f"--n-cells must hold at least (--batches + 4) batches: "
                             f"{args.batch_size * (args.batches + 4)} cells")
    if any(w < 0 for w in args.workers):
        raise UserInputError("--workers must be >= 0")
    results = run(args)
    text = report(results, args)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
