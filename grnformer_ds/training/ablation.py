"""The GRN ablation: the same pretraining budget on the same data per arm and seed, one table of held-out losses.

Each arm is a registered `Arm` (what it changes, and the comparison it makes). Every arm with GRN parts puts the
fusion adapter **after** the last encoder layer (`fusion_position="after"`), so all arms, `no-grn` included, run the
same transformer layers and differ only in the GRN path (the paper's default, "replace", would give GRN arms one
layer fewer than the plain backbone). Each run is `launchers/pretrain.py` in its own process with the arm's config
and flags; the table reports the last held-out masked-value loss (mean ± sd over seeds) beside the two trivial
baselines on the same targets (`baselines`).
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


def run_ablation(store: str, arms: list[str], seeds: list[int], out_dir: str, *, preset: str = "debug",
                 max_steps: int = 100, extra_args: list[str] | None = None, launcher: str = "",
                 say: Callable[[str], None] = print) -> dict:
    """Train every arm x seed and write `ablation.json` + `ablation.md` to `out_dir`; returns the summary."""
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
                   "--seed", str(seed), "--output-dir", run_dir, "--overwrite-output-dir", "--no-export",
                   "--no-progress", "--mlflow-tracking-uri", "none", *arm.args, *(extra_args or [])]
            say(f"{name}, seed {seed}: {arm.compares}")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise UserInputError(f"arm {name} seed {seed} failed (rc {p.returncode}): {last}", run_dir)
            results.setdefault(name, []).append({"seed": seed, **_last_eval(run_dir)})
    summary = {"store": os.path.abspath(store), "preset": preset, "max_steps": max_steps, "seeds": seeds,
               "fusion_position": "after (every GRN arm: the same transformer layers as no-grn)", "arms": {}}
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
             "| arm | compares | held-out loss | gene-mean baseline | global-mean baseline |", "|---|---|---|---|---|"]

    def fmt(x):
        return "–" if x is None else f"{x:.1f}"

    for name, a in summary["arms"].items():
        lines.append(f"| {name} | {a['compares']} | {a['eval_loss_mean']:.1f} ± {a['eval_loss_sd']:.1f} | "
                     f"{fmt(a['baseline_gene_mean'])} | {fmt(a['baseline_global_mean'])} |")
    return "\n".join(lines) + "\n"
