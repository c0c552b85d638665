"""The training loop: accumulation, guards, logging, evaluation, checkpoints and resume.

It knows nothing about DeepSpeed's construction (engine.py), the store or the model class: it drives a DeepSpeed
engine over a resumable batch source. Each optimizer step consumes `grad_accum` micro-batches with a finite loss
(a non-finite one is skipped and replaced by the next micro-batch, identically on every rank).

Loss normalisation (torchtitan's rule, transformers' `num_items_in_batch`): when the model's forward takes
`num_items_in_batch`, a step first fetches its `grad_accum` micro-batches, counts their masked positions (labels !=
-100) and sums the count over ranks (one small all-reduce); each micro-batch's loss is then its summed squared error
divided by that count / world size, and `engine.backward(..., scale_wrt_gas=False)` leaves it unscaled. DeepSpeed
averages gradients over ranks, so the step's gradient is that of (all squared errors of the step) / (all masked
positions of the step): accumulating micro-batches, or spreading them over ranks, gives the step one big batch
would. (A mean of per-micro-batch means would weigh a position of a small micro-batch more.) A micro-batch that
replaces a skipped non-finite one is divided by the same count.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist

from grnformer_ds.errors import UserInputError
from grnformer_ds.training import checkpoint as ckpt
from grnformer_ds.training.ds_config import ResolvedConfig
from grnformer_ds.training.guards import NonFiniteGuard, is_oom, oom_hint
from grnformer_ds.training.schedule import LRSchedule
from grnformer_ds.training.settings import RunSettings
from grnformer_ds.training.throughput import BatchCounts, batch_counts, masked_positions, peak_flops, train_flops
from grnformer_ds.training.tracking import Tracker


class OutOfMemoryHint(RuntimeError):
    """A step ran out of memory; the message says what to change."""


class ResumableBatches(Protocol):
    """A re-iterable source of collated micro-batches (dicts of tensors) whose position can be saved/restored.

    `state_dict()` taken between two `next()` calls must make a fresh source (after `load_state_dict`) yield
    exactly the batches the old one would have yielded next. Iterating again after exhaustion starts a new epoch.
    """

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Counters saved in every checkpoint (trainer_state.json)."""

    step: int = 0
    micro_batches: int = 0
    cells_seen: int = 0
    nonpad_tokens_seen: int = 0
    mlflow_run_id: str | None = None
    guard: dict = field(default_factory=dict)
    schedule: list = field(default_factory=list)  # LRSchedule.state_dict(): the LR curve's segments
    early_stopping: dict = field(default_factory=dict)  # EarlyStopping.state_dict() (fine-tuning)


