"""Training tasks, one registered place per task (`base.Task`): pretraining (masked values) and the fine-tuning
tasks of docs/after_pretraining.md. `get_task(name)` is the only dispatch: the run (`training.run`), the launchers and
the export take the model class, data, evaluation and report from the task.

    from grnformer_ds.tasks import get_task, task_names
"""
from __future__ import annotations

from .base import RunContext, Task

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its `name`."""
    _TASKS[cls.name] = cls
    return cls


def task_names(fine_tuning_only: bool = False) -> list[str]:
    _load_builtin()
    return [n for n, cls in _TASKS.items() if cls.fine_tunes or not fine_tuning_only]


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in _TASKS:
        from grnformer_ds.errors import UserInputError

        raise UserInputError(f"unknown task {name!r}; choose one of {', '.join(_TASKS)}")
    return _TASKS[name]()


def _load_builtin() -> None:
    from . import cell_classification, drug_response, perturbation, pretrain  # noqa: F401  (they register themselves)


__all__ = ["RunContext", "Task", "get_task", "register_task", "task_names"]
