"""Command-line options of the training launchers (launchers/pretrain.py, launchers/finetune.py): one definition of
every option they share (data, schedule and batch, evaluation / checkpoints / logging, kernels, DeepSpeed), so that
pretraining and fine-tuning read them the same way; each launcher adds its own."""
from __future__ import annotations

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_data_args(g, fine_tuning: bool = False) -> None:
    """Data options shared by both launchers (in group `g`)."""
    if fine_tuning:
        g.add_argument("--data", default=None,
                       help="a store (data_prep/build_store.py on the model's vocabulary) or an .h5ad of counts "
                            "(mapped onto the model's vocabulary in the run directory; no GRN graphs then); "
                            "default: the demo store")
    else:
        g.add_argument("--data", default=None,
                       help="store directory (data_prep/build_store.py); default: the demo store")
    g.add_argument("--demo-cache-dir", default=None,
                   help="where the demo store is built (default $GRNFORMER_DS_CACHE or ~/.cache/grnformer_ds)")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import a module (name or .py path) that registers its own backbone; repeatable "
                        "(docs/backbones.md)")
    g.add_argument("--no-graph", action="store_true", help="train the plain backbone (no GRN structure encoder)")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="train only the GRN structure encoder, the fusion and the head"
                        + ("" if fine_tuning else " (with --init-from)"))
    g.add_argument("--new-params-lr", type=float, default=None,
                   help="peak LR of the new parameters (GRN parts the folder lacks"
                        + (", the task head" if fine_tuning else "") + "; default 10 x --lr)")
    g.add_argument("--max-seq-len", type=int, default=None, help="genes per cell (default: dataset default)")
    g.add_argument("--edge-perturbation", type=float, default=None, metavar="ALPHA",
                   help="fraction of each training cell's GRN edges perturbed with co-expression edges (default 0.2; "
                        "0 = off)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data-loading worker processes per rank (default: 0 on CPU, up to 4 per GPU)")


def add_schedule_args(p: argparse.ArgumentParser, fine_tuning: bool = False) -> None:
    g = p.add_argument_group("schedule and batch (one source of truth with the DeepSpeed JSON)")
    if fine_tuning:
        g.add_argument("--epochs", type=float, default=10, help="passes over the training split (10)")
        g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    else:
        g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 100 demo / 10000)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="token budget of a packed micro-batch per rank: whole cells back to back, no padding (the "
                        "default layout; default budget: 32 longest cells on GPU, 2 on CPU)")
    g.add_argument("--pad-to-max-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="pad every packed micro-batch to exactly --max-tokens (static shapes; default: with --compile)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="cells per rank per micro-batch: selects padded batches instead of packing (or set "
                        "train_micro_batch_size_per_gpu in the JSON)")
    g.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default: JSON or 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4)" if fine_tuning else
                   "peak learning rate (default: 3e-3 demo / 1e-4)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of max-steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (0.1)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01; none on 1-d params)")
    g.add_argument("--grad-clip", type=float, default=None, help="max global grad norm (default: JSON or 1.0)")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="mixed precision (default: the JSON's, else bf16)")
    g.add_argument("--seed", type=int, default=0,
                   help="data order, " + ("splits, " if fine_tuning else "masking, ") + "initial weights (0)")


