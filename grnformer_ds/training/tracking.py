"""MLflow tracking on rank 0 (other ranks get a tracker whose methods do nothing).

Default store: `sqlite:///<output_dir>/mlflow.db` (MLflow 3 refuses a plain `./mlruns` file store unless
MLFLOW_ALLOW_FILE_STORE=true). Any tracking server works with `--mlflow-tracking-uri http://host:5000`.
A resumed run continues the same MLflow run (its id is stored in the checkpoint).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

_MAX_PARAM_LEN = 6000  # MLflow's limit for a param value


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


class Tracker:
    """Thin wrapper over the `mlflow` fluent API; `enabled=False` makes every method a no-op."""

    def __init__(self, enabled: bool, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 run_id: str | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        run = None
        if run_id is not None:
            try:  # resume: same run, metrics continue at the resumed step
                run = mlflow.start_run(run_id=run_id)
            except Exception as exc:  # e.g. resumed against another tracking server
                print(f"warning: cannot continue MLflow run {run_id} at {tracking_uri} ({type(exc).__name__}); "
                      f"starting a new run", flush=True)
        if run is None:
            if mlflow.get_experiment_by_name(experiment_name) is None:
                mlflow.create_experiment(experiment_name, artifact_location=local_artifact_root(tracking_uri))
            mlflow.set_experiment(experiment_name)
            run = mlflow.start_run(run_name=run_name)
        self.run_id = run.info.run_id
        self.tracking_uri = tracking_uri

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        flat = {}
        for k, v in flatten(params, prefix).items():
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            flat[k[:250]] = s[:_MAX_PARAM_LEN]
        existing = self._mlflow.get_run(self.run_id).data.params
        # Params are immutable in MLflow; on resume only new keys are logged (changed values would raise).
        flat = {k: v for k, v in flat.items() if k not in existing}
        if flat:
            self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled and os.path.exists(path):
            if os.path.isdir(path):
                self._mlflow.log_artifacts(path, artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(path, artifact_path=artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(dict(d), name)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
