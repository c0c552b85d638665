"""Cell-level classification fine-tuning: `cell-type` (annotation; accuracy, macro-F1) and `sc-drug-response`
(SCAD's setup: a per-cell sensitive / resistant label; ROC AUC over stratified folds).

The model is `GRNFormerForCellClassification` (a classifier on the cell embedding) started from a pretrained
folder. Labels come from the store's cell types or an obs column of the .h5ad (`cell_labels`); the labelled cells
are split by `splits` (seeded, stratified; saved as splits.npz in the run directory). Training cells stream with
the pretraining loader (no masking; edge perturbation as in pretraining); validation and test cells are read once
each in a fixed order, their predictions gathered over ranks (`predict`), and scored with scikit-learn (`metrics`).
The validation metric drives early stopping; the best checkpoint is scored on the test split and exported.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch

from grnformer_ds.errors import UserInputError

from . import register_task
from .base import RunContext, Task
from .cell_labels import CellLabels, h5ad_labels, store_cell_types
from .metrics import classification_metrics
from .splits import kfold_split, stratified_split

SPLITS_FILE = "splits.npz"
METRICS_FILE = "test_metrics.json"


@torch.no_grad()
def predict(engine, dataset, device) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids (N,), logits (N, C)) of every sample of `dataset` exactly once, ascending, gathered over ranks:
    ids are positions in the dataset's `cells` (its `sample_index`). Every rank runs the same number of forwards
    (ZeRO-3 needs that); samples repeated to even out the ranks count once."""
    import torch.distributed as dist

    from grnformer_ds.training.trainer import forward_keys

    keys = forward_keys(engine.module)
    cells, logits = [], []
    for batch in dataset:
        dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
               if k != "labels" and (keys is None or k in keys)}
        out = engine(**dev)
        cells.append(batch["sample_index"].numpy())
        logits.append(out.logits.float().cpu().numpy())
    part = (np.concatenate(cells), np.concatenate(logits))
    parts = [part]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    cell_index = np.concatenate([p[0] for p in parts])
    all_logits = np.concatenate([p[1] for p in parts])
    uniq, first = np.unique(cell_index, return_index=True)
    return uniq, all_logits[first]


def _split_line(labels: CellLabels, splits: dict[str, np.ndarray]) -> str:
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in splits.items())
    return f"labels: {labels.key}, {len(labels.classes)} classes; cells: {sizes}"


