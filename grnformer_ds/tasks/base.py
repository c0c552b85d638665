"""What a training task supplies to the shared engine (`training.run.run_task`): its model class, its data, its
held-out evaluation and what it reports at the end. Pretraining and every fine-tuning task go through the same run
(DeepSpeed engine, checkpoints, resume, MLflow, export); only these hooks differ.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar


@dataclass
class RunContext:
    """What a task's hooks see of the run. Filled in as the run goes: the store first, then the model config,
    then the engine."""

    args: argparse.Namespace
    settings: Any  # training.settings.RunSettings
    resolved: Any  # training.ds_config.ResolvedConfig
    info: Any  # training.engine.DistInfo
    say: Callable[[str], None]
    store_path: str = ""
    store: Any = None
    config: Any = None  # GRNFormerConfig
    engine: Any = None
    state: dict = field(default_factory=dict)  # the task's own (labels, splits, ...)


class Task:
    """A training task. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    model_class: ClassVar[str]  # a class of grnformer_ds.modeling (its Auto class comes with it)
    head_prefixes: ClassVar[tuple[str, ...]] = ()  # parameters a pretrained folder does not hold (the task head)
    early_stopping: ClassVar[tuple[str, str] | None] = None  # (metric, "max" | "min") on the validation split
    # True: starts from a pretrained folder (--model), schedules in epochs (launchers/finetune.py); False: pretraining
    fine_tunes: ClassVar[bool] = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The task's own command-line options (launchers/finetune.py)."""

    def prepare(self, run: RunContext) -> None:
        """After the store is known, before the model config: read labels, draw splits (every rank)."""

    def configure(self, config, run: RunContext) -> None:
        """Adjust the model config for the task (e.g. `num_labels`, `id2label`)."""

    def datasets(self, run: RunContext):
        """(train loader with state_dict/load_state_dict, held-out batches for the default evaluation or None)."""
        raise NotImplementedError

    def trainer_extras(self, run: RunContext, eval_batches) -> dict[str, Any]:
        """Keyword arguments for `training.trainer.Trainer`: `evaluator` (the validation evaluation: the same
        metrics dict on every rank, "loss" among them; default the masked-value loss over `eval_batches`),
        `early_stopping`, `baselines`."""
        return {}

    def finish(self, run: RunContext, trainer, tracker) -> dict[str, Any] | None:
        """After training (every rank): e.g. load the best checkpoint and score the test split. Returns what the
        run reports (rank 0 writes it as metrics JSON)."""
        return None

    def summary(self, run: RunContext) -> dict[str, Any]:
        """Facts about the task's data for run_settings.resolved.json and MLflow params."""
        return {}
