"""What a run chooses when the user says nothing: its run directory (run_dir.py) and its thread count (threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from grnformer_ds.training import threads as T
from grnformer_ds.training.export import resolve_checkpoint
from grnformer_ds.training.run_dir import choose_run_dir, create_run_dir, latest_run


# ------------------------------------------------------------------ run directories
def test_each_run_gets_a_fresh_directory_and_latest_follows(tmp_path):
    root = str(tmp_path / "runs" / "demo")
    first = choose_run_dir(None, root, resume=False)
    assert first.automatic and os.path.isdir(first.path) and "--resume continues it" in first.how
    second = choose_run_dir(None, root, resume=False)  # same second: a suffix, never the same directory
    assert second.path != first.path and os.path.isdir(second.path)
    assert latest_run(root) == second.path and os.readlink(os.path.join(root, "latest")) == os.path.basename(
        second.path)  # relative: the runs root can be moved
    resumed = choose_run_dir(None, root, resume=True)
    assert resumed.path == second.path and "continues" in resumed.how
    named = choose_run_dir(str(tmp_path / "mine"), root, resume=False)
    assert named.path == str(tmp_path / "mine") and not named.automatic and not os.path.exists(named.path)


def test_resume_without_an_earlier_run_starts_a_new_one(tmp_path):
    d = choose_run_dir(None, str(tmp_path / "r"), resume=True)
    assert os.path.isdir(d.path) and d.how.startswith("new: no earlier run")


def test_names_are_timestamps_with_suffixes(tmp_path):
    now = time.mktime((2026, 12, 6, 10, 18, 28, 0, 0, -1))
    a, b = create_run_dir(str(tmp_path), now), create_run_dir(str(tmp_path), now)
    assert os.path.basename(a) == "20261206-101828" and os.path.basename(b) == "20261206-101828-2"


def test_export_of_a_runs_root_takes_its_latest_run(tmp_path):
    from grnformer_ds.training.checkpoint import COMPLETE, LATEST

    root = str(tmp_path / "runs" / "demo")
    run = create_run_dir(root)
    os.makedirs(os.path.join(run, "checkpoints", "global_step5"))
    open(os.path.join(run, "checkpoints", "global_step5", COMPLETE), "w").close()
    with open(os.path.join(run, "checkpoints", LATEST), "w") as fh:
        fh.write("global_step5")
    expected = (os.path.join(run, "checkpoints"), "global_step5")
    assert resolve_checkpoint(root) == expected
    assert resolve_checkpoint(os.path.join(root, "latest")) == (os.path.join(root, "latest", "checkpoints"),
                                                               "global_step5")


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("cores, busy, ranks, expected", [
    (2, 0, 1, 2), (2, 1, 1, 1), (2, 0, 2, 1), (2, 2, 2, 1), (16, 0, 8, 2), (16, 4, 4, 3), (1, 0, 4, 1)])
def test_thread_share_is_free_cores_over_local_ranks_never_zero(cores, busy, ranks, expected):
    assert T.choose_threads(cores, busy, ranks) == expected


def test_local_ranks_from_launchers_and_slurm(monkeypatch):
    for name in (*T.LAUNCHER_LOCAL_RANKS_ENV, *T.SLURM_LOCAL_RANKS_ENV, "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    assert T.local_ranks() == 1
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "8(x2)")
    assert T.local_ranks() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(len(T.usable_cores())))  # each task bound to its own CPUs
    assert T.local_ranks() == 1
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's launcher inside the allocation: its ranks share the CPUs
    assert T.local_ranks() == 2


def test_omp_num_threads_is_respected(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        choice = T.apply_thread_default(ranks=1)
        assert choice.from_env and choice.threads == 1 and torch.get_num_threads() == 1
        assert choice.describe() == "threads: 1 per rank (OMP_NUM_THREADS)"
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(T.usable_cores()) < 2, reason="needs Linux, 2 cores")
@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_a_core_held_by_another_process_is_not_counted(monkeypatch):
    """The issue-12 situation: another job spins on one of two cores; the run must not put a thread there."""
    cores = T.usable_cores()
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cores[0]}}})\n"
                             "while True: pass"])
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        time.sleep(0.5)
        choice = T.apply_thread_default(ranks=1)
        assert choice.busy >= 1 and choice.threads == max(1, len(cores) - choice.busy), choice
        assert torch.get_num_threads() == choice.threads
        assert f"{len(cores)} cores, {choice.busy} busy with other work, 1 rank on this node" in choice.describe()
    finally:
        spin.kill()
        spin.wait()
        torch.set_num_threads(before)
