"""Genetic perturbation response (GEARS' setup): a control cell + the perturbed genes -> the perturbed expression.

Input data: an .h5ad (or a store built from it, with `--labels-from`) whose `obs["condition"]` follows GEARS'
convention: `ctrl` for control cells, `GENE+ctrl` (or `ctrl+GENE`) for one perturbed gene, `GENE1+GENE2` for two.
A sample is one perturbed cell: its input is a control cell (drawn for it with the split seed, tokenized by the
backbone as any cell) and its perturbed genes (`condition_gene_ids`: the model reads them through its own gene
embeddings, so a gene never perturbed in training still has a meaningful input); its target is its own expression,
log1p of counts normalised to 10,000, over every store gene (`GRNFormerForCellClassification` with `num_labels` =
the store's genes, `problem_type="regression"`).

The perturbations (not the cells) are split, so validation and test perturbations are unseen in training (GEARS'
"simulation" split). Metrics (`metrics.perturbation_metrics`): GEARS' Pearson and MSE of the mean prediction per
perturbation over all genes and its top-20 DE genes, and the Pearson of the change against the control mean
(`pearson_delta`, the early-stopping metric; `pearson_delta_de`). DE genes: scanpy's `rank_genes_groups` of each
perturbation against the controls (t-test, ranked by |score|), as GEARS computes them.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from grnformer_ds.errors import UserInputError

from . import register_task
from .base import RunContext
from .cell_classification import CellTypeClassification, predict
from .cell_labels import NO_LABEL
from .metrics import perturbation_metrics

CONTROL = "ctrl"
TARGET_SUM = 1e4


def condition_genes(condition: str) -> list[str]:
    """The perturbed genes of a GEARS condition name ('A+ctrl' -> ['A'], 'A+B' -> ['A', 'B'])."""
    return [g for g in str(condition).split("+") if g and g != CONTROL]


def log_normalized(rows, n_genes: int, target_sum: float = TARGET_SUM) -> np.ndarray:
    """(B, G) float32 log1p(counts / total x target_sum) of `CellRows` (dense over the store's genes)."""
    n = len(rows)
    lengths = np.diff(rows.indptr)
    row_of = np.repeat(np.arange(n), lengths)
    data = rows.data[rows.indptr[0]:rows.indptr[-1]].astype(np.float64)
    cols = rows.indices[rows.indptr[0]:rows.indptr[-1]].astype(np.int64)
    totals = np.bincount(row_of, weights=data, minlength=n)
    out = np.zeros((n, n_genes), dtype=np.float32)
    out[row_of, cols] = np.log1p(data / np.maximum(totals[row_of], 1e-12) * target_sum)
    return out


def read_expression(store_path: str, positions: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """`log_normalized` expression of the store cells at `positions` (in that order), read in chunks."""
    from grnformer_ds.data.readers import StoreReader

    reader = StoreReader(store_path)
    order = np.argsort(positions, kind="stable")
    out = np.empty((len(positions), reader.n_genes), dtype=np.float32)
    sorted_pos = positions[order]
    for lo in range(0, len(sorted_pos), chunk):
        part = sorted_pos[lo:lo + chunk]
        rows = reader.read_range(int(part[0]), int(part[-1]) + 1).take(part - part[0])
        out[order[lo:lo + chunk]] = log_normalized(rows, reader.n_genes)
    return out


def de_genes(expression: np.ndarray, conditions: np.ndarray, n_genes: int) -> dict[str, np.ndarray]:
    """Top `n_genes` DE genes (column indices) of each perturbation against the controls: scanpy's
    rank_genes_groups (t-test, rankby_abs), as GEARS' data_utils.rank_genes_groups_by_cov."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    adata = ad.AnnData(X=expression, obs=pd.DataFrame({"condition": pd.Categorical(conditions)}))
    adata.var_names = [str(i) for i in range(expression.shape[1])]
    groups = [c for c in adata.obs["condition"].cat.categories if c != CONTROL]
    sc.tl.rank_genes_groups(adata, groupby="condition", groups=groups, reference=CONTROL, rankby_abs=True,
                            n_genes=min(n_genes, expression.shape[1]), use_raw=False, method="t-test")
    names = adata.uns["rank_genes_groups"]["names"]
    return {g: np.array([int(x) for x in names[g]], dtype=np.int64) for g in groups}


@register_task
class Perturbation(CellTypeClassification):
    name = "perturbation"
    description = "genetic perturbation response (GEARS): control cell + perturbed genes -> expression"
    head_prefixes = ("classifier.", "condition_encoder.")
    early_stopping = ("pearson_delta", "max")
    default_label_key = "condition"
    samples_are = "perturbed cells"

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group(f"task {self.name}")
        g.add_argument("--label-key", default=self.default_label_key,
                       help="obs column with GEARS condition names: ctrl, GENE+ctrl, GENE1+GENE2 (condition)")
        g.add_argument("--labels-from", default=None, metavar="H5AD",
                       help="read --label-key from this .h5ad's obs (cells matched by name) for a store --data")
        g.add_argument("--val-fraction", type=float, default=0.1, help="share of perturbations for validation")
        g.add_argument("--test-fraction", type=float, default=0.2, help="share of perturbations for testing")
        g.add_argument("--split-seed", type=int, default=None,
                       help="seed of the split and of the control paired with each cell (default: --seed)")
        g.add_argument("--de-genes", type=int, default=20, help="top DE genes per perturbation for *_de (20)")
        g.add_argument("--patience", type=int, default=3,
                       help="stop after this many evaluations without a better validation pearson_delta (3)")

    def read_labels(self, run: RunContext):
        if not (run.state.get("h5ad") or run.args.labels_from):
            raise UserInputError("perturbation reads the conditions from an .h5ad: give --data FILE.h5ad, or "
                                 "--labels-from FILE.h5ad with a store")
        return super().read_labels(run)

    def prepare(self, run: RunContext) -> None:
        a = run.args
        labels = self.read_labels(run)
        if CONTROL not in labels.classes:
            raise UserInputError(f"{labels.key} has no '{CONTROL}' cells (GEARS' name for controls)")
        vocab = dict(run.store.vocab)
        perturbations, unknown = [], []
        for c in labels.classes:
            if c == CONTROL:
                continue
            genes = condition_genes(c)
            (perturbations if genes and all(g in vocab for g in genes) else unknown).append(c)
        if unknown:
            run.say(f"note: {len(unknown)} perturbation(s) name genes outside the model's vocabulary and are left "
                    f"out (e.g. {unknown[0]!r})")
        if len(perturbations) < 3:
            raise UserInputError(f"{len(perturbations)} usable perturbation(s): a train / val / test split of "
                                 f"perturbations needs at least 3")
        seed = a.seed if a.split_seed is None else a.split_seed
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E]))
        order = [perturbations[i] for i in rng.permutation(len(perturbations))]
        n_test = max(1, int(round(a.test_fraction * len(order))))
        n_val = max(1, int(round(a.val_fraction * len(order))))
        if n_test + n_val >= len(order):
            raise UserInputError(f"--val-fraction / --test-fraction leave no training perturbation of {len(order)}")
        groups = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        code = {c: i for i, c in enumerate(labels.classes)}
        controls = np.flatnonzero(labels.codes == code[CONTROL])
        splits = {k: np.flatnonzero(np.isin(labels.codes, [code[c] for c in v])) for k, v in groups.items()}
        pert_cells = np.sort(np.concatenate(list(splits.values())))
        control_of = np.full(len(labels.codes), NO_LABEL, dtype=np.int64)
        control_of[pert_cells] = controls[rng.integers(0, len(controls), len(pert_cells))]
        width = max(len(condition_genes(c)) for c in perturbations)
        gene_ids = np.full((len(labels.codes), width), int(run.store.special_tokens.get("<pad>", 0)), np.int64)
        for c in perturbations:
            ids = [vocab[g] for g in condition_genes(c)]
            gene_ids[np.ix_(labels.codes == code[c], np.arange(len(ids)))] = ids
        target_row = np.full(len(labels.codes), -1, dtype=np.int64)  # store position -> row of `targets`
        target_row[pert_cells] = np.arange(len(pert_cells))
        expression = read_expression(run.store_path, np.concatenate([controls, pert_cells]))
        names = np.array(labels.classes, dtype=object)[labels.codes[np.concatenate([controls, pert_cells])]]
        run.state.update(
            labels=labels, splits=splits, groups=groups, control_of=control_of, gene_ids=gene_ids,
            control_mean=expression[:len(controls)].mean(0),
            target_row=target_row, targets=expression[len(controls):],
            de=de_genes(expression, names.astype(str), a.de_genes))
        sizes = ", ".join(f"{k} {len(v)} ({len(splits[k]):,} cells)" for k, v in groups.items())
        run.say(f"perturbations: {len(perturbations)} ({sizes}); {len(controls):,} control cells; targets over "
                f"{expression.shape[1]:,} genes")
        if run.info.is_main:
            os.makedirs(run.settings.output_dir, exist_ok=True)
            tmp = os.path.join(run.settings.output_dir, "splits.tmp.npz")
            np.savez(tmp, codes=labels.codes, classes=np.array(labels.classes), control_of=control_of,
                     **splits, **{f"{k}_conditions": np.array(v) for k, v in groups.items()})
            os.replace(tmp, os.path.join(run.settings.output_dir, "splits.npz"))

    def configure(self, config, run: RunContext) -> None:
        n_genes = run.state["targets"].shape[1]
        config.num_labels = n_genes
        genes = [str(g) for g in run.store.var.index]
        config.id2label = dict(enumerate(genes))
        config.label2id = {g: i for i, g in enumerate(genes)}
        config.problem_type = "regression"
        config.condition_genes = True

    def samples(self, run: RunContext, split: str):
        """One sample per perturbed cell: its control cell's store position, its own expression, its genes."""
        s = run.state
        cells = s["splits"][split]
        return s["control_of"][cells], s["targets"][s["target_row"][cells]], {
            "condition_gene_ids": s["gene_ids"][cells]}

    def score(self, run: RunContext, split: str, dataset) -> dict[str, float]:
        s = run.state
        samples, predictions = predict(run.engine, dataset, run.engine.device)
        cells = s["splits"][split][samples]
        conditions = np.array(s["labels"].classes)[s["labels"].codes[cells]]
        return perturbation_metrics(conditions, predictions, dataset.sample_labels[samples], s["control_mean"],
                                    s["de"])

    def summary(self, run: RunContext) -> dict[str, Any]:
        s = run.state
        return {"task": self.name, "label_key": s["labels"].key, "n_genes": int(s["targets"].shape[1]),
                **{f"{k}_perturbations": v for k, v in s["groups"].items()},
                **{f"n_{k}": int(len(v)) for k, v in s["splits"].items()}}