def _reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def forward_keys(module: torch.nn.Module) -> set[str] | None:
    """Argument names of `module.forward`, None when it takes **kwargs (then every batch key is passed)."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _reported(out: Any) -> dict[str, torch.Tensor]:
    """What a model output reports beside its loss, for metrics.jsonl / MLflow: each named loss term
    (``loss_terms``, logged as ``loss_<name>`` when there are several) and the backbone's scalar diagnostics
    (``codebook_perplexity``)."""
    found: dict[str, torch.Tensor] = {}
    terms = getattr(out, "loss_terms", None)
    if isinstance(terms, dict) and len(terms) > 1:
        found.update({f"loss_{k}": v.detach().float() for k, v in terms.items()})
    perplexity = getattr(out, "codebook_perplexity", None)
    if isinstance(perplexity, torch.Tensor):
        found["codebook_perplexity"] = perplexity.detach().float()
    return found


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise RuntimeError("the model returned no loss: the batch needs a `labels` key")
    return loss


class Trainer:
    """Drives `engine` for `settings.max_steps` optimizer steps. Rank 0 logs (MLflow, metrics.jsonl, tqdm)."""

    def __init__(self, engine, settings: RunSettings, resolved: ResolvedConfig, train_batches: ResumableBatches,
                 eval_batches: Iterable[dict[str, torch.Tensor]] | None, tracker: Tracker, is_main: bool,
                 flops_info: dict[str, int] | None = None,
                 on_save: Callable[[str], None] | None = None,
                 prepare_batch: Callable[[dict], dict] | None = None,
                 schedule: LRSchedule | None = None,
                 say: Callable[[str], None] | None = None,
                 baselines=None,
                 evaluator: Callable[[], dict[str, float]] | None = None,
                 early_stopping=None,
                 desc: str = "pretrain",
                 preemption=None):
        """evaluator: a task's held-out evaluation (returns the same metrics dict on every rank, "loss" among them)
        in place of the masked-value loss over `eval_batches`. early_stopping: `early_stopping.EarlyStopping` on one
        of its metrics: every improving evaluation is checkpointed (and kept), the run stops after its patience.
        preemption: `preemption.PreemptionHandler`: after a signal every rank saves at the end of the current step
        and `train` returns with `preempted` set."""
        self.engine = engine
        self.preemption = preemption
        self.preempted = False
        self.save_failures = 0  # saves that failed with --on-save-error continue
        self.evaluator = evaluator
        self.early_stopping = early_stopping
        self.desc = desc
        self.baselines = baselines  # `baselines.TrivialBaselines`, scored beside every held-out loss
        self.eval_extra: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.s = settings
        self.resolved = resolved
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.tracker = tracker
        self.is_main = is_main
        self.device = engine.device
        self.state = TrainState(mlflow_run_id=tracker.run_id)
        self.guard = NonFiniteGuard(settings.max_nonfinite)
        self.ckpt_root = os.path.join(settings.output_dir, "checkpoints")
        self.metrics_path = os.path.join(settings.output_dir, "metrics.jsonl")
        if is_main:
            os.makedirs(settings.output_dir, exist_ok=True)
        self.keys = forward_keys(engine.module)
        # models whose forward names transformers' `num_items_in_batch` get the step-global loss normalisation
        self.global_normalization = "num_items_in_batch" in inspect.signature(engine.module.forward).parameters
        self.prepare_batch = prepare_batch  # e.g. marking dynamic dims for torch.compile (compile.py)
        self.flops_info = flops_info or {}
        spec = getattr(getattr(engine.module, "config", None), "backbone_spec", None)
        self.encoder_lengths = None if spec is None else (lambda n: spec.encoder_lengths(engine.module.config, n))
        self.peak = peak_flops(self.device)
        self.on_save = on_save
        self.schedule = schedule  # the LR curve `engine.lr_scheduler` reads; a resume may extend it
        self.say = say or ((lambda line: print(line, flush=True)) if is_main else (lambda line: None))
        self._it: Iterator | None = None
        self._cells_fh = None  # --log-cells
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.last_saved_step = -1

    # ---------------------------------------------------------------- data
    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.train_batches)
        try:
            batch = next(self._it)
        except StopIteration:  # end of this rank's partition: next epoch
            self._it = iter(self.train_batches)
            try:
                batch = next(self._it)
            except StopIteration:
                raise UserInputError("the training split yields no batches (too few cells for the micro batch "
                                     "on this many ranks?)") from None
        if self.s.log_cells and "cell_index" in batch:
            self._log_cells(batch)
        return batch

    def _cells_path(self, rank: int) -> str:
        return os.path.join(self.s.output_dir, "cells", f"rank_{rank:05d}.jsonl")

    def _log_cells(self, batch: dict[str, Any]) -> None:
        """One line of --log-cells: the step this micro-batch belongs to, its epoch (the loader's position has just
        moved past it) and its cells."""
        if self._cells_fh is None:
            path = self._cells_path(self.rank)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._cells_fh = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the whole run)
        epoch = self.train_batches.state_dict()["epoch"]
        self._cells_fh.write(json.dumps({"step": self.state.step + 1, "epoch": epoch,
                                         "cells": batch["cell_index"].tolist()}) + "\n")
        self._cells_fh.flush()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if self.keys is not None and k not in self.keys:
                continue
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
            out[k] = v
        return self.prepare_batch(out) if self.prepare_batch is not None else out

    def _items_per_rank(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The step's masked positions over every rank, divided by the world size (the `num_items_in_batch` each
        rank passes; module docstring), as a 0-d float32 tensor on the device (a tensor: a changing Python float
        would recompile a compiled model)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        total = _reduce_sum([float(sum(masked_positions(b) for b in batches))], self.device)[0]
        return torch.tensor(max(total, 1.0) / world, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- resume
    def maybe_resume(self) -> None:
        if not self.s.resume:
            return
        tag = ckpt.find_latest(self.ckpt_root)
        if tag is None:
            self.say(f"--resume: no complete checkpoint under {self.ckpt_root}; starting from step 0")
            return
        with open(os.path.join(self.ckpt_root, tag, ckpt.TRAINER_STATE), encoding="utf-8") as fh:
            saved = json.load(fh)
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved_world = int(saved.get("world_size", world))
        elastic = saved_world != world
        micro = {"micro_batch_size": self.resolved.micro_batch_size, "max_tokens": self.s.batch.max_tokens}
        rebatched = {k: (saved[k], now) for k, now in micro.items() if saved.get(k, now) != now}
        # an exact replay needs the same ranks, micro-batch and accumulation; with another number of ranks or another
        # micro-batch the rest of the epoch is re-planned (data.elastic) and the accumulation may change with them
        if not (elastic or rebatched) and saved.get("grad_accum", self.resolved.grad_accum) != self.resolved.grad_accum:
            raise UserInputError(f"checkpoint used grad_accum={saved['grad_accum']} but this run has "
                                 f"{self.resolved.grad_accum}: an exact resume needs the same accumulation (change "
                                 f"it together with the number of ranks or the micro-batch)",
                                 os.path.join(self.ckpt_root, tag))
        if elastic:
            self.say(f"note: {os.path.join(self.ckpt_root, tag)} was written by {saved_world} rank(s), this run has "
                     f"{world}: weights and optimizer state come from DeepSpeed's universal checkpoint, and the rest "
                     f"of the interrupted epoch is shared out over {world} rank(s) (docs/cluster.md)")
        if rebatched:
            change = ", ".join(f"{k} {old} -> {now}" for k, (old, now) in rebatched.items())
            self.say(f"note: {os.path.join(self.ckpt_root, tag)} used another micro-batch ({change}): the rest of the "
                     f"interrupted epoch is re-batched (docs/cluster.md)")
        if elastic or rebatched:  # what an optimizer step holds, in cells (padded) or token budget (packed)
            old_mt = saved.get("max_tokens", micro["max_tokens"])
            old_mb = saved.get("micro_batch_size", micro["micro_batch_size"])
            unit = "token budget" if micro["max_tokens"] else "cells"
            per_micro = micro["max_tokens"] or micro["micro_batch_size"]
            before = saved_world * int(saved.get("grad_accum", self.resolved.grad_accum)) * (old_mt or old_mb)
            now = world * self.resolved.grad_accum * per_micro
            if before != now and bool(old_mt) == bool(micro["max_tokens"]):
                keep = before / (world * per_micro)
                self.say(f"note: {unit} per optimizer step: {before} -> {now}"
                         + (f" (--grad-accum {keep:.0f} keeps {before})" if keep == int(keep) else ""))
        trainer_state, rank_state = ckpt.load_checkpoint(self.engine, self.ckpt_root, tag,
                                                         universal=elastic or self.s.resume_universal,
                                                         same_ranks=not elastic)
        self.state = TrainState(**{k: trainer_state[k] for k in TrainState.__dataclass_fields__ if k in trainer_state})
        self.guard.load_state_dict(self.state.guard)
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(self.state.early_stopping)
        try:  # the data position refuses another seed, split or token counts: name the checkpoint it came from
            self.train_batches.load_state_dict(rank_state["data"])
        except UserInputError as exc:
            raise UserInputError(str(exc), os.path.join(self.ckpt_root, tag)) from None
        self._it = None
        if elastic:  # the old ranks' RNG streams do not map onto the new ranks: fresh ones, one per (step, rank)
            ckpt.seed_rng(self.s.seed, self.state.step, self.rank)
        else:
            ckpt.set_rng_state(rank_state["rng"])
        self.last_saved_step = self.state.step
        if self.is_main:
            self._truncate_jsonl(self.metrics_path, self.state.step)
        if self.s.log_cells:  # this rank's record, and (rank 0) those of ranks the checkpoint had beyond this run's
            for r in [self.rank] + (list(range(world, saved_world)) if self.is_main else []):
                self._truncate_jsonl(self._cells_path(r), self.state.step)
        self.say(f"resumed from {os.path.join(self.ckpt_root, tag)} at step {self.state.step}")
        self._continue_schedule(trainer_state.get("schedule"))

    def _continue_schedule(self, saved: list | None) -> None:
        """Continue the checkpoint's LR curve under this run's schedule settings (schedule.py): one line when they
        changed. A checkpoint without segments (older runs) is taken to have had this run's settings."""
        if self.schedule is None or not saved:
            return
        old = LRSchedule.from_state(saved)
        note = self.schedule.continue_from(old, self.state.step)
        if note:
            self.say(f"note: {note}")
        sched = self.engine.lr_scheduler
        if sched is not None:
            # factors are relative to this run's peak LR (the checkpoint restored the old one); a parameter group
            # with its own peak (--new-params-lr) keeps its ratio to the run's
            ratios = [base / old.peak_lr for base in sched.base_lrs]
            sched.base_lrs = [r * self.schedule.peak_lr for r in ratios]
            for r, group in zip(ratios, sched.optimizer.param_groups):
                group["lr"] = r * self.schedule.lr_at(self.state.step)

    @staticmethod
    def _truncate_jsonl(path: str, step: int) -> None:
        """Drop the lines (metrics, --log-cells) a killed run wrote after the checkpoint we resume from (they will be
        redone); a line cut short by the kill goes too."""
        if not os.path.isfile(path):
            return
        keep = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except ValueError:
                    continue
        ckpt.atomic_write_text(path, "".join(keep))

    # ---------------------------------------------------------------- checkpoint
    def save(self) -> str | None:
        self.state.guard = self.guard.state_dict()
        if self.schedule is not None:
            self.state.schedule = self.schedule.state_dict()
        self.state.mlflow_run_id = self.tracker.run_id if self.is_main else self.state.mlflow_run_id
        protect: tuple[str, ...] = ()
        if self.early_stopping is not None:
            self.state.early_stopping = self.early_stopping.state_dict()
            if self.early_stopping.best_step is not None:
                protect = (ckpt.tag_for_step(self.early_stopping.best_step),)
        trainer_state = {**self.state.__dict__, "world_size": self.resolved.world_size,
                         "micro_batch_size": self.resolved.micro_batch_size, "grad_accum": self.resolved.grad_accum,
                         "max_tokens": self.s.batch.max_tokens,
                         "zero_stage": self.resolved.zero_stage, "precision": self.resolved.precision}
        try:
            tag = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.state.step, trainer_state,
                                       {"data": self.train_batches.state_dict()}, keep_last=self.s.keep_last,
                                       protect=protect)
        except ckpt.CheckpointSaveError as exc:
            if self.s.on_save_error != "continue":
                raise
            self.save_failures += 1
            self.say(f"warning: {exc}; training continues (--on-save-error continue), the next save tries again")
            return None
        if tag is None:
            if self.is_main:
                print(f"warning: weights are not finite at step {self.state.step}; checkpoint NOT written",
                      flush=True)
            return None
        self.last_saved_step = self.state.step
        if self.on_save is not None:
            self.on_save(tag)
        return tag

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Masked-value loss over `eval_batches` held-out batches (the same batches at every evaluation; the source
        restarts when shorter, so every rank runs the same number of forwards — ZeRO-3 needs that): all squared
        errors over all masked positions of every rank (a mean of batch means without `num_items_in_batch`)."""
        if self.evaluator is not None:
            self.engine.eval()
            metrics = self.evaluator()
            self.engine.train()
            self.eval_extra = {f"eval_{k}": float(v) for k, v in metrics.items() if k != "loss"}
            self.eval_metrics = dict(metrics)
            return float(metrics.get("loss", float("nan")))
        if self.eval_batches is None or self.s.eval_batches == 0:
            return None
        self.engine.eval()
        total, n = 0.0, 0.0
        mlm = sse_global = sse_gene = targets = 0.0  # masked-value SSE and the trivial baselines' on the same targets
        it = iter(self.eval_batches)
        one = torch.ones((), dtype=torch.float32, device=self.device)
        for _ in range(self.s.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(self.eval_batches)
                batch = next(it)
            dev = self._to_device(batch)
            if self.global_normalization:
                dev["num_items_in_batch"] = one  # the loss is then the summed squared error
            out = self.engine(**dev)
            loss = _loss_of(out).float()
            if torch.isfinite(loss):
                count = masked_positions(batch) if self.global_normalization else 1
                total, n = total + loss.item(), n + count
                if self.baselines is not None:
                    g, p, k = self.baselines.score(batch)
                    sse_global, sse_gene, targets = sse_global + g, sse_gene + p, targets + k
                    term = getattr(out, "mlm_loss", None)
                    term = loss if term is None else term.float()
                    mlm += term.item() * (1 if self.global_normalization else k)
        self.engine.train()
        total, n, mlm, sse_global, sse_gene, targets = _reduce_sum([total, n, mlm, sse_global, sse_gene, targets],
                                                                   self.device)
        self.eval_extra = {}
        if self.baselines is not None and targets:
            self.eval_extra = {"eval_mlm_loss": mlm / targets, "eval_baseline_gene_mean": sse_gene / targets,
                               "eval_baseline_global_mean": sse_global / targets}
        return total / n if n else float("nan")

    def _baseline_note(self, eval_loss: float) -> str:
        """The held-out masked-value MSE beside the trivial baselines' (`baselines`: predicting each gene's training
        mean, predicting the global training mean) on the same targets, for the evaluation line."""
        e = self.eval_extra
        if self.evaluator is not None:
            return "".join(f", {k[5:]} {v:.4g}" for k, v in e.items())
        if not e:
            return ""
        mse = e["eval_mlm_loss"]
        head = "" if abs(mse - eval_loss) <= 1e-6 * max(1.0, abs(eval_loss)) else f", masked-value MSE {mse:.1f}"
        return (f"{head}, gene-mean baseline {e['eval_baseline_gene_mean']:.1f}, global-mean baseline "
                f"{e['eval_baseline_global_mean']:.1f}")

    # ---------------------------------------------------------------- training
    def _train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum finite micro-batches). Returns this rank's sums for logging."""
        t0 = time.perf_counter()
        done, loss_sum, skipped = 0, 0.0, 0
        cells = tokens = nonpad = pairs = dec_tokens = enc_tokens = 0
        digest = hashlib.sha1()
        reported: dict[str, torch.Tensor] = {}
        td = time.perf_counter()
        pending = [self._next_batch() for _ in range(self.resolved.grad_accum)]
        items = self._items_per_rank(pending) if self.global_normalization else None
        t_data = time.perf_counter() - td
        while done < self.resolved.grad_accum:
            td = time.perf_counter()
            batch = pending.pop(0) if pending else self._next_batch()  # a replacement after a skipped one
            if "cell_index" in batch:
                digest.update(batch["cell_index"].cpu().numpy().tobytes())
            dev_batch = self._to_device(batch)
            if items is not None:
                dev_batch["num_items_in_batch"] = items
            t_data += time.perf_counter() - td
            out = self.engine(**dev_batch)
            loss = _loss_of(out)
            self.state.micro_batches += 1
            if not self.guard.is_finite(loss):
                skipped += 1
                continue
            self.engine.backward(loss, scale_wrt_gas=items is None)
            self.engine.step()
            done += 1
            for k, v in _reported(out).items():
                reported[k] = reported.get(k, 0.0) + v
            loss_sum += loss.detach().float().item()
            c = batch_counts(batch, self.encoder_lengths)
            cells, tokens, nonpad = cells + c.cells, tokens + c.tokens, nonpad + c.nonpad
            pairs, dec_tokens = pairs + c.attention_pairs, dec_tokens + c.decoder_tokens
            enc_tokens += c.encoder_tokens
        self.state.step += 1
        return {"loss_sum": loss_sum, "n": done, "cells": cells, "tokens": tokens, "nonpad": nonpad,
                "pairs": pairs, "decoder_tokens": dec_tokens, "encoder_tokens": enc_tokens, "skipped": skipped,
                "time": time.perf_counter() - t0, "data_time": t_data, "digest": digest.hexdigest()[:16],
                "reported": dict(zip(sorted(reported), torch.stack([reported[k] for k in sorted(reported)]).tolist()))
                if reported else {}}

    def _log(self, r: dict[str, float], eval_loss: float | None, bar) -> dict[str, float]:
        loss_sum, n, cells, tokens, nonpad, pairs, dec_tokens, enc_tokens = _reduce_sum(
            [r["loss_sum"], r["n"], r["cells"], r["tokens"], r["nonpad"], r["pairs"], r["decoder_tokens"],
             r["encoder_tokens"]], self.device)
        self.state.cells_seen += int(cells)
        self.state.nonpad_tokens_seen += int(nonpad)
        dt = max(r["time"], 1e-9)
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        # normalised micro-batch losses sum to world_size x the step's loss over the ranks (module docstring)
        loss = loss_sum / self.resolved.world_size if self.global_normalization else loss_sum / max(n, 1)
        m = {"loss": loss, "lr": float(self.engine.get_lr()[0]), "grad_norm": gn,
             "cells_per_s": cells / dt, "tokens_per_s": tokens / dt, "nonpad_tokens_per_s": nonpad / dt,
             "padding_fraction": 1.0 - nonpad / max(tokens, 1),
             "step_time_s": dt, "data_time_s": r["data_time"], "skipped_nonfinite": float(self.guard.total_skipped)}
        names = list(r.get("reported", {}))
        if names:  # loss terms like the loss (module docstring); diagnostics as means over micro-batches and ranks
            sums = _reduce_sum([r["reported"][k] for k in names], self.device)
            for k, v in zip(names, sums):
                per_loss = k.startswith("loss_") and self.global_normalization
                m[k] = v / self.resolved.world_size if per_loss else v / max(n, 1)
        if eval_loss is not None:
            m["eval_loss"] = eval_loss
            m.update(self.eval_extra)
        if self.device.type == "cuda":
            m["gpu_mem_max_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.peak and self.flops_info:
                counts = BatchCounts(int(cells), int(tokens), int(nonpad), int(pairs), int(dec_tokens),
                                     int(enc_tokens))
                m["mfu"] = train_flops(self.flops_info, counts) / dt / (self.peak * self.resolved.world_size)
        if self.is_main:
            self.tracker.log_metrics(m, step=self.state.step)
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": self.state.step, **m, "data_digest": r["digest"]}) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", cells_s=f"{m['cells_per_s']:.0f}", refresh=False)
        return m

    def train(self) -> dict[str, float]:
        """Run until `max_steps`; returns the last logged metrics. Saves at `save_every` and at the end."""
        self.engine.train()
        bar = None
        if self.is_main and self.s.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when the output is not a terminal (a SLURM log would get one line per update)
            bar = tqdm(total=self.s.max_steps, initial=self.state.step, desc=self.desc, unit="step",
                       dynamic_ncols=True, disable=None)
        last: dict[str, float] = {}
        try:
            while self.state.step < self.s.max_steps:
                r = self._train_step()
                step = self.state.step
                eval_loss = self.evaluate() if (step % self.s.eval_every == 0 or step == self.s.max_steps) else None
                if step % self.s.log_every == 0 or eval_loss is not None or step == self.s.max_steps:
                    last = self._log(r, eval_loss, bar)
                if eval_loss is not None:  # one line per evaluation, above the progress bar
                    fmt = ".4g" if self.evaluator is not None else ".1f"
                    line = (f"step {step}/{self.s.max_steps}: loss {last.get('loss', float('nan')):{fmt}}, "
                            f"held-out loss {eval_loss:{fmt}}" + self._baseline_note(eval_loss))
                    stop = False
                    es = self.early_stopping
                    if es is not None:
                        if es.update(step, self.eval_metrics):
                            line += f" (best {es.metric} so far)"
                            self.save()  # the best weights, kept from rotation until a better one
                        stop = es.should_stop
                    if bar is not None:
                        bar.write(line)
                    else:
                        self.say(line)
                    if stop:
                        self.say(f"early stopping at step {step}: {es.metric} has not improved for {es.patience} "
                                 f"evaluations (best {es.best:.4g} at step {es.best_step})")
                        break
                if bar is not None:
                    bar.update(1)
                if self.preemption is not None and step != self.s.max_steps \
                        and self.preemption.should_stop(self.device):
                    self.preempted = True  # the checkpoint below, then out
                    break
                if step % self.s.save_every == 0 and step != self.s.max_steps and self.last_saved_step != step:
                    self.save()
            if self.last_saved_step != self.state.step:
                self.save()
        except RuntimeError as exc:
            if is_oom(exc):
                max_tokens = self.s.batch.max_tokens if self.resolved.packed else None
                raise OutOfMemoryHint(oom_hint(self.resolved.micro_batch_size, self.resolved.zero_stage,
                                               max_tokens=max_tokens)) from exc
            raise
        finally:
            if bar is not None:
                bar.close()
            if self._cells_fh is not None:
                self._cells_fh.close()
                self._cells_fh = None
        return last

