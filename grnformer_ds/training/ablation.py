"""The GRN ablation: the same pretraining budget on the same data per arm and seed, one table of held-out losses.

Each arm is a registered `Arm` (what it changes, and the comparison it makes). Every arm with GRN parts puts the
fusion adapter **after** the last encoder layer (`fusion_position="after"`), so all arms, `no-grn` included, run the
same transformer layers and differ only in the GRN path (the paper's default, "replace", would give GRN arms one
layer fewer than the plain backbone). Each run is `launchers/pretrain.py` in its own process with the arm's config
and flags; the table reports the last held-out masked-value loss (mean ± sd over seeds) beside the two trivial
baselines on the same targets (`baselines`), and, as the downstream column until fine-tuning exists, a linear probe
of the run's cell embeddings on the store's cell types (`inference.probe`: accuracy, macro-F1 on held-out cells)
beside the same probe on PCA of the expression.
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


@dataclass(frozen=True)
class Arm:
    """name: what `--arms` calls it. compares: the comparison it makes. config: `GRNFormerConfig` overrides. args:
    extra `pretrain.py` flags. random_grn: train on a degree-preserving shuffle of the store's GRNs."""

    name: str
    compares: str
    config: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()
    random_grn: bool = False


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("no-grn", "the plain backbone: the same layers, no structure encoder, no fusion", {"use_graph": False},
        ("--no-graph",)),
    Arm("random-grn", "both GRN scales, the targets of every TF shuffled (same TFs, same degrees)",
        random_grn=True),
    Arm("celltype", "the cell-type GRN only", {"graph_scales": ["celltype"]}),
    Arm("cell", "the cell-specific GRN only (active regulons)", {"graph_scales": ["cell"]}),
    Arm("hybrid", "both scales: cell-type + cell-specific GRNs (GRNFormer)"),
    Arm("no-perturbation", "both scales without co-expression edge perturbation", args=("--edge-perturbation", "0")),
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


def run_ablation(store: str, arms: list[str], seeds: list[int], out_dir: str, *, preset: str = "debug",
                 max_steps: int = 100, extra_args: list[str] | None = None, launcher: str = "", probe: bool = True,
                 say: Callable[[str], None] = print) -> dict:
    """Train every arm x seed and write `ablation.json` + `ablation.md` to `out_dir`; returns the summary. `probe`:
    also the linear probe on cell types (needs cell types in the store; skipped, with a note, when it has none)."""
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
    os.makedirs(out_dir, exist_ok=True)
    labels = split = pca = None
    if probe:
        from grnformer_ds.inference.probe import linear_probe, pca_features, probe_split, store_cell_types
        from grnformer_ds.store import open_store

        opened = open_store(store)
        labels = store_cell_types(opened)
        if (labels >= 0).sum() and len(set(labels[labels >= 0].tolist())) >= 2:
            split = probe_split(len(labels))
            pca = linear_probe(pca_features(opened), labels, *split)
            say(f"PCA baseline probe: accuracy {pca['accuracy']:.3f}, macro-F1 {pca['macro_f1']:.3f}")
        else:
            say("no cell types in the store: no linear probe")
    head = shlex.split(launcher) if launcher else [sys.executable]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    results: dict[str, list[dict]] = {}
    for name in arms:
        arm = ARMS[name]
        cfg_path = os.path.join(out_dir, f"{name}.config.json")
        with open(cfg_path, "w", encoding="utf-8") as fh:
            json.dump(arm_config(arm), fh, indent=1)
        for seed in seeds:
            data = store
            if arm.random_grn:
                data = str(random_grn_store(store, os.path.join(out_dir, f"random_grn_store_seed{seed}"), seed))
            run_dir = os.path.join(out_dir, name, f"seed{seed}")
            cmd = [*head, PRETRAIN, "--data", data, "--model-preset", preset, "--config", cfg_path,
                   "--max-steps", str(max_steps), "--eval-every", str(max_steps), "--save-every", str(max_steps),
                   "--seed", str(seed), "--output-dir", run_dir, "--overwrite-output-dir", "--no-progress",
                   "--mlflow-tracking-uri", "none", *(() if split else ("--no-export",)), *arm.args,
                   *(extra_args or [])]
            say(f"{name}, seed {seed}: {arm.compares}")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserInputError(f"arm {name} seed {seed} failed (rc {p.returncode}): {last}", run_dir)
            row = {"seed": seed, **_last_eval(run_dir)}
            if split is not None:
                row["probe"] = _probe(run_dir, data, labels, split)
            results.setdefault(name, []).append(row)
    summary = {"store": os.path.abspath(store), "preset": preset, "max_steps": max_steps, "seeds": seeds,
               "fusion_position": "after (every GRN arm: the same transformer layers as no-grn)",
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
            "probe_accuracy": _mean_sd([r["probe"]["accuracy"] for r in rows]) if split else None,
            "probe_macro_f1": _mean_sd([r["probe"]["macro_f1"] for r in rows]) if split else None,
            "runs": rows}
    with open(os.path.join(out_dir, "ablation.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(out_dir, "ablation.md"), "w", encoding="utf-8") as fh:
        fh.write(ablation_table(summary))
    return summary


def ablation_table(summary: dict) -> str:
    """Markdown: one row per arm, held-out masked-value loss mean ± sd over seeds beside the trivial baselines."""
    n = len(summary["seeds"])
    lines = [f"Held-out masked-value loss after {summary['max_steps']} steps (`{summary['preset']}` preset), mean ± "
             f"sd over {n} seed{'s' if n != 1 else ''}; every GRN arm has its fusion after the last layer (the same "
             f"transformer layers as no-grn).", "",
             "| arm | compares | held-out loss | gene-mean baseline | global-mean baseline | probe accuracy | "
             "probe macro-F1 |", "|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "–" if x is None else f"{x:.1f}"

    def ms(x):
        return "–" if x is None else f"{x[0]:.3f} ± {x[1]:.3f}"

    for name, a in summary["arms"].items():
        lines.append(f"| {name} | {a['compares']} | {a['eval_loss_mean']:.1f} ± {a['eval_loss_sd']:.1f} | "
                     f"{fmt(a['baseline_gene_mean'])} | {fmt(a['baseline_global_mean'])} | "
                     f"{ms(a.get('probe_accuracy'))} | {ms(a.get('probe_macro_f1'))} |")
    pca = summary.get("probe_baseline_pca")
    if pca:
        lines.append(f"| PCA baseline | logistic regression on 50 principal components of log-normalised counts | – | "
                     f"– | – | {pca['accuracy']:.3f} | {pca['macro_f1']:.3f} |")
        lines += ["", f"Probe: logistic regression on each run's frozen cell embeddings, trained on "
                      f"{pca['train_cells']} cells, tested on the other {pca['test_cells']} (store order; the store "
                      f"is shuffled), cell types of the store."]
    return "\n".join(lines) + "\n"
