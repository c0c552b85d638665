"""The GRN ablation: the same pretraining budget on the same data per arm and seed, then the same fine-tuning budget,
one table.

Each arm is a registered `Arm` (what it changes, and the comparison it makes). Every arm with GRN parts puts the
fusion adapter **after** the last encoder layer (`fusion_position="after"`), so all arms, `no-grn` included, run the
same transformer layers and differ only in the GRN path (the paper's default, "replace", would give GRN arms one
layer fewer than the plain backbone). Each run is `launchers/pretrain.py` in its own process with the arm's config
and flags; the table reports the last held-out masked-value loss (mean ± sd over seeds) beside the two trivial
baselines on the same targets (`baselines`).

Downstream column: each run's exported model (`<run>/hf_model`) is fine-tuned for `cell-type` annotation by
`launchers/finetune.py` in its own process, on the store the arm pretrained on (the random-GRN arm on its shuffled
view), without GRN parts for arms pretrained without them (`--no-graph`: fine-tuning would otherwise add them), with
the same fixed budget and, within a seed, the same stratified train / val / test split (`--split-seed`) for every
arm; the table reports test accuracy and macro-F1 of the best checkpoint (by validation macro-F1), beside logistic
regression on PCA of the expression fitted on the same training cells and scored on the same test cells. A linear
probe of each run's frozen cell embeddings (`inference.probe`, store-order split) is reported beside it, with the same
probe on PCA.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

from grnformer_ds.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "launchers", "pretrain.py")
FINETUNE = os.path.join(REPO, "launchers", "finetune.py")
FINETUNE_TASK = "cell-type"


@dataclass(frozen=True)
class Arm:
    """name: what `--arms` calls it. compares: the comparison it makes. config: `GRNFormerConfig` overrides. args:
    extra `pretrain.py` flags. random_grn: train on a degree-preserving shuffle of the store's GRNs. finetune_args:
    extra `finetune.py` flags (`--no-graph` is added for every model without GRN parts)."""

    name: str
    compares: str
    config: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()
    random_grn: bool = False
    finetune_args: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("no-grn", "the plain backbone: the same layers, no structure encoder, no fusion", {"use_graph": False},
        ("--no-graph",)),
    Arm("random-grn", "both GRN scales, the targets of every TF shuffled (same TFs, same degrees)",
        random_grn=True),
    Arm("celltype", "the cell-type GRN only", {"graph_scales": ["celltype"]}),
    Arm("cell", "the cell-specific GRN only (active regulons)", {"graph_scales": ["cell"]}),
    Arm("hybrid", "both scales: cell-type + cell-specific GRNs (GRNFormer)"),
    Arm("no-perturbation", "both scales without co-expression edge perturbation", args=("--edge-perturbation", "0"),
        finetune_args=("--edge-perturbation", "0")),
    Arm("gnn-gcn", "both scales, GCN structure encoder (default GraphSAGE)", {"gnn_type": "gcn"}),
    Arm("gnn-gat", "both scales, GAT structure encoder", {"gnn_type": "gat"}),
    Arm("gnn-gin", "both scales, GIN structure encoder", {"gnn_type": "gin"}),
)}


def arm_config(arm: Arm) -> dict:
    """The arm's model-config overrides, with the fusion after the last layer whenever it has GRN parts."""
    cfg = dict(arm.config)
    if cfg.get("use_graph", True):
        cfg.setdefault("fusion_position", "after")
    return cfg


