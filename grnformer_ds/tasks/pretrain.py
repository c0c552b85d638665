"""The pretraining task: masked expression values (`GRNFormerForMaskedLM`), the store's held-out tail as the
evaluation, the trivial baselines beside the held-out loss (training/baselines.py)."""
from __future__ import annotations

from . import register_task
from .base import RunContext, Task


@register_task
class MaskedValuePretraining(Task):
    name = "pretrain"
    description = "masked expression values (the backbone's pretraining head)"
    model_class = "GRNFormerForMaskedLM"
    fine_tunes = False

    def datasets(self, run: RunContext):
        from grnformer_ds.training import integration as I

        return I.build_datasets(run.store_path, run.config, run.settings, run.resolved, run.info, run.args)

    def trainer_extras(self, run: RunContext, eval_batches) -> dict:
        """The trivial baselines scored beside every held-out loss, fitted on training cells."""
        if eval_batches is None:
            return {}
        from grnformer_ds.training import integration as I

        return {"baselines": I.fit_baselines(run.store_path, run.config, run.settings, run.resolved, run.info,
                                             run.args, run.engine.device)}
