"""Orchestration of a build: plan → scatter (all units) → gather (all shards) → finalize.

`build_store` runs everything on one machine with `workers` processes. `run_stage` runs one stage, or one task of a
job array (``num_tasks``/``task_index``: task i does units and shards whose number ≡ i mod num_tasks). Every unit
and shard is idempotent and recorded only after an atomic rename, so rerunning a killed command resumes it.
"""
from __future__ import annotations

import functools
import gc
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import UserInputError
from .finalize import check_mapping, finalize_store, mapping_report
from .gather import missing_units, run_gather_shard, shard_done, shard_layout
from .kernels import set_default_threads
from .manifest import read_manifest
from .memory import trim_heap
from .options import BuildOptions
from .plan import Plan, load_plan, make_plan
from .progress import progress_bar, summary_lines
from .scatter import run_scatter_unit, unit_done
from .schema import MANIFEST, WORK_DIR, manifest_path

if TYPE_CHECKING:
    from .store import Store

STAGES = ("all", "plan", "scatter", "gather", "finalize")


def _log(opts: BuildOptions) -> Callable[[str], None]:
    return (lambda msg: print(msg, file=sys.stderr)) if opts.progress else (lambda msg: None)


def prepare_output(opts: BuildOptions, may_delete: bool) -> None:
    """Refuse to touch an existing store or a foreign non-empty directory unless --overwrite (and `may_delete`)."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise UserInputError("output path exists and is not a directory", path=opts.out)
    if not out.exists():
        return
    has_store = manifest_path(out).exists()
    has_work = (out / WORK_DIR).exists()
    foreign = not has_store and not has_work and any(out.iterdir())
    if opts.overwrite and may_delete and (has_store or foreign):
        if has_store:
            manifest_path(out).unlink()  # first un-publish, so a reader never sees a half-deleted store
        shutil.rmtree(out)
        return
    if has_store:
        raise UserInputError("already holds a store; pass --overwrite to replace it", path=opts.out)
    if foreign:
        raise UserInputError("output directory is not empty and holds no store; pass --overwrite to replace it",
                             path=opts.out)


def _plan(opts: BuildOptions, may_delete: bool) -> Plan:
    prepare_output(opts, may_delete)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    try:
        return make_plan(opts, log=_log(opts))
    except UserInputError:
        if opts.overwrite and may_delete and load_plan(opts.out) is not None:
            shutil.rmtree(Path(opts.out) / WORK_DIR, ignore_errors=True)  # discard a build of other arguments
            return make_plan(opts, log=_log(opts))
        raise


# Worker entry points: module-level (picklable), load the plan once per process.
@functools.lru_cache(maxsize=2)
def _cached_plan(store: str, plan_id: str) -> Plan:
    plan = load_plan(store)
    if plan is None or plan.id != plan_id:
        raise UserInputError("build plan changed while running", path=store)
    return plan


@functools.lru_cache(maxsize=1)
def _freeze_imports() -> None:
    """In a pool worker: move the objects of the imported modules (anndata, pandas, zarr, dask: ~10^6) out of the
    cyclic GC's reach, so its collections during a task only visit the task's objects (perf: ~3% of a build)."""
    if mp.parent_process() is not None:
        gc.freeze()


def _warm_worker() -> None:
    """First task of a pool process: unpickling it imported this module (and anndata, zarr, numba...)."""
    _freeze_imports()


def _scatter_task(store: str, plan_id: str, unit: int) -> int:
    _freeze_imports()
    st = run_scatter_unit(store, _cached_plan(store, plan_id), unit)
    trim_heap()
    return st["n_rows"]


def _gather_task(store: str, plan_id: str, k: int) -> int:
    _freeze_imports()
    n = run_gather_shard(store, _cached_plan(store, plan_id), k)["n_cells"]
    trim_heap()
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Pool:
    """Worker processes shared by the scatter and gather stages of one command (started on first use).

    spawn, not fork: zarr's event-loop thread and open HDF5 handles must not be inherited by a forked child.
    Like torch's DataLoader, a script that uses workers > 1 needs the ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._ex: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the pool processes now (workers > 1), each importing the build modules in the background.

        With several processes, each splits its kernel calls over cores // workers threads (1 on 2 cores): more
        threads than cores only added switching (measured: ~8% more CPU time with 2 workers × 2 threads)."""
        if self.workers > 1 and self._ex is None:
            threads = max(1, _cores() // self.workers)
            set_default_threads(threads)
            self._ex = ProcessPoolExecutor(max_workers=self.workers - 1, mp_context=mp.get_context("spawn"),
                                           initializer=set_default_threads, initargs=(threads,))
            for _ in range(self.workers - 1):
                self._ex.submit(_warm_worker)

    def run(self, fn, store: str, plan: Plan, items: list[tuple[int, int]], desc: str, total: int,
            enabled: bool) -> None:
        """Run fn(store, plan_id, item) for (item, weight) pairs; the bar advances by the item's weight in cells."""
        bar = progress_bar(total, desc, enabled)
        try:
            if len(items) <= 1 or (self.workers <= 1 and _cores() <= 1):
                for item, weight in items:
                    fn(store, plan.id, item)
                    bar.update(weight)
                return
            if self.workers <= 1:
                # one process, two items at a time in threads: the kernels (numba nogil), h5py/pread reads and
                # tensorstore's encoding of one item overlap the Python parts of the other, on a second core
                self._run_slots(fn, store, plan, items, bar, local=2, remote=0)
                return
            self.start()
            self._run_slots(fn, store, plan, items, bar, local=1, remote=self.workers - 1)
        finally:
            bar.close()

    def _run_slots(self, fn, store: str, plan: Plan, items: list[tuple[int, int]], bar, local: int,
                   remote: int) -> None:
        """`local` threads of this process (already started, modules loaded: a spawned worker spends ~1.5 CPU-s
        importing before its first item) and `remote` pool processes take items from one queue. On the first
        failure no new item starts; the running ones finish and the error is raised."""
        todo = list(reversed(items))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def take():
            with lock:
                return None if errors or not todo else todo.pop()

        def slot(remote: bool) -> None:
            while (nxt := take()) is not None:
                item, weight = nxt
                try:
                    if remote:
                        self._ex.submit(fn, store, plan.id, item).result()
                    else:
                        fn(store, plan.id, item)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the caller (KeyboardInterrupt included)
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    bar.update(weight)

        threads = [threading.Thread(target=slot, args=(r,), daemon=True)
                   for r in [False] * local + [True] * remote]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._ex is not None:
            set_default_threads(None)
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None


