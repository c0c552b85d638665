"""Preemption (issue 16): SIGTERM mid-run on 1 and 2 CPU ranks -> every rank stops at the next optimizer
step with a complete checkpoint and exits 0; `--resume` then gives exactly the uninterrupted run's losses. A second
signal while the checkpoint is written changes nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from launch_helpers import launch_cmd, launch_env, read_metrics  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")
STEPS = 24
COMMON = ["--deepspeed_config", ZERO3, "--max-steps", str(STEPS), "--eval-every", "12", "--save-every", "100",
          "--lr", "5e-3", "--no-progress", "--mlflow-tracking-uri", "none", "--no-export"]





def _cmd(args, ranks: int) -> list[str]:
    return launch_cmd(PRETRAIN, args, ranks)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    from grnformer_ds.training.integration import ensure_demo

    d = str(tmp_path_factory.mktemp("preempt_cache"))
    ensure_demo(d, say=lambda line: None)
    return d


@pytest.fixture(scope="module")
def uninterrupted(demo_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("preempt") / "full")
    p = subprocess.run(_cmd([*COMMON, "--demo-cache-dir", demo_cache, "--output-dir", out], 1), cwd=REPO,
                       env=launch_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return read_metrics(out)


# SIGUSR1 (#SBATCH --signal=USR1@120) goes through the same handler: tests/test_train_units.py
@pytest.mark.parametrize("ranks,sig", [(1, signal.SIGTERM), (2, signal.SIGTERM)])
def test_signal_stops_with_a_checkpoint_and_resume_is_exact(demo_cache, uninterrupted, tmp_path, ranks, sig):
    out = str(tmp_path / "run")
    args = [*COMMON, "--demo-cache-dir", demo_cache, "--output-dir", out]
    proc = subprocess.Popen(_cmd(args, ranks), cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(out)) < 5 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    if ranks == 1:
        proc.send_signal(sig)
    else:  # as SLURM does: every process of the job (the launcher forwards it to the ranks: a second signal)
        os.killpg(proc.pid, sig)
    t0 = time.time()
    output, _ = proc.communicate(timeout=120)
    assert time.time() - t0 < 60, output[-3000:]
    if ranks == 1:
        assert proc.returncode == 0, output[-3000:]
    assert f"{signal.Signals(sig).name} received" in output, output[-3000:]
    assert "preempted at step" in output, output[-3000:]
    from grnformer_ds.training import checkpoint as ckpt

    root = os.path.join(out, "checkpoints")
    tag = ckpt.find_latest(root)
    assert tag is not None, output[-3000:]
    stopped = int(tag.replace("global_step", ""))
    assert 5 <= stopped < STEPS
    assert len(ckpt.complete_tags(root)) == 1  # the preemption checkpoint, nothing half-written beside it
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped + 1))

    p = subprocess.run(_cmd([*args, "--resume"], ranks), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"at step {stopped}" in p.stdout, p.stdout[-2000:]
    got, ref = read_metrics(out), uninterrupted
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    if ranks == 1:  # the same run as the uninterrupted one, step for step
        for a, b in zip(got, ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["data_digest"] == b["data_digest"]


PAUSING_SAVE = '''
import os, runpy, sys, time
from grnformer_ds.training import checkpoint as ckpt

write = ckpt.atomic_write_text

def paused(path, text):  # a save after step PAUSE_AFTER stops just before its COMPLETE marker, for a kill -9
    tag = os.path.basename(os.path.dirname(path))
    if path.endswith(ckpt.COMPLETE) and int(tag.replace("global_step", "")) > int(os.environ["PAUSE_AFTER"]):
        open(os.environ["PAUSE_MARK"], "w").close()
        time.sleep(120)
    return write(path, text)

ckpt.atomic_write_text = paused
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_kill_during_the_preemption_save_leaves_the_previous_checkpoint_latest(demo_cache, uninterrupted, tmp_path):
    """SIGTERM, then (while the checkpoint it asked for is being written) SIGTERM again and SIGKILL: the half-written
    checkpoint never becomes latest, the previous one is, and --resume from it is exact."""
    from grnformer_ds.training import checkpoint as ckpt

    out, mark = str(tmp_path / "run"), str(tmp_path / "in_save")
    wrapper = tmp_path / "pausing_save.py"
    wrapper.write_text(PAUSING_SAVE)
    args = [*COMMON, "--demo-cache-dir", demo_cache, "--output-dir", out]
    args[args.index("--save-every") + 1] = "4"
    proc = subprocess.Popen([sys.executable, str(wrapper), PRETRAIN, *args], cwd=REPO,
                            env=launch_env(PAUSE_AFTER="4", PAUSE_MARK=mark), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(out)) < 6 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    while time.time() < deadline and not os.path.exists(mark) and proc.poll() is None:
        time.sleep(0.1)
    assert os.path.exists(mark), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # noted and ignored: the save goes on
    time.sleep(0.5)
    assert proc.poll() is None
    proc.kill()
    output, _ = proc.communicate(timeout=60)
    assert "SIGTERM again" in output, output[-3000:]
    root = os.path.join(out, "checkpoints")
    assert ckpt.find_latest(root) == "global_step4"
    half = [t for t in os.listdir(root) if t.startswith("global_step") and t != "global_step4"]
    assert half and not any(ckpt.is_complete(root, t) for t in half)  # everything but its COMPLETE marker
    p = subprocess.run([sys.executable, PRETRAIN, *args, "--resume"], cwd=REPO, env=launch_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "at step 4" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    got = read_metrics(out)
    assert [m["step"] for m in got] == [m["step"] for m in uninterrupted]
    for a, b in zip(got, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["data_digest"] == b["data_digest"]