def add_run_args(p: argparse.ArgumentParser, fine_tuning: bool = False) -> None:
    g = p.add_argument_group("evaluation, checkpoints, logging")
    root = "runs/finetune" if fine_tuning else "runs/demo or runs/pretrain"
    g.add_argument("--output-dir", default=None,
                   help=f"run directory (default: a new {root}/<date-time>, linked as <root>/latest; --resume alone "
                        f"continues that latest run)")
    if fine_tuning:
        g.add_argument("--eval-every", type=int, default=None,
                       help="evaluate the validation split every N steps (default: every epoch)")
        g.add_argument("--save-every", type=int, default=None,
                       help="checkpoint every N steps (default: every epoch; the best one is always kept)")
    else:
        g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 25 demo / 500)")
        g.add_argument("--eval-batches", type=int, default=4,
                       help="held-out micro-batches per evaluation and rank (4)")
        g.add_argument("--save-every", type=int, default=None,
                       help="checkpoint every N steps (default: 50 demo / 500)")
    g.add_argument("--keep-last", type=int, default=2, help="complete checkpoints to keep (2)")
    g.add_argument("--log-every", type=int, default=1, help="log metrics every N steps (1)")
    g.add_argument("--log-cells", action="store_true",
                   help="record which cells every micro-batch trained on: <output-dir>/cells/rank_XXXXX.jsonl, one "
                        "line {step, epoch, cells (store positions)} per micro-batch and rank (an audit of the data "
                        "order, e.g. across a resume)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint (a changed --max-steps/--lr/--warmup-steps/"
                        "--min-lr-ratio continues the LR smoothly from where it was, with a note); also on another "
                        "number of ranks (docs/cluster.md)")
    g.add_argument("--resume-universal", action="store_true",
                   help="with --resume: load the checkpoint through DeepSpeed's universal form even on the number of "
                        "ranks that wrote it (done by itself on another number of ranks)")
    g.add_argument("--overwrite-output-dir", action="store_true",
                   help="start over in an --output-dir that holds another run's checkpoints (deletes them)")
    g.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many NaN/Inf losses in a row (5)")
    g.add_argument("--on-save-error", choices=("stop", "continue"), default="stop",
                   help="a checkpoint that cannot be written (disk full, permissions): stop the run with exit 1, or "
                        "continue training and try again at the next save; either way the previous complete "
                        "checkpoint stays latest (stop)")
    g.add_argument("--no-export", action="store_true", help="skip the HF export at the end of the run")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--verbose", action="store_true",
                   help="print everything: DeepSpeed/MLflow/transformers logs, the demo GRN build's report")
    g.add_argument("--mlflow-tracking-uri", default=None,
                   help="MLflow tracking URI (default sqlite:///<runs root>/mlflow.db); 'none' disables MLflow")
    g.add_argument("--experiment-name", default="grnformer_ds", help="MLflow experiment (grnformer_ds)")
    g.add_argument("--run-name", default=None, help="MLflow run name")


def add_engine_args(p: argparse.ArgumentParser, fine_tuning: bool = False) -> None:
    g = p.add_argument_group("kernels")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (DeepSpeed's engine.compile; DeepCompile when the JSON enables it)")
    g.add_argument("--attn-implementation", default=None, choices=("eager", "sdpa", "varlen", "flash_attention_2"),
                   help="attention kernel (default: varlen on GPU for models without attention dropout, else "
                        "flash_attention_2 when installed, else sdpa)")

    g = p.add_argument_group("DeepSpeed")
    default = "zero2.json" if fine_tuning else "zero3.json"
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=os.path.join(REPO, "ds_configs", default), help=f"DeepSpeed JSON (ds_configs/{default})")
    g.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for HF-style commands
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    if not fine_tuning:
        g.add_argument("--zero-init", choices=("auto", "on", "off"), default="auto",
                       help="build the transformer inside deepspeed.zero.Init under ZeRO-3 (auto: for models that "
                            "do not fit one device comfortably)")


def pretrain_parser(description: str) -> argparse.ArgumentParser:
    from grnformer_ds.modeling import backbone_names

    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("data and model")
    add_data_args(g)
    g.add_argument("--model-preset", default=None,
                   help="debug | small | scgpt-base | base (default: debug for the demo store, small otherwise)")
    g.add_argument("--config", default=None,
                   help="GRNFormerConfig JSON; its fields override the preset's (vocab_size is taken from the store)")
    g.add_argument("--backbone", default=None, choices=backbone_names(),
                   help="override the preset's backbone (registered ones; --plugin adds yours)")
    g.add_argument("--init-from", default=None, metavar="HF_DIR",
                   help="start from a Hugging Face folder (import_checkpoint.py or export_hf.py); the store must use "
                        "its vocab.json; GRN parts it lacks are added with beta = 0")
    g.add_argument("--mask-ratio", type=float, default=None, help="fraction of genes masked (default: dataset's)")
    g.add_argument("--eval-fraction", type=float, default=None, help="held-out fraction of cells for evaluation")
    add_schedule_args(p)
    add_run_args(p)
    add_engine_args(p)
    return p


def finetune_parser(description: str, task_name: str | None) -> argparse.ArgumentParser:
    """The fine-tuning launcher's options; `task_name` (read from the command line first) adds that task's own."""
    from grnformer_ds.tasks import get_task, task_names

    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("task, model and data")
    g.add_argument("--task", required=True, choices=task_names(fine_tuning_only=True),
                   help="what to fine-tune for (docs/after_pretraining.md)")
    g.add_argument("--model", required=True, metavar="HF_DIR",
                   help="the pretrained folder (export_hf.py / a pretraining run's hf_model / import_checkpoint.py); "
                        "GRN parts it lacks are added with beta = 0 when the store has GRN assets")
    add_data_args(g, fine_tuning=True)
    g.add_argument("--layer", default=None, help=".h5ad --data: count layer (default X)")
    add_schedule_args(p, fine_tuning=True)
    add_run_args(p, fine_tuning=True)
    add_engine_args(p, fine_tuning=True)
    if task_name in task_names(fine_tuning_only=True):
        get_task(task_name).add_arguments(p)
    return p