def _mine(n: int, num_tasks: int, task_index: int) -> list[int]:
    return [i for i in range(n) if i % num_tasks == task_index]


def _scatter(opts: BuildOptions, plan: Plan, ids: Iterable[int], pool: _Pool) -> None:
    units = plan.units
    todo = [(u, units[u]["r1"] - units[u]["r0"]) for u in ids if not unit_done(opts.out, u)]
    total = sum(w for _, w in todo)
    pool.run(_scatter_task, opts.out, plan, todo, "scatter", total, opts.progress)


def _gather(opts: BuildOptions, plan: Plan, ids: Iterable[int], pool: _Pool) -> None:
    missing = missing_units(opts.out, plan)
    if missing:
        raise UserInputError(f"scatter stage unfinished: {len(missing)} of {len(plan.units)} units missing "
                             f"(first: {missing[0]}); run --stage scatter for every task first", path=opts.out)
    check_mapping(mapping_report(opts.out, plan), opts.min_mapped_fraction)
    cells, _ = shard_layout(opts.out, plan)
    # largest shards first: better packing across workers
    todo = sorted(((k, int(cells[k])) for k in ids if not shard_done(opts.out, k)), key=lambda t: -t[1])
    pool.run(_gather_task, opts.out, plan, todo, "gather", sum(w for _, w in todo), opts.progress)


def run_stage(opts: BuildOptions, stage: str = "all", num_tasks: int = 1, task_index: int = 0,
              verify_data: bool = False) -> dict | None:
    """Run one stage (or one array task of it). Returns the manifest after ``finalize``/``all``, else None."""
    if stage not in STAGES:
        raise UserInputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise UserInputError(f"--shard-index must be in [0, --num-shards) = [0, {num_tasks}), got {task_index}")
    if stage == "finalize":
        if manifest_path(opts.out).exists() and load_plan(opts.out) is None:
            return read_manifest(opts.out)  # already finalized (a rerun of the last array job)
        return finalize_store(opts.out, verify_data=verify_data, log=_log(opts))
    pool = _Pool(opts.workers)
    if stage != "plan":
        pool.start()  # spawned workers import their modules while this process makes or loads the plan
    try:
        # Only a whole-build command (not one task of an array) may delete an old store or an old plan.
        plan = _plan(opts, may_delete=stage in ("all", "plan") and num_tasks == 1)
        if stage == "plan":
            return None
        if stage in ("all", "scatter"):
            _scatter(opts, plan, _mine(len(plan.units), num_tasks, task_index), pool)
        if stage == "all" and num_tasks > 1:
            _wait_for_scatter(opts, plan)
        if stage in ("all", "gather"):
            _gather(opts, plan, _mine(plan.n_out_shards, num_tasks, task_index), pool)
    finally:
        pool.close()
    if stage == "all" and num_tasks == 1:
        return finalize_store(opts.out, verify_data=verify_data, log=_log(opts))
    return None


def _wait_for_scatter(opts: BuildOptions, plan: Plan) -> None:
    """Barrier for a single array running scatter+gather: wait until every task's scatter units are on disk.
    (Deadlocks if the scheduler cannot run all tasks at once: then use two arrays, --stage scatter / gather.)"""
    timeout = float(opts.extra.get("barrier_timeout_s", 24 * 3600))
    poll_s = float(opts.extra.get("barrier_poll_s", 5.0))
    t0 = time.monotonic()
    while missing_units(opts.out, plan):
        if time.monotonic() - t0 > timeout:
            raise UserInputError("timed out waiting for the other array tasks' scatter stage", path=opts.out)
        time.sleep(poll_s)


def build_store(inputs: list[str] | str, out: str | Path, **options) -> "Store":
    """Convert .h5ad file(s) into a store at `out` on this machine and return it opened.

    Options are `BuildOptions` fields: layer, use_raw, gene_vocab, gene_id_column, cell_type_key, shard_size,
    seed, allow_non_integer, min_mapped_fraction, overwrite, workers, progress; plus verify_data (finalize decodes
    every X chunk: crc32c and column bounds). Raises UserInputError for bad input; the store is then not marked
    complete.
    """
    from .store import open_store

    verify_data = bool(options.pop("verify_data", False))
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    opts = BuildOptions(inputs=list(inputs), out=str(out), **options)
    t0 = time.perf_counter()
    manifest = run_stage(opts, "all", verify_data=verify_data)
    if opts.progress:
        for line in summary_lines(manifest, opts.out, time.perf_counter() - t0):
            print(line, file=sys.stderr)
    return open_store(opts.out)


__all__ = ["build_store", "run_stage", "prepare_output", "STAGES", "MANIFEST"]
