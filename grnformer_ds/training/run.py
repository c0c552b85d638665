"""`run_task(args, task)`: store → streaming dataset → model → DeepSpeed engine → Trainer → HF export, for
pretraining (`run_pretraining`) and every fine-tuning task (`run_finetuning`; `grnformer_ds.tasks`).

The task supplies its model class, data, held-out evaluation and end-of-run report (`tasks.base.Task`); everything
else (distributed start-up, run directory, DeepSpeed config, engine, checkpoints and resume, MLflow, export) is the
same code for all of them. The launchers (launchers/pretrain.py, launchers/finetune.py) only parse arguments.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from argparse import Namespace

import torch
import torch.distributed as dist

from grnformer_ds.errors import UserInputError
from grnformer_ds.training import checkpoint as ckpt
from grnformer_ds.training import integration as I
from grnformer_ds.training.ds_config import load_ds_config, resolve_ds_config
from grnformer_ds.training.settings import BatchSettings, OptimSettings, RunSettings

# Demo-run defaults (no --data): a model and schedule that finish in a few minutes on two CPU cores. `runs_root`:
# where a run without --output-dir gets its own timestamped directory (run_dir.py).
DEMO = dict(preset="debug", max_steps=100, lr=3e-3, eval_every=25, save_every=50, runs_root="runs/demo")
FULL = dict(preset="small", max_steps=10000, lr=1e-4, eval_every=500, save_every=500, runs_root="runs/pretrain")
# Fine-tuning: --epochs sets the steps, evaluation (and a checkpoint) once per epoch unless given.
FINETUNE = dict(preset=None, max_steps=1, lr=1e-4, eval_every=1, save_every=1, runs_root="runs/finetune")


def settings_from_args(args: Namespace, fine_tuning: bool = False) -> RunSettings:
    """The run's settings; `output_dir` is --output-dir or, until `choose_run_dir` picks the run's own directory,
    the runs root. Fine-tuning's step counts are placeholders until `epoch_schedule` knows the epoch's length."""
    d = FINETUNE if fine_tuning else DEMO if args.data is None else FULL
    return RunSettings(
        output_dir=args.output_dir or d["runs_root"], data=args.data,
        max_steps=args.max_steps or d["max_steps"], eval_every=args.eval_every or d["eval_every"],
        eval_batches=getattr(args, "eval_batches", 4), save_every=args.save_every or d["save_every"],
        keep_last=args.keep_last,
        log_every=args.log_every, log_cells=bool(getattr(args, "log_cells", False)), seed=args.seed,
        precision=args.precision, max_nonfinite=args.max_nonfinite,
        resume=args.resume, resume_universal=bool(getattr(args, "resume_universal", False)),
        num_workers=args.num_workers, export=not args.no_export, progress=not args.no_progress,
        compile=bool(getattr(args, "compile", False)), attn_implementation=getattr(args, "attn_implementation", None),
        mlflow_tracking_uri=args.mlflow_tracking_uri, experiment_name=args.experiment_name, run_name=args.run_name,
        init_from=getattr(args, "init_from", None), freeze_backbone=bool(getattr(args, "freeze_backbone", False)),
        on_save_error=getattr(args, "on_save_error", "stop"),
        batch=BatchSettings(args.micro_batch_size, args.grad_accum, getattr(args, "max_tokens", None),
                            getattr(args, "pad_to_max_tokens", None)),
        optim=OptimSettings(lr=args.lr or d["lr"], weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                            min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip,
                            new_params_lr=getattr(args, "new_params_lr", None)))


MLFLOW_RUN_ID = "mlflow_run_id.txt"  # the run's MLflow run, written by the tracker as soon as MLflow gives it


def _saved_mlflow_run_id(settings: RunSettings) -> str | None:
    """On --resume, the MLflow run of the checkpoint we resume from (so metrics continue in one run); when the
    checkpoint predates the run (MLflow was unreachable then), the run the tracker created later."""
    if not settings.resume:
        return None
    root = os.path.join(settings.output_dir, "checkpoints")
    tag = ckpt.find_latest(root)
    if tag is None:
        return None
    with open(os.path.join(root, tag, ckpt.TRAINER_STATE), encoding="utf-8") as fh:
        run_id = json.load(fh).get("mlflow_run_id")
    path = os.path.join(settings.output_dir, MLFLOW_RUN_ID)
    if run_id is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            run_id = fh.read().strip() or None
    return run_id


def epoch_schedule(settings: RunSettings, args: Namespace, batches_per_epoch: int, grad_accum: int) -> RunSettings:
    """Fine-tuning: --max-steps, or --epochs x optimizer steps per epoch; evaluate and checkpoint every epoch
    unless --eval-every / --save-every say otherwise."""
    per_epoch = max(1, batches_per_epoch // grad_accum)
    max_steps = args.max_steps or max(1, int(round(args.epochs * per_epoch)))
    return dataclasses.replace(settings, max_steps=max_steps, eval_every=args.eval_every or per_epoch,
                               save_every=args.save_every or per_epoch)


def run_pretraining(args: Namespace) -> int:
    """launchers/pretrain.py: the masked-value pretraining task."""
    from grnformer_ds.tasks import get_task

    return run_task(args, get_task("pretrain"))


def run_finetuning(args: Namespace) -> int:
    """launchers/finetune.py: `args.task` from the pretrained folder `args.model`; `--fold all` runs every fold."""
    from grnformer_ds.tasks import get_task

    task = get_task(args.task)
    if str(getattr(args, "fold", "")) != "all":
        if getattr(args, "fold", None) is not None:
            args.fold = _fold_number(args.fold)
        return run_task(args, task)
    return run_all_folds(args, task)


def _fold_number(fold) -> int:
    try:
        return int(fold)
    except ValueError:
        raise UserInputError(f"--fold must be a fold number or 'all', got {fold!r}") from None


def run_all_folds(args: Namespace, task) -> int:
    """Every fold of a k-fold task in turn, each a complete run in `<output-dir>/fold<k>` (resumable: a fold with
    its test metrics is kept), then `cv_metrics.json`: each test metric's mean and sd over the folds."""
    import copy
    import statistics

    if not args.folds:
        raise UserInputError("--fold all needs --folds K")
    if not args.output_dir:
        raise UserInputError("--fold all needs --output-dir (the folds' runs go to <output-dir>/fold<k>)")
    reports = []
    for k in range(args.folds):
        fold_args = copy.copy(args)
        fold_args.fold, fold_args.output_dir = k, os.path.join(args.output_dir, f"fold{k}")
        fold_args.run_name = f"{args.run_name or task.name}-fold{k}"
        done = os.path.join(fold_args.output_dir, "test_metrics.json")
        if not (args.resume and os.path.isfile(done)):
            rc = run_task(fold_args, task)
            if rc:
                return rc
        with open(done, encoding="utf-8") as fh:
            reports.append(json.load(fh))
    metrics = sorted(reports[0]["test"])
    summary = {"task": task.name, "folds": args.folds, "test": {
        m: {"mean": statistics.fmean(r["test"][m] for r in reports),
            "sd": statistics.stdev(r["test"][m] for r in reports) if len(reports) > 1 else 0.0,
            "per_fold": [r["test"][m] for r in reports]} for m in metrics}}
    if dist.get_rank() == 0:
        ckpt.atomic_write_text(os.path.join(args.output_dir, "cv_metrics.json"), json.dumps(summary, indent=1))
        shown = ", ".join(f"{m} {v['mean']:.4f} ± {v['sd']:.4f}" for m, v in summary["test"].items() if m != "loss")
        print(f"{args.folds}-fold test: {shown}; wrote {os.path.join(args.output_dir, 'cv_metrics.json')}",
              flush=True)
    return 0


