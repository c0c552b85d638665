"""MLflow tracking on rank 0 (other ranks get a tracker whose methods do nothing), that never stops training.

Default store: `sqlite:///<output_dir>/mlflow.db` (MLflow 3 refuses a plain `./mlruns` file store unless
MLFLOW_ALLOW_FILE_STORE=true). Any tracking server works with `--mlflow-tracking-uri http://host:5000`.
A resumed run continues the same MLflow run (its id is stored in the checkpoint).

Outages: every MLflow call goes through one background thread, in order, so the training loop never waits for the
server. When a call fails for a reason that may pass (server unreachable, timeout, 5xx), the tracker prints one
warning, keeps the calls queued (metrics are in `metrics.jsonl` anyway) and retries every `retry_s` seconds (default
10, `GRNFORMER_DS_MLFLOW_RETRY`); when
the server answers again it sends everything that was missed, in order, and says so. A run that could not be
created at start is created then. `end()` waits up to `flush_timeout_s` (default 60 s,
`GRNFORMER_DS_MLFLOW_FLUSH_TIMEOUT`) for the queue to drain; what could not be
sent by then is named, and `python -m grnformer_ds.training.tracking replay RUN_DIR` sends a run's missing steps
from its metrics.jsonl later (a resumed run does the same by itself, `fill_gaps`). A call MLflow rejects (a bad
value) is dropped with a warning instead of blocking the queue.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

_MAX_PARAM_LEN = 6000  # MLflow's limit for a param value
# MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) would keep one call waiting for minutes;
# the tracker retries by itself. A user's own setting wins.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
              "PERMISSION_DENIED", "UNAUTHENTICATED"}


def default_tracking_uri(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))


def local_artifact_root(tracking_uri: str) -> str | None:
    """`file://…/mlartifacts` beside a local `sqlite:///…` database, else None (a tracking server decides).

    Why: with a sqlite URI MLflow puts a new experiment's artifacts in `./mlruns` of whatever directory the run was
    started from; keeping them beside the database keeps a run's output directory self-contained."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = os.path.abspath(tracking_uri[len(prefix):])
    return Path(os.path.dirname(db), "mlartifacts").as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists and other leaves are kept as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_transient(exc: BaseException) -> bool:
    """A failure that may pass (connection, timeout, server error) rather than MLflow rejecting the call."""
    code = getattr(exc, "error_code", None)
    return code not in _PERMANENT