def _last_eval(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    if not evals:
        raise UserInputError("the run logged no held-out loss (is --eval-fraction 0?)", run_dir)
    return evals[-1]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _probe(run_dir: str, store: str, labels, split) -> dict:
    from grnformer_ds.inference import embed, load_model
    from grnformer_ds.inference.probe import linear_probe

    model = load_model(os.path.join(run_dir, "hf_model"))
    return linear_probe(embed(model, store).cells, labels, *split)


def _model_has_graph(hf_dir: str) -> bool:
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as fh:
        return bool(json.load(fh).get("use_graph", True))


def _finetune_result(ft_dir: str) -> dict:
    """test_metrics.json of a fine-tuning run, with the GRN setting of the model it fine-tuned and the store it read."""
    from grnformer_ds.tasks.cell_classification import METRICS_FILE

    with open(os.path.join(ft_dir, METRICS_FILE), encoding="utf-8") as fh:
        report = json.load(fh)
    with open(os.path.join(ft_dir, "checkpoints", "model_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    with open(os.path.join(ft_dir, "run_settings.resolved.json"), encoding="utf-8") as fh:
        settings = json.load(fh)
    return {"accuracy": report["test"]["accuracy"], "macro_f1": report["test"]["macro_f1"],
            "loss": report["test"]["loss"], "val": report["val"], "best_step": report["best_step"],
            "steps_trained": report.get("steps_trained"),
            **{k: report[k] for k in ("n_train", "n_val", "n_test") if k in report},
            "use_graph": bool(config.get("use_graph", True)),
            "graph_scales": config.get("graph_scales") if config.get("use_graph", True) else None,
            "data": settings.get("data"), "run_dir": os.path.abspath(ft_dir)}


def _pca_on_split(pca_x, ft_dir: str) -> dict:
    """Logistic regression on PCA of the expression, fitted on a fine-tuning run's training cells and scored on its
    test cells (its splits.npz)."""
    import numpy as np

    from grnformer_ds.inference.probe import linear_probe
    from grnformer_ds.tasks.cell_classification import SPLITS_FILE

    with np.load(os.path.join(ft_dir, SPLITS_FILE)) as z:
        return linear_probe(pca_x, z["codes"], z["train"], z["test"])


def _same_split(a: str, b: str) -> bool:
    import numpy as np

    from grnformer_ds.tasks.cell_classification import SPLITS_FILE

    with np.load(os.path.join(a, SPLITS_FILE)) as za, np.load(os.path.join(b, SPLITS_FILE)) as zb:
        return all(np.array_equal(za[k], zb[k]) for k in ("train", "val", "test"))


def _run(cmd: list[str], env: dict, log_path: str, what: str, run_dir: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log_path, "w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n" + p.stdout + p.stderr)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserInputError(f"{what} failed (rc {p.returncode}): {last}; full output in {log_path}", run_dir)


def run_ablation(store: str, arms: list[str], seeds: list[int], out_dir: str, *, preset: str = "debug",
                 max_steps: int = 100, extra_args: list[str] | None = None, launcher: str = "", probe: bool = True,
                 finetune: bool = True, finetune_epochs: int = 3, finetune_args: list[str] | None = None,
                 say: Callable[[str], None] = print) -> dict:
    """Train every arm x seed and write `ablation.json` + `ablation.md` to `out_dir`; returns the summary.

    `finetune`: fine-tune each run for cell-type annotation (`finetune_epochs` epochs, then `finetune_args` passed to
    `finetune.py`), split seed = the seed. `probe`: also the linear probe of the frozen embeddings. Both need cell
    types in the store (skipped, with a note, when it has none)."""
    from grnformer_ds.grn import has_grn_assets
    from grnformer_ds.grn.shuffle import random_grn_store

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserInputError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if not os.path.isdir(store):
        raise UserInputError("store directory not found", store)
    if any(a != "no-grn" for a in arms) and not has_grn_assets(store):
        raise UserInputError("the store has no GRN assets (data_prep/build_grn.py); only the no-grn arm can run",
                             store)
    if finetune and finetune_epochs < 1:
        raise UserInputError(f"--finetune-epochs must be >= 1, got {finetune_epochs}")
    os.makedirs(out_dir, exist_ok=True)
    labels = split = pca = pca_x = None
    if probe or finetune:
        from grnformer_ds.inference.probe import linear_probe, pca_features, probe_split, store_cell_types
        from grnformer_ds.store import open_store

        opened = open_store(store)
        labels = store_cell_types(opened)
        if (labels >= 0).sum() and len(set(labels[labels >= 0].tolist())) >= 2:
            pca_x = pca_features(opened)
            if probe:
                split = probe_split(len(labels))
                pca = linear_probe(pca_x, labels, *split)
                say(f"PCA baseline probe: accuracy {pca['accuracy']:.3f}, macro-F1 {pca['macro_f1']:.3f}")
        else:
            say("no cell types in the store: no fine-tuning, no linear probe")
            finetune = False
    head = shlex.split(launcher) if launcher else [sys.executable]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    results: dict[str, list[dict]] = {}
    ft_baseline: dict[int, dict] = {}
    first_ft: dict[int, str] = {}
    for name in arms:
        arm = ARMS[name]
        cfg_path = os.path.join(out_dir, f"{name}.config.json")
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        with open(cfg_path, "w", encoding="utf-8") as fh:
            json.dump(arm_config(arm), fh, indent=1)
        for seed in seeds:
            data = store
            if arm.random_grn:
                data = str(random_grn_store(store, os.path.join(out_dir, f"random_grn_store_seed{seed}"), seed))
            run_dir = os.path.join(out_dir, name, f"seed{seed}")
            export = split is not None or finetune
            cmd = [*head, PRETRAIN, "--data", data, "--model-preset", preset, "--config", cfg_path,
                   "--max-steps", str(max_steps), "--eval-every", str(max_steps), "--save-every", str(max_steps),
                   "--seed", str(seed), "--output-dir", run_dir, "--overwrite-output-dir", "--no-progress",
                   "--mlflow-tracking-uri", "none", *(() if export else ("--no-export",)), *arm.args,
                   *(extra_args or [])]
            say(f"{name}, seed {seed}: {arm.compares}")
            _run(cmd, env, os.path.join(out_dir, name, f"seed{seed}.pretrain.log"), f"arm {name} seed {seed}",
                 run_dir)
            row = {"seed": seed, **_last_eval(run_dir)}
            if split is not None:
                row["probe"] = _probe(run_dir, data, labels, split)
            if finetune:
                hf_dir = os.path.join(run_dir, "hf_model")
                ft_dir = os.path.join(out_dir, name, f"seed{seed}_{FINETUNE_TASK}")
                graph = _model_has_graph(hf_dir)
                cmd = [*head, FINETUNE, "--task", FINETUNE_TASK, "--model", hf_dir, "--data", data,
                       "--output-dir", ft_dir, "--overwrite-output-dir", "--epochs", str(finetune_epochs),
                       "--seed", str(seed), "--split-seed", str(seed), "--no-export", "--no-progress",
                       "--mlflow-tracking-uri", "none", *(() if graph else ("--no-graph",)), *arm.finetune_args,
                       *(finetune_args or [])]
                _run(cmd, env, os.path.join(out_dir, name, f"seed{seed}_{FINETUNE_TASK}.log"),
                     f"fine-tuning arm {name} seed {seed}", ft_dir)
                row["finetune"] = _finetune_result(ft_dir)
                if row["finetune"]["use_graph"] != graph:
                    change = "lost" if graph else "gained"
                    raise UserInputError(f"fine-tuning arm {name} seed {seed}: the model {change} its GRN parts",
                                         ft_dir)
                if seed not in first_ft:
                    first_ft[seed] = ft_dir
                    ft_baseline[seed] = _pca_on_split(pca_x, ft_dir)
                elif not _same_split(first_ft[seed], ft_dir):
                    raise UserInputError(f"fine-tuning arm {name} seed {seed} split the cells unlike "
                                         f"{first_ft[seed]} (same --split-seed)", ft_dir)
                say(f"  fine-tuned ({'with' if graph else 'without'} GRN parts): test accuracy "
                    f"{row['finetune']['accuracy']:.3f}, macro-F1 {row['finetune']['macro_f1']:.3f}")
            results.setdefault(name, []).append(row)
    summary = {"store": os.path.abspath(store), "preset": preset, "max_steps": max_steps, "seeds": seeds,
               "fusion_position": "after (every GRN arm: the same transformer layers as no-grn)",
               "finetune": {"task": FINETUNE_TASK, "epochs": finetune_epochs, "args": list(finetune_args or []),
                            "split": "finetune.py's stratified train / val / test split, --split-seed = the seed "
                                     "(the same test cells for every arm of a seed)",
                            "reported": "test accuracy and macro-F1 of the best checkpoint by validation macro-F1"}
               if finetune else None,
               "finetune_baseline_pca": {
                   "accuracy": _mean_sd([ft_baseline[s]["accuracy"] for s in seeds]),
                   "macro_f1": _mean_sd([ft_baseline[s]["macro_f1"] for s in seeds]),
                   "per_seed": {str(s): ft_baseline[s] for s in seeds}} if finetune else None,
               "probe_baseline_pca": pca, "arms": {}}
    for name, rows in results.items():
        loss = _mean_sd([r["eval_loss"] for r in rows])
        summary["arms"][name] = {
            "compares": ARMS[name].compares, "config": arm_config(ARMS[name]), "args": list(ARMS[name].args),
            "eval_loss_mean": loss[0], "eval_loss_sd": loss[1],
            "eval_mlm_loss_mean": _mean_sd([r.get("eval_mlm_loss", r["eval_loss"]) for r in rows])[0],
            "baseline_gene_mean": _mean_sd([r["eval_baseline_gene_mean"] for r in rows])[0]
            if all("eval_baseline_gene_mean" in r for r in rows) else None,
            "baseline_global_mean": _mean_sd([r["eval_baseline_global_mean"] for r in rows])[0]
            if all("eval_baseline_global_mean" in r for r in rows) else None,
            "finetune_accuracy": _mean_sd([r["finetune"]["accuracy"] for r in rows]) if finetune else None,
            "finetune_macro_f1": _mean_sd([r["finetune"]["macro_f1"] for r in rows]) if finetune else None,
            "probe_accuracy": _mean_sd([r["probe"]["accuracy"] for r in rows]) if split else None,
            "probe_macro_f1": _mean_sd([r["probe"]["macro_f1"] for r in rows]) if split else None,
            "runs": rows}
    with open(os.path.join(out_dir, "ablation.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(out_dir, "ablation.md"), "w", encoding="utf-8") as fh:
        fh.write(ablation_table(summary))
    return summary


def ablation_table(summary: dict) -> str:
    """Markdown: one row per arm: held-out masked-value loss beside the trivial baselines, the fine-tuned cell-type
    metrics (the downstream column) and the linear probe, mean ± sd over seeds; a PCA + logistic-regression row."""
    n = len(summary["seeds"])
    ft = summary.get("finetune")
    lines = [f"Held-out masked-value loss after {summary['max_steps']} steps (`{summary['preset']}` preset), mean ± "
             f"sd over {n} seed{'s' if n != 1 else ''}; every GRN arm has its fusion after the last layer (the same "
             f"transformer layers as no-grn).", "",
             "| arm | compares | held-out loss | gene-mean baseline | global-mean baseline | downstream: fine-tuned "
             "cell-type accuracy | downstream: fine-tuned cell-type macro-F1 | probe accuracy | probe macro-F1 |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "–" if x is None else f"{x:.1f}"

    def ms(x):
        return "–" if x is None else f"{x[0]:.3f} ± {x[1]:.3f}"

    for name, a in summary["arms"].items():
        lines.append(f"| {name} | {a['compares']} | {a['eval_loss_mean']:.1f} ± {a['eval_loss_sd']:.1f} | "
                     f"{fmt(a['baseline_gene_mean'])} | {fmt(a['baseline_global_mean'])} | "
                     f"{ms(a.get('finetune_accuracy'))} | {ms(a.get('finetune_macro_f1'))} | "
                     f"{ms(a.get('probe_accuracy'))} | {ms(a.get('probe_macro_f1'))} |")
    pca, ft_pca = summary.get("probe_baseline_pca"), summary.get("finetune_baseline_pca")
    if pca or ft_pca:
        lines.append(f"| PCA baseline | logistic regression on 50 principal components of log-normalised counts | – | "
                     f"– | – | {ms(ft_pca and ft_pca['accuracy'])} | {ms(ft_pca and ft_pca['macro_f1'])} | "
                     f"{'–' if not pca else format(pca['accuracy'], '.3f')} | "
                     f"{'–' if not pca else format(pca['macro_f1'], '.3f')} |")
    notes = []
    if ft:
        run = next(iter(summary["arms"].values()))["runs"][0]["finetune"]
        sizes = (f" ({run['n_train']} train, {run['n_val']} validation, {run['n_test']} test cells)"
                 if "n_test" in run else "")
        notes.append(f"Downstream: each run's model fine-tuned for {ft['task']} (`launchers/finetune.py`, "
                     f"{ft['epochs']} epoch{'s' if ft['epochs'] != 1 else ''}"
                     + (f", `{shlex.join(ft['args'])}`" if ft["args"] else "")
                     + f"; arms without GRN parts with `--no-graph`, the random-GRN arm on its shuffled store), on a "
                       f"stratified split{sizes} seeded by the seed, so every arm of a seed is scored on the same "
                       f"test cells: test accuracy and macro-F1 of the checkpoint with the best validation macro-F1. "
                       f"Its PCA baseline: the logistic regression fitted on the same training cells.")
    if pca:
        notes.append(f"Probe: logistic regression on each run's frozen cell embeddings, trained on "
                     f"{pca['train_cells']} cells, tested on the other {pca['test_cells']} (store order; the store "
                     f"is shuffled), cell types of the store.")
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"
