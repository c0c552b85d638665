"""Tracking outages (issue 16): a real `mlflow server` stopped mid-run and started again, or not running when the
run starts: training never stops, one warning is printed, and at the end MLflow holds every step's metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from launch_helpers import free_port, launch_env  # tests/ is on sys.path (pytest rootdir import)

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
ZERO3 = os.path.join(REPO, "ds_configs", "zero3.json")
STEPS = 60



def _env(**extra) -> dict:
    return launch_env(GRNFORMER_DS_MLFLOW_RETRY="1", GRNFORMER_DS_MLFLOW_FLUSH_TIMEOUT="120", **extra)




class Server:
    """`mlflow server` on a fixed port over one sqlite database, stoppable and restartable."""

    def __init__(self, d, port):
        self.d, self.port, self.proc = d, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self):
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{self.d}/mlflow.db", "--artifacts-destination", str(self.d / "artifacts")],
            env=_env(), cwd=str(self.d), stdout=subprocess.DEVNULL, stderr=open(self.d / "server.log", "a"),
            start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError((self.d / "server.log").read_text()[-2000:])

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # gone at once, as a crashed server
        self.proc.wait()


def _steps(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as fh:
        return sum(1 for x in fh if x.strip().endswith("}"))


def _wait_steps(out, n, proc, timeout=240):
    deadline = time.time() + timeout
    while _steps(out) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"no step {n} in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    from grnformer_ds.training.integration import ensure_demo

    d = str(tmp_path_factory.mktemp("outage_cache"))
    ensure_demo(d, say=lambda line: None)
    return d


def _start_run(demo_cache, out, uri):
    args = [sys.executable, PRETRAIN, "--deepspeed_config", ZERO3, "--demo-cache-dir", demo_cache, "--output-dir", out,
            "--max-steps", str(STEPS), "--eval-every", "30", "--save-every", "30", "--no-progress", "--no-export",
            "--mlflow-tracking-uri", uri, "--experiment-name", "outage"]
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    return run, sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))


@pytest.mark.parametrize("when", ["mid-run", "at-start"])
def test_training_survives_a_tracking_outage_and_mlflow_gets_every_step(demo_cache, tmp_path, when):
    server = Server(tmp_path, free_port())
    if when == "mid-run":
        server.start()
    out = str(tmp_path / "run")
    proc = _start_run(demo_cache, out, server.uri)
    try:
        if when == "mid-run":
            _wait_steps(out, 4, proc)
            server.stop()
        _wait_steps(out, 15, proc)  # training goes on without the server
        server.start()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 0, output[-3000:]
        assert output.count("is unreachable") == 1, output[-3000:]
        assert "answers again" in output, output[-3000:]
        run, steps = _logged_steps(server.uri)
        assert steps == list(range(1, STEPS + 1)), steps  # every step, the missed ones sent afterwards
        assert run.info.status == "FINISHED" and run.data.params.get("run.max_steps") == str(STEPS)
        # the run's id is kept for --resume even when MLflow created the run after the last checkpoint
        with open(os.path.join(out, "mlflow_run_id.txt")) as fh:
            assert fh.read().strip() == run.info.run_id
        if when == "mid-run":
            with open(os.path.join(out, "checkpoints", "latest")) as fh:
                tag = fh.read().strip()
            saved = json.load(open(os.path.join(out, "checkpoints", tag, "trainer_state.json")))
            assert saved["mlflow_run_id"] == run.info.run_id
    finally:
        server.stop()