def _task_store(args: Namespace, settings: RunSettings, info, say, verbose: bool) -> tuple[str, str | None]:
    """(store path, the .h5ad it was mapped from or None). Fine-tuning takes an .h5ad too: mapped onto the model's
    vocabulary as a store in the run directory (kept for --resume)."""
    data = args.data
    if data is not None and os.path.isfile(data):
        if not data.endswith(".h5ad"):
            raise UserInputError("--data must be a store directory or an .h5ad file", data)
        if not getattr(args, "model", None):
            raise UserInputError("an .h5ad --data needs the model whose vocabulary it is mapped onto", data)
        from grnformer_ds.inference.output import h5ad_store

        path = os.path.join(settings.output_dir, "data_store")
        if not (settings.resume and os.path.isfile(os.path.join(path, "manifest.json"))):
            h5ad_store(data, path, os.path.join(args.model, "vocab.json"), getattr(args, "cell_type_key", None),
                       getattr(args, "layer", None), info.rank, info.world_size, say)
        return path, data
    return I.prepare_store(data, args.demo_cache_dir, info.is_main, say, verbose), None


def run_task(args: Namespace, task) -> int:
    from grnformer_ds.modeling import model_class
    from grnformer_ds.tasks import RunContext
    from grnformer_ds.training.console import muted, quiet_libraries

    verbose = bool(getattr(args, "verbose", False))
    quiet_libraries(verbose)
    t_start = time.time()
    if args.num_workers is None:
        # CPU runs share their cores with the model; on GPU the loader must keep up, so use worker processes.
        per_rank = (os.cpu_count() or 1) // max(1, torch.cuda.device_count())
        args.num_workers = min(4, max(0, per_rank - 1)) if torch.cuda.is_available() else 0
    fine_tuning = task.fine_tunes
    if fine_tuning:  # the model to fine-tune is a pretrained folder, as --init-from is for pretraining
        args.init_from, args.model_preset, args.config, args.backbone = args.model, None, None, None
    settings = settings_from_args(args, fine_tuning)
    raw_cfg = load_ds_config(args.deepspeed_config)  # a missing/invalid JSON fails before anything heavy

    from grnformer_ds.training import engine as E
    from grnformer_ds.training.guards import NonFiniteLossError
    from grnformer_ds.training.run_dir import choose_run_dir
    from grnformer_ds.training.schedule import LRSchedule, build_scheduler
    from grnformer_ds.training.threads import apply_thread_default
    from grnformer_ds.training.tracking import Tracker, default_tracking_uri
    from grnformer_ds.training.trainer import OutOfMemoryHint, Trainer

    info = E.init_distributed(args.local_rank)
    resolved = resolve_ds_config(raw_cfg, settings, info.world_size, path=args.deepspeed_config,
                                 has_gpu=info.has_gpu, bf16_supported=E.bf16_supported(info))
    E.validate_ds_config(resolved, args.deepspeed_config)
    say = (lambda *a: print(*a, flush=True)) if info.is_main else (lambda *a: None)
    run_dir = choose_run_dir(args.output_dir, settings.output_dir, settings.resume, info.is_main)
    settings = dataclasses.replace(settings, output_dir=run_dir.path)
    dist.barrier()  # every rank is past start-up: the cores busy now are other work's (threads.py)
    threads = apply_thread_default()
    say(f"grnformer_ds {task.name}: {info.world_size} rank(s) on {info.device.type}, ZeRO stage "
        f"{resolved.zero_stage}, {resolved.precision}" + ("" if fine_tuning else f", {settings.max_steps} steps"))
    say(f"run directory: {settings.output_dir}" + (f" ({run_dir.how})" if run_dir.how else ""))
    say(threads.describe())
    for note in resolved.notes:
        say(f"note: {note}")

    # ---- never mix two runs in one output dir (the checkpoints and metrics.jsonl would interleave)
    ckpt_root = os.path.join(settings.output_dir, "checkpoints")
    if not settings.resume and ckpt.find_latest(ckpt_root) is not None:
        if not getattr(args, "overwrite_output_dir", False):
            raise UserInputError("holds the checkpoints of an earlier run: pass --resume to continue it, "
                                 "--overwrite-output-dir to start over, or choose another --output-dir",
                                 settings.output_dir)
        dist.barrier()
        if info.is_main:
            import shutil

            shutil.rmtree(ckpt_root, ignore_errors=True)
            for name in ("metrics.jsonl", "ds_config.resolved.json", "test_metrics.json", MLFLOW_RUN_ID):
                if os.path.exists(os.path.join(settings.output_dir, name)):
                    os.remove(os.path.join(settings.output_dir, name))
            shutil.rmtree(os.path.join(settings.output_dir, "hf_model"), ignore_errors=True)
            say(f"--overwrite-output-dir: removed the earlier run's checkpoints and metrics in {settings.output_dir}")
        dist.barrier()

    if info.is_main and ckpt.find_latest(ckpt_root) is None:
        # a fresh start: drop metric lines of an earlier attempt killed before its first checkpoint
        metrics = os.path.join(settings.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)

    # ---- store (the demo store is built once, by rank 0, with GRN graphs)
    store_path, h5ad = _task_store(args, settings, info, say, verbose)
    dist.barrier()
    store = I.open_store(store_path)
    say(I.describe_store(store, store_path))
    run = RunContext(args=args, settings=settings, resolved=resolved, info=info, say=say, store_path=store_path,
                     store=store, state={"h5ad": h5ad})
    task.prepare(run)
    cls = model_class(task.model_class)

    # ---- model config (vocabulary must fit) and model
    init_weights = None
    if settings.init_from:
        from grnformer_ds.training.importing import init_from_config

        given = [f for f, v in (("--model-preset", args.model_preset), ("--config", args.config),
                                ("--backbone", args.backbone)) if v]
        if given or getattr(args, "zero_init", "auto") == "on":
            raise UserInputError(f"--init-from takes the model from {settings.init_from}: drop "
                                 f"{', '.join(given) or '--zero-init on'}")
        preset = f"from {settings.init_from}"
        config, init_weights = init_from_config(settings.init_from, store, use_graph=not args.no_graph, say=say)
    else:
        preset = args.model_preset or (DEMO["preset"] if settings.data is None else FULL["preset"])
        config = I.build_model_config(store, preset, args.config, backbone=args.backbone,
                                      use_graph=not args.no_graph)
    run.config = config
    task.configure(config, run)
    I.choose_kernels(config, settings, info, say)
    I.resolve_batch_layout(config, settings, resolved, info, args)
    b = settings.batch
    per_step = (f"packed micro-batches of <= {b.max_tokens} tokens{' (padded to it)' if b.pad_to_max_tokens else ''}"
                if resolved.packed else f"micro batch {resolved.micro_batch_size} cells (padded)")
    say(f"batch: {per_step} x accum {resolved.grad_accum} x {info.world_size} rank(s) per step; attention "
        f"{config._attn_implementation}{', torch.compile' if settings.compile else ''}")
    torch.manual_seed(settings.seed)  # identical initial weights on every rank (ZeRO partitions each rank's copy)
    zero_mode = getattr(args, "zero_init", "auto")
    zero_init = init_weights is None and (zero_mode == "on" or (zero_mode == "auto" and I.wants_zero_init(config)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved.precision, torch.float32)
    model = I.build_model(config, E.zero_init_context(resolved, enabled=zero_init), dtype=dtype, model_class=cls)
    new_params = None
    if init_weights is not None:
        from grnformer_ds.training.importing import freeze_backbone, load_init_weights

        new_params = load_init_weights(model, init_weights, say, task.head_prefixes,
                                       "--model" if fine_tuning else "--init-from")
        del init_weights
        if settings.freeze_backbone:
            say(f"frozen: {freeze_backbone(model) / 1e6:.2f}M backbone parameters (--freeze-backbone); training the "
                f"GRN structure encoder, the fusion and the head")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    say(f"model: {cls.__name__}, preset {preset}, backbone {config.backbone}, graphs {config.use_graph}, "
        f"{n_params / 1e6:.2f}M parameters{' (zero.Init)' if zero_init and resolved.zero_stage == 3 else ''}")

    # ---- data
    train_batches, eval_batches = task.datasets(run)
    if fine_tuning:
        settings = run.settings = epoch_schedule(settings, args, len(train_batches), resolved.grad_accum)
        say(f"schedule: {settings.max_steps} steps ({len(train_batches)} micro-batches per epoch and rank), "
            f"evaluation every {settings.eval_every}")

    # ---- engine
    o = settings.optim
    schedule = LRSchedule.warmup_cosine(o.lr, o.resolved_warmup(settings.max_steps), settings.max_steps,
                                        o.min_lr_ratio)
    new_lr = None
    if new_params:
        new_lr = o.new_params_lr or 10 * o.lr
        say(f"learning rate: {o.lr:g} for the pretrained parameters, {new_lr:g} for the {len(new_params)} new ones "
            f"(--new-params-lr{'' if o.new_params_lr else '; default 10 x --lr'})")
    engine = E.build_engine(model, resolved, o.lr, o.weight_decay, o.betas, o.eps,
                            lambda opt: build_scheduler(opt, schedule), has_gpu=info.has_gpu,
                            new_params=set(new_params or ()), new_lr=new_lr)
    run.engine = engine
    prepare_batch = None
    if settings.compile:
        from grnformer_ds.training.compile import compile_engine

        prepare_batch = compile_engine(engine)
    torch.manual_seed(settings.seed + 1000 * info.rank)  # dropout differs across ranks, reproducibly

    # ---- tracking (rank 0)
    # automatic run directories share one tracking database per runs root (every demo run in one `mlflow ui`)
    uri = settings.mlflow_tracking_uri or default_tracking_uri(run_dir.root or settings.output_dir)
    if info.is_main:
        os.makedirs(settings.output_dir, exist_ok=True)
    tracker = Tracker(info.is_main and uri.lower() != "none", uri, settings.experiment_name, settings.run_name,
                      run_id=_saved_mlflow_run_id(settings),
                      run_id_path=os.path.join(settings.output_dir, MLFLOW_RUN_ID))
    if info.is_main:
        from grnformer_ds.training.export import write_run_assets

        write_run_assets(ckpt_root, config, I.store_vocab(store), cls)
        resolved_path = os.path.join(settings.output_dir, "ds_config.resolved.json")
        ckpt.atomic_write_text(resolved_path, json.dumps(resolved.ds_config, indent=1))
        run_path = os.path.join(settings.output_dir, "run_settings.resolved.json")
        ckpt.atomic_write_text(run_path, json.dumps({**settings.to_flat_dict(), "packed": resolved.packed,
                                                     "attn_implementation": config._attn_implementation,
                                                     "task": {"name": task.name, **task.summary(run)},
                                                     "mlflow_tracking_uri_resolved": uri,
                                                     "tokenization": I.tokenization_summary(train_batches.dataset),
                                                     "plugins": list(getattr(args, "plugin", None) or [])},
                                                    indent=1))
        tracker.log_params({k: v for k, v in settings.to_flat_dict().items()
                           if k not in ("resume", "resume_universal")}, prefix="run.")
        tracker.log_params(config.to_diff_dict(), prefix="model.")
        tracker.log_params({"preset": preset, "n_params": n_params, "world_size": info.world_size,
                            "device": info.device.type}, prefix="run.")
        tracker.log_params(resolved.ds_config, prefix="ds.")
        tracker.log_params(I.store_summary(store, store_path), prefix="store.")
        tracker.log_params({"name": task.name, **task.summary(run)}, prefix="task.")
        tracker.log_artifact(resolved_path, "configs")
        tracker.log_artifact(run_path, "configs")
        tracker.log_artifact(os.path.join(ckpt_root, "model_config.json"), "configs")
        tracker.log_artifact(os.path.join(ckpt_root, "vocab.json"), "configs")
        if tracker.run_id:
            say(f"MLflow run {tracker.run_id} at {uri}")

    from grnformer_ds.training.throughput import flops_profile

    # the task's evaluation (pretraining: trivial baselines beside every held-out loss, training/baselines.py)
    extras = task.trainer_extras(run, eval_batches)
    from grnformer_ds.training.preemption import PreemptionHandler

    preemption = PreemptionHandler().install()  # SIGTERM / SIGUSR1: checkpoint at the next step, exit 0
    trainer = Trainer(engine, settings, resolved, train_batches, eval_batches, tracker, info.is_main,
                      flops_info=flops_profile(model), prepare_batch=prepare_batch, schedule=schedule, say=say,
                      preemption=preemption, **extras)
    status = "FAILED"
    try:
        trainer.maybe_resume()
        if settings.resume and info.is_main:  # steps a previous process could not send (tracking.py)
            tracker.fill_gaps(os.path.join(settings.output_dir, "metrics.jsonl"))
        last = trainer.train()
        if trainer.preempted:
            status = "KILLED"
            waited = time.time() - (preemption.received_at or time.time())
            say(f"preempted at step {trainer.state.step} ({preemption.signal_name or 'a signal on another rank'}): "
                f"checkpoint {os.path.join(ckpt_root, ckpt.tag_for_step(trainer.state.step))} written "
                f"{waited:.0f} s after the signal; continue with --resume")
            tracker.end("KILLED")
            return 0
        task.finish(run, trainer, tracker)
        status = "FINISHED"
    except (NonFiniteLossError, OutOfMemoryHint) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ckpt.CheckpointSaveError as exc:  # every rank has it; one line is enough
        if info.is_main:
            print(f"error: {exc} (--on-save-error continue would train on)", file=sys.stderr, flush=True)
        return 1
    finally:
        preemption.uninstall()
        if status not in ("FINISHED", "KILLED"):
            tracker.end("FAILED")
    fmt = ".4g" if fine_tuning else ".1f"
    say(f"done: step {trainer.state.step}, loss {last.get('loss', float('nan')):{fmt}}"
        + (f", held-out loss {last['eval_loss']:{fmt}}" if "eval_loss" in last else "")
        + f", {time.time() - t_start:.0f} s")

    # ---- export (rank 0 consolidates the checkpoint just written; other ranks wait)
    if settings.export and info.is_main:
        from grnformer_ds.training.export import export_checkpoint

        with muted(verbose):  # DeepSpeed's consolidation prints its progress
            hf_dir = export_checkpoint(ckpt_root, os.path.join(settings.output_dir, "hf_model"),
                                       tag=run.state.get("export_tag"))
        tracker.log_artifact(hf_dir, "hf_model")
        say(f"exported Hugging Face model to {hf_dir}")
    dist.barrier()
    tracker.end("FINISHED")
    return 0