def metric_lines(metrics_path: str, after_step: int) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) of metrics.jsonl lines with step > `after_step` (the numeric fields only)."""
    out = []
    if not os.path.isfile(metrics_path):
        return out
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line.endswith("}"):
                continue  # a line cut by a kill
            row = json.loads(line)
            step = int(row.get("step", 0))
            if step > after_step:
                out.append((step, {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}))
    return out


class Tracker:
    """MLflow through `MlflowClient` on a background thread; `enabled=False` makes every method a no-op.

    say: where the tracker's warnings go (default stdout of this rank)."""

    def __init__(self, enabled: bool, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 run_id: str | None = None, retry_s: float = 10.0, flush_timeout_s: float | None = None,
                 say: Callable[[str], None] | None = None, run_id_path: str | None = None):
        """run_id_path: a file the run's id is written to as soon as MLflow gives it (a run created after the
        last checkpoint, during an outage, is still continued by --resume)."""
        self.enabled = enabled
        self.run_id_path = run_id_path
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self.say = say or (lambda line: print(line, flush=True))
        self.retry_s = float(os.environ.get("GRNFORMER_DS_MLFLOW_RETRY", retry_s))
        # how long end() waits for an unreachable server before giving up on what is queued
        self.flush_timeout_s = float(flush_timeout_s if flush_timeout_s is not None
                                     else os.environ.get("GRNFORMER_DS_MLFLOW_FLUSH_TIMEOUT", 60))
        self._experiment, self._run_name, self._resume_id = experiment_name, run_name, run_id
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._offline_since: float | None = None
        self._next_try = 0.0
        self._stopping = False
        self._dropped = 0
        self._queue.append(("open the run", self._open))
        self._drain_now()  # the first call synchronously: a reachable server gives the run id right away
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the queue
    def _submit(self, what: str, op: Callable[[], None]) -> None:
        with self._cond:
            self._queue.append((what, op))
            self._cond.notify()

    def _attempt(self) -> bool:
        """Run the queue's head once; False when MLflow is (still) unreachable."""
        with self._cond:
            if not self._queue:
                return True
            what, op = self._queue[0]
        try:
            op()
        except Exception as exc:  # noqa: BLE001  (anything MLflow or the network raises)
            if not is_transient(exc):
                self.say(f"warning: MLflow rejected '{what}' ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); dropped")
                with self._cond:
                    self._queue.popleft()
                    self._dropped += 1
                return True
            if self._offline_since is None:
                self._offline_since = time.time()
                self.say(f"warning: MLflow at {self.tracking_uri} is unreachable ({type(exc).__name__}); training "
                         f"continues, metrics go to metrics.jsonl and are sent when it answers (retry every "
                         f"{self.retry_s:g} s)")
            self._next_try = time.time() + self.retry_s
            return False
        with self._cond:
            self._queue.popleft()
            pending = len(self._queue)
        if self._offline_since is not None:
            self.say(f"MLflow at {self.tracking_uri} answers again after {time.time() - self._offline_since:.0f} s: "
                     f"sending the {pending + 1} call(s) queued meanwhile")
            self._offline_since = None
        return True

    def _drain_now(self) -> None:
        while self._queue and self._attempt():
            pass

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
                wait = self._next_try - time.time()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
            self._attempt()

    # ------------------------------------------------------------------ MLflow calls (run on the thread)
    def _open(self) -> None:
        if self.run_id is None:
            self._open_run()
        if self.run_id_path:
            from grnformer_ds.training.checkpoint import atomic_write_text

            atomic_write_text(self.run_id_path, self.run_id + "\n")

    def _open_run(self) -> None:
        c = self._client
        if self._resume_id is not None:
            try:  # resume: same run, metrics continue at the resumed step
                c.update_run(self._resume_id, status="RUNNING")
                self.run_id = self._resume_id
                return
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc) and "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", "")):
                    raise
                self.say(f"warning: cannot continue MLflow run {self._resume_id} at {self.tracking_uri} "
                         f"({type(exc).__name__}); starting a new run")
                self._resume_id = None
        exp = c.get_experiment_by_name(self._experiment)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(
            self._experiment, artifact_location=local_artifact_root(self.tracking_uri))
        self.run_id = c.create_run(exp_id, run_name=self._run_name).info.run_id

    # ------------------------------------------------------------------ public API
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        flat = {}
        for k, v in flatten(params, prefix).items():
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            flat[k[:250]] = s[:_MAX_PARAM_LEN]

        def op():
            from mlflow.entities import Param

            existing = self._client.get_run(self.run_id).data.params
            # Params are immutable in MLflow; on resume only new keys are logged (changed values would raise).
            new = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), 100):  # MLflow's batch limit
                self._client.log_batch(self.run_id, params=new[i:i + 100])

        self._submit(f"params {prefix}*", op)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        stamp = int(time.time() * 1000)

        def op():
            from mlflow.entities import Metric

            self._client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in clean.items()])

        self._submit(f"metrics of step {step}", op)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not (self.enabled and os.path.exists(path)):
            return
        if os.path.isdir(path):
            self._submit(f"artifacts {path}", lambda: self._client.log_artifacts(self.run_id, path, artifact_path))
        else:
            self._submit(f"artifact {path}", lambda: self._client.log_artifact(self.run_id, path, artifact_path))

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        if self.enabled:
            data = dict(d)
            self._submit(f"dict {name}", lambda: self._client.log_dict(self.run_id, data, name))

    def fill_gaps(self, metrics_path: str) -> None:
        """Send the steps of metrics.jsonl this run's MLflow run lacks (a resumed run whose previous process lost
        the server): everything after the last step MLflow holds a `loss` for."""
        if not self.enabled:
            return

        def op():
            from mlflow.entities import Metric

            history = self._client.get_metric_history(self.run_id, "loss")
            last = max((m.step for m in history), default=0)
            rows = metric_lines(metrics_path, last)
            stamp = int(time.time() * 1000)
            batch = [Metric(k, float(v), stamp, step) for step, row in rows for k, v in row.items()
                     if math.isfinite(float(v))]
            for i in range(0, len(batch), 1000):
                self._client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            if rows:
                self.say(f"MLflow: sent {len(rows)} step(s) from {metrics_path} that the run lacked")

        self._submit("missing steps from metrics.jsonl", op)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run and wait (up to `flush_timeout_s`) until everything queued is sent."""
        if not self.enabled or self._stopping:
            return
        self._submit(f"end ({status})", lambda: self._client.set_terminated(self.run_id, status=status))
        deadline = time.time() + self.flush_timeout_s
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=max(0.0, deadline - time.time()))
        left = len(self._queue)
        if left:
            self.say(f"warning: MLflow at {self.tracking_uri} did not answer within {self.flush_timeout_s:g} s: "
                     f"{left} call(s) not sent (the metrics are in metrics.jsonl: `python -m "
                     f"grnformer_ds.training.tracking replay RUN_DIR` sends them later)")


# ---------------------------------------------------------------------------------------------- replay command
def replay(run_dir: str, tracking_uri: str | None = None) -> int:
    """Send the steps of `run_dir`/metrics.jsonl its MLflow run lacks (the run id comes from its latest
    checkpoint). Returns the number of steps sent."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from grnformer_ds.errors import UserInputError
    from grnformer_ds.training import checkpoint as ckpt

    root = os.path.join(run_dir, "checkpoints")
    tag = ckpt.find_latest(root)
    if tag is None:
        raise UserInputError("no complete checkpoint (the MLflow run id is kept in it)", run_dir)
    with open(os.path.join(root, tag, ckpt.TRAINER_STATE), encoding="utf-8") as fh:
        run_id = json.load(fh).get("mlflow_run_id")
    if not run_id:
        raise UserInputError("its checkpoint names no MLflow run (the run was never created on the server)", run_dir)
    if tracking_uri is None:
        with open(os.path.join(run_dir, "run_settings.resolved.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        tracking_uri = saved.get("mlflow_tracking_uri_resolved") or saved.get("mlflow_tracking_uri")
        if not tracking_uri or tracking_uri.lower() == "none":
            raise UserInputError("its run_settings.resolved.json names no MLflow tracking URI: pass --tracking-uri",
                                 run_dir)
    client = MlflowClient(tracking_uri)
    last = max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)
    rows = metric_lines(os.path.join(run_dir, "metrics.jsonl"), last)
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, step) for step, row in rows for k, v in row.items()
             if math.isfinite(float(v))]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
    return len(rows)


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="send a run's metrics.jsonl steps its MLflow run lacks")
    p.add_argument("command", choices=["replay"])
    p.add_argument("run_dir")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    n = replay(a.run_dir, a.tracking_uri)
    print(f"sent {n} step(s) to MLflow")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