@register_task
class CellTypeClassification(Task):
    name = "cell-type"
    description = "cell-type annotation from the cell embedding (accuracy, macro-F1)"
    model_class = "GRNFormerForCellClassification"
    head_prefixes = ("classifier.",)
    early_stopping = ("macro_f1", "max")
    default_label_key = "cell_type"
    samples_are = "cells"
    folds_default = None  # a train / val / test split unless --folds is given

    # ------------------------------------------------------------------ options
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group(f"task {self.name}")
        g.add_argument("--label-key", default=self.default_label_key,
                       help=f"obs column with the labels ({self.default_label_key}); a store keeps only cell_type, "
                            f"other columns come from the .h5ad (--data FILE.h5ad, or --labels-from FILE.h5ad for "
                            f"a store built from it)")
        g.add_argument("--labels-from", default=None, metavar="H5AD",
                       help="read --label-key from this .h5ad's obs (cells matched by name) for a store --data")
        g.add_argument("--val-fraction", type=float, default=0.1, help="validation share of the labelled cells")
        g.add_argument("--test-fraction", type=float, default=0.1,
                       help="test share of the labelled cells (ignored with --folds)")
        g.add_argument("--folds", type=int, default=self.folds_default,
                       help="stratified k-fold: the test split is fold --fold of --folds"
                            + (f" (default {self.folds_default})" if self.folds_default else ""))
        g.add_argument("--fold", default=0,
                       help="which fold is the test split (0), or 'all': every fold in turn under --output-dir, "
                            "then cv_metrics.json (mean ± sd over the folds)")
        g.add_argument("--split-seed", type=int, default=None, help="seed of the splits (default: --seed)")
        g.add_argument("--patience", type=int, default=3,
                       help=f"stop after this many evaluations without a better validation {self.early_stopping[0]}"
                            f" (3)")
        self.more_arguments(g)

    def more_arguments(self, group) -> None:
        pass

    # ------------------------------------------------------------------ data
    def read_labels(self, run: RunContext) -> CellLabels:
        a = run.args
        source = run.state.get("h5ad") or a.labels_from
        if source is not None:
            return h5ad_labels(run.store, source, a.label_key, self.fixed_classes(run))
        if a.label_key != "cell_type":
            raise UserInputError(f"--label-key {a.label_key}: a store keeps only cell_type; name the .h5ad it was "
                                 f"built from with --labels-from", run.store_path)
        return store_cell_types(run.store)

    def fixed_classes(self, run: RunContext) -> list[str] | None:
        return None

    def prepare(self, run: RunContext) -> None:
        a = run.args
        labels = self.read_labels(run)
        if len(labels.classes) < 2:
            raise UserInputError(f"{labels.key}: {len(labels.classes)} class; classification needs at least 2")
        seed = a.seed if a.split_seed is None else a.split_seed
        if a.folds:
            splits = kfold_split(labels.codes, a.folds, a.fold, a.val_fraction, seed)
        else:
            splits = stratified_split(labels.codes, a.val_fraction, a.test_fraction, seed)
        for name, cells in splits.items():
            if len(cells) == 0:
                raise UserInputError(f"the {name} split is empty ({len(labels.codes[labels.codes >= 0])} labelled "
                                     f"cells); raise --val-fraction / --test-fraction or give more cells")
        run.state.update(labels=labels, splits=splits)
        run.say(_split_line(labels, splits) + (f" (fold {a.fold} of {a.folds})" if a.folds else ""))
        if run.info.is_main:
            os.makedirs(run.settings.output_dir, exist_ok=True)
            tmp = os.path.join(run.settings.output_dir, SPLITS_FILE + ".tmp.npz")
            np.savez(tmp, classes=np.array(labels.classes), codes=labels.codes, **splits)
            os.replace(tmp, os.path.join(run.settings.output_dir, SPLITS_FILE))

    def configure(self, config, run: RunContext) -> None:
        classes = run.state["labels"].classes
        config.num_labels = len(classes)
        config.id2label = dict(enumerate(classes))
        config.label2id = {c: i for i, c in enumerate(classes)}
        config.problem_type = "single_label_classification"

    def samples(self, run: RunContext, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(store positions of the split's samples, their targets, per-sample model inputs): here each labelled
        cell once, its class."""
        cells = run.state["splits"][split]
        return cells, run.state["labels"].codes[cells], {}

    def _dataset(self, run: RunContext, split: str):
        """The split's samples through the pretraining loader: whole cells (no masking); held-out ones tokenized by
        their own generator (`data.cell_random`), so a prediction does not depend on the batching or the number of
        ranks (the exported model reproduces the test metrics)."""
        from grnformer_ds.data import StreamingCellDataset
        from grnformer_ds.training.integration import dataset_kwargs

        kw = dataset_kwargs(run.config, run.settings, run.resolved, run.info, run.args)
        kw.pop("eval_fraction", None)
        kw["mask_ratio"] = 0.0
        cells, targets, inputs = self.samples(run, split)
        training = split == "train"
        return StreamingCellDataset(run.store_path, split="all", cells=cells, sample_labels=targets,
                                    sample_inputs=inputs, training=training, shuffle=training, drop_last=training,
                                    cell_keyed_random=not training, **kw)

    def datasets(self, run: RunContext):
        from grnformer_ds.data import StatefulCellLoader

        train = self._dataset(run, "train")
        run.state["val"] = self._dataset(run, "val")
        loader = StatefulCellLoader(train, num_workers=run.settings.num_workers, pin_memory=run.info.has_gpu,
                                    prefetch_factor=4 if run.settings.num_workers else None)
        return loader, None

    def summary(self, run: RunContext) -> dict[str, Any]:
        labels, splits = run.state["labels"], run.state["splits"]
        return {"task": self.name, "label_key": labels.key, "classes": labels.classes,
                **{f"n_{k}": int(len(v)) for k, v in splits.items()}}

    # ------------------------------------------------------------------ evaluation
    def score(self, run: RunContext, split: str, dataset) -> dict[str, float]:
        samples, logits = predict(run.engine, dataset, run.engine.device)
        return classification_metrics(dataset.sample_labels[samples], logits)

    def trainer_extras(self, run: RunContext, eval_batches) -> dict:
        from grnformer_ds.training.early_stopping import EarlyStopping

        metric, mode = self.early_stopping
        return {"evaluator": lambda: self.score(run, "val", run.state["val"]),
                "early_stopping": EarlyStopping(metric, mode, run.args.patience), "desc": self.name}

    def finish(self, run: RunContext, trainer, tracker) -> dict[str, Any]:
        """Load the best checkpoint (by the validation metric), score the test split, write test_metrics.json."""
        from grnformer_ds.training import checkpoint as ckpt

        es = trainer.early_stopping
        best = es.best_step if es is not None and es.best_step is not None else trainer.state.step
        tag = ckpt.tag_for_step(best)
        if not ckpt.is_complete(trainer.ckpt_root, tag):  # its save failed (--on-save-error continue)
            tag = ckpt.find_latest(trainer.ckpt_root)
            if tag is None:
                raise ckpt.CheckpointSaveError("no checkpoint was saved: nothing to score on the test split")
            run.say(f"warning: the best checkpoint (step {best}) was not saved; scoring {tag} instead")
            best = int(tag.replace("global_step", ""))
        ckpt.load_weights(run.engine, trainer.ckpt_root, tag)
        run.engine.eval()
        test = self.score(run, "test", self._dataset(run, "test"))
        val = self.score(run, "val", run.state["val"])
        run.state["export_tag"] = tag
        report = {"task": self.name, "best_step": best, "steps_trained": trainer.state.step,
                  "early_stopping": {"metric": es.metric, "mode": es.mode, "patience": es.patience} if es else None,
                  "val": val, "test": test, **self.summary(run)}
        if run.info.is_main:
            from grnformer_ds.training.checkpoint import atomic_write_text

            atomic_write_text(os.path.join(run.settings.output_dir, METRICS_FILE), json.dumps(report, indent=1))
            tracker.log_metrics({f"test_{k}": v for k, v in test.items()}, step=trainer.state.step)
            tracker.log_metrics({f"best_val_{k}": v for k, v in val.items()}, step=trainer.state.step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "loss")
        run.say(f"test ({len(run.state['splits']['test']):,} {self.samples_are}, best checkpoint of step {best}): "
                f"{shown}; "
                f"wrote {os.path.join(run.settings.output_dir, METRICS_FILE)}")
        return report


@register_task
class SingleCellDrugResponse(CellTypeClassification):
    name = "sc-drug-response"
    description = "per-cell drug sensitivity (SCAD's setup): binary classification, ROC AUC over stratified folds"
    early_stopping = ("roc_auc", "max")
    default_label_key = "response"
    folds_default = 5

    def more_arguments(self, group) -> None:
        group.add_argument("--positive-label", default=None,
                           help="the label scored as positive by ROC AUC (default: 'sensitive' when present, else "
                                "the second label in sorted order)")

    def fixed_classes(self, run: RunContext) -> list[str] | None:
        """Two classes, the positive one last (roc_auc scores class 1)."""
        from grnformer_ds.inference.output import input_obs

        source = run.state.get("h5ad") or run.args.labels_from
        values = input_obs(source)[run.args.label_key]
        found = sorted(values[values.notna()].astype(str).unique())
        if len(found) != 2:
            raise UserInputError(f"{run.args.label_key}: sc-drug-response needs exactly 2 labels, found "
                                 f"{len(found)} ({found[:5]})", source)
        positive = run.args.positive_label or ("sensitive" if "sensitive" in found else found[1])
        if positive not in found:
            raise UserInputError(f"--positive-label {positive!r} is not one of {found}", source)
        return [c for c in found if c != positive] + [positive]

    def read_labels(self, run: RunContext) -> CellLabels:
        if not (run.state.get("h5ad") or run.args.labels_from):
            raise UserInputError("sc-drug-response reads the labels from an .h5ad: give --data FILE.h5ad, or "
                                 "--labels-from FILE.h5ad with a store")
        return super().read_labels(run)
