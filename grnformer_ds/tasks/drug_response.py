"""Bulk drug response (DeepCDR's setup): cell-line expression + drug -> ln IC50.

Inputs: the cell lines' expression (an .h5ad of counts, or a store built from it; cell lines are its cells, named by
obs_names) and `--drug-table` (csv / tsv with columns cell_line, drug, smiles, ln_ic50). A sample is one (cell line,
drug) pair: the model (`GRNFormerForCellClassification` with `num_labels=1` and `condition_feature_size`) reads the
cell line like any cell and the drug's Morgan fingerprint (`drug_features`) as its condition, and regresses ln IC50
(MSE). Splits over pairs: `random` (seeded), or `leave-drug-out` (whole drugs held out: the model must generalise to
unseen drugs). Metrics: Pearson (early stopping and the headline number, as DeepCDR), Spearman, RMSE.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from grnformer_ds.errors import UserInputError

from . import register_task
from .base import RunContext
from .cell_classification import CellTypeClassification, predict
from .drug_features import MORGAN_BITS, morgan_fingerprints
from .metrics import regression_metrics

COLUMNS = ("cell_line", "drug", "smiles", "ln_ic50")
SPLIT_MODES = ("random", "leave-drug-out")


def read_drug_table(path: str) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise UserInputError("drug table not found", path)
    sep = "\t" if path.endswith((".tsv", ".txt")) else ","
    try:
        table = pd.read_csv(path, sep=sep)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read the drug table ({' '.join(str(exc).split())})", path) from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise UserInputError(f"the drug table lacks column(s) {', '.join(missing)} (it needs {', '.join(COLUMNS)})",
                             path)
    table["ln_ic50"] = pd.to_numeric(table["ln_ic50"], errors="coerce")
    return table


def pair_splits(drug_of_pair: np.ndarray, n_drugs: int, mode: str, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, np.ndarray]:
    """Pair indices of train / val / test: a seeded random split of the pairs, or of the drugs (leave-drug-out)."""
    if mode not in SPLIT_MODES:
        raise UserInputError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError("--val-fraction and --test-fraction must be in (0, 1) and leave pairs for training")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD2]))
    units = rng.permutation(n_drugs if mode == "leave-drug-out" else len(drug_of_pair))
    n_test = max(1, int(round(test_fraction * len(units))))
    n_val = max(1, int(round(val_fraction * len(units))))
    if n_test + n_val >= len(units):
        raise UserInputError(f"too few {'drugs' if mode == 'leave-drug-out' else 'pairs'} ({len(units)}) for a "
                             f"train / val / test split")
    groups = {"test": units[:n_test], "val": units[n_test:n_test + n_val], "train": units[n_test + n_val:]}
    if mode == "random":
        return {k: np.sort(v) for k, v in groups.items()}
    return {k: np.flatnonzero(np.isin(drug_of_pair, v)) for k, v in groups.items()}


@register_task
class DrugResponse(CellTypeClassification):
    name = "drug-response"
    description = "bulk drug response (DeepCDR): cell-line embedding + drug fingerprint -> ln IC50 (Pearson)"
    head_prefixes = ("classifier.", "condition_encoder.")
    early_stopping = ("pearson", "max")
    samples_are = "pairs"

    def add_arguments(self, parser) -> None:
        g = parser.add_argument_group(f"task {self.name}")
        g.add_argument("--drug-table", required=True,
                       help=f"csv / tsv with columns {', '.join(COLUMNS)}; cell_line = the --data cells' names")
        g.add_argument("--split", default="random", choices=SPLIT_MODES,
                       help="random pairs, or whole drugs held out (random)")
        g.add_argument("--val-fraction", type=float, default=0.1, help="validation share of pairs / drugs (0.1)")
        g.add_argument("--test-fraction", type=float, default=0.1, help="test share of pairs / drugs (0.1)")
        g.add_argument("--split-seed", type=int, default=None, help="seed of the split (default: --seed)")
        g.add_argument("--fingerprint-bits", type=int, default=MORGAN_BITS,
                       help=f"Morgan fingerprint size, radius 2 ({MORGAN_BITS})")
        g.add_argument("--patience", type=int, default=3,
                       help="stop after this many evaluations without a better validation Pearson (3)")

    def prepare(self, run: RunContext) -> None:
        from grnformer_ds.inference.output import store_obs

        a = run.args
        table = read_drug_table(a.drug_table)
        names = pd.Index(store_obs(run.store).index.astype(str))
        if not names.is_unique:
            raise UserInputError("the cell lines' names (obs_names) are not unique", run.store_path)
        position = pd.Series(np.arange(len(names)), index=names)
        known = table["cell_line"].astype(str).isin(names) & table["ln_ic50"].notna()
        dropped = int((~known).sum())
        table = table[known].reset_index(drop=True)
        drugs = table.groupby("drug", sort=True)["smiles"].first()
        fingerprints, bad = morgan_fingerprints(drugs.tolist(), n_bits=a.fingerprint_bits)
        if bad:
            run.say(f"note: {len(bad)} drug(s) with SMILES RDKit cannot parse are left out (e.g. "
                    f"{drugs.index[bad[0]]!r})")
            table = table[~table["drug"].isin(drugs.index[bad])].reset_index(drop=True)
            drugs, fingerprints = drugs.drop(drugs.index[bad]), np.delete(fingerprints, bad, axis=0)
        if table.empty:
            raise UserInputError("no (cell line, drug) pair left: the cell_line names match none of the data's "
                                 "cells, or no ln_ic50 / SMILES is usable", a.drug_table)
        drug_index = pd.Series(np.arange(len(drugs)), index=drugs.index)
        cells = position[table["cell_line"].astype(str)].to_numpy(np.int64)
        drug_of_pair = drug_index[table["drug"]].to_numpy(np.int64)
        labels = table["ln_ic50"].to_numpy(np.float32)
        seed = a.seed if a.split_seed is None else a.split_seed
        splits = pair_splits(drug_of_pair, len(drugs), a.split, a.val_fraction, a.test_fraction, seed)
        run.state.update(cells=cells, drug_of_pair=drug_of_pair, pair_labels=labels, fingerprints=fingerprints,
                         splits=splits, drugs=list(drugs.index), n_cell_lines=int(len(np.unique(cells))))
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in splits.items())
        run.say(f"drug response: {len(labels):,} pairs of {run.state['n_cell_lines']} cell lines x {len(drugs)} "
                f"drugs ({a.split} split: {sizes})" + (f"; {dropped} table rows left out (cell line not in the "
                                                       f"data, or no ln_ic50)" if dropped else ""))
        if run.info.is_main:
            os.makedirs(run.settings.output_dir, exist_ok=True)
            tmp = os.path.join(run.settings.output_dir, "splits.tmp.npz")
            np.savez(tmp, cells=cells, drug_of_pair=drug_of_pair, ln_ic50=labels, drugs=np.array(drugs.index),
                     **splits)
            os.replace(tmp, os.path.join(run.settings.output_dir, "splits.npz"))

    def configure(self, config, run: RunContext) -> None:
        config.num_labels = 1
        config.id2label, config.label2id = {0: "ln_ic50"}, {"ln_ic50": 0}
        config.problem_type = "regression"
        config.condition_feature_size = int(run.state["fingerprints"].shape[1])

    def samples(self, run: RunContext, split: str):
        """One sample per (cell line, drug) pair: the cell line's store position, ln IC50, the drug's fingerprint."""
        s = run.state
        pairs = s["splits"][split]
        return s["cells"][pairs], s["pair_labels"][pairs], {
            "condition_features": s["fingerprints"][s["drug_of_pair"][pairs]]}

    def score(self, run: RunContext, split: str, dataset) -> dict[str, float]:
        samples, predictions = predict(run.engine, dataset, run.engine.device)
        return regression_metrics(dataset.sample_labels[samples], predictions[:, 0])

    def summary(self, run: RunContext) -> dict[str, Any]:
        s = run.state
        return {"task": self.name, "split": run.args.split, "n_pairs": int(len(s["pair_labels"])),
                "n_cell_lines": s["n_cell_lines"], "n_drugs": len(s["drugs"]),
                **{f"n_{k}": int(len(v)) for k, v in s["splits"].items()}}
