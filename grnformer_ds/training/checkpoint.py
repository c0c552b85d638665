"""Checkpoints: DeepSpeed engine state + per-rank loader/RNG state + an atomic "latest" pointer.

Layout under `<output_dir>/checkpoints/`:

    latest                  text file holding the newest COMPLETE tag (DeepSpeed's own format, so DeepSpeed's
                            `zero_to_fp32.py` and `engine.load_checkpoint(dir)` understand it); replaced atomically
    global_step100/         DeepSpeed's files (`mp_rank_00_model_states.pt`, `*_optim_states.pt`, ...)
      rank_00000.pt         this rank's dataset `state_dict()` and RNG states (torch, CUDA, numpy, python)
      trainer_state.json    step, counters, MLflow run id, world size (rank 0)
      COMPLETE              written last, after every rank finished and the weights were checked finite

    universal/global_step100/  DeepSpeed's universal form of that checkpoint (`ds_to_universal`), made when a run
                            resumes from it on another number of ranks; removed with its tag

A save killed at any moment leaves a tag without COMPLETE, which is never pointed to by `latest` and is removed by
the next save; `find_latest` ignores it. A model with non-finite weights is never saved.

Resuming on the number of ranks that wrote the checkpoint loads DeepSpeed's own files (exact). On another number
(`load_checkpoint(..., universal=True)`), ZeRO's optimizer partitions no longer fit: rank 0 converts the tag once
with DeepSpeed's `ds_to_universal` (every parameter's fp32 weights and Adam moments, whole), and every rank loads
its new partition from that (`"checkpoint": {"load_universal": true}`, for that load only).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from grnformer_ds.errors import UserInputError
from grnformer_ds.training.guards import params_are_finite

LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"
TRAINER_STATE = "trainer_state.json"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) from (seed, step, rank): the RNG of a rank that has no saved
    state to continue (a resume on another number of ranks)."""
    value = int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def is_complete(ckpt_root: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_root, tag, COMPLETE))


def complete_tags(ckpt_root: str) -> list[str]:
    """Complete tags under `ckpt_root`, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [t for t in os.listdir(ckpt_root) if _TAG_RE.match(t) and is_complete(ckpt_root, t)]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def find_latest(ckpt_root: str) -> str | None:
    """The tag to resume from: the one `latest` names when it is complete, else the newest complete tag."""
    path = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            tag = fh.read().strip()
        if tag and is_complete(ckpt_root, tag):
            return tag
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


def _prune(ckpt_root: str, keep_last: int, current: str, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and unfinished leftovers (never `current`, nor a
    `protect`ed tag such as the best one of early stopping)."""
    keep = set(complete_tags(ckpt_root)[-keep_last:]) | {current} | set(protect)
    for name in os.listdir(ckpt_root):
        if _TAG_RE.match(name) and name not in keep:
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    universal = os.path.join(ckpt_root, UNIVERSAL)
    if os.path.isdir(universal):  # a conversion serves the resume from its tag only: the new run saved since
        shutil.rmtree(universal, ignore_errors=True)


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, permissions, an error part-way); the previous complete checkpoint stays `latest`."""


def _agree(failure: tuple[str, BaseException] | None) -> tuple[str, BaseException] | None:
    """Every rank learns whether any rank failed (one all-reduce, in place of a barrier): this rank's own failure, or
    a stand-in naming another rank's."""
    failed = torch.tensor([0.0 if failure is None else 1.0])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is None and failed.item() > 0:
        return "another rank", RuntimeError("the save failed on another rank")
    return failure


def save_checkpoint(engine, ckpt_root: str, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int = 2, protect: tuple[str, ...] = ()) -> str | None:
    """Save a complete checkpoint for optimizer step `step` (all ranks call this). Returns the tag, or None when the
    weights are not finite (nothing is written then).

    `trainer_state` (JSON-able, rank 0's is written) and `rank_state` (any picklable, e.g. the dataset's
    state_dict; RNG states are added here) are stored next to DeepSpeed's files.

    A failure at any point (preparing the folder, DeepSpeed's files, a rank's own file, making them durable, the
    COMPLETE marker or the `latest` pointer) is agreed on by every rank at the next stage boundary: the half-written
    tag is removed, `latest` still names the previous complete checkpoint, and every rank raises
    `CheckpointSaveError` with one line saying where it failed and what stays. (A rank that fails inside one of
    DeepSpeed's own collectives cannot be reached this way; a full or read-only disk fails every rank alike.)
    """
    if not params_are_finite(engine.module):
        return None
    tag = tag_for_step(step)
    tag_dir = os.path.join(ckpt_root, tag)
    rank = _rank()
    previous = find_latest(ckpt_root)

    def stage(where: str, work) -> tuple[str, BaseException] | None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001  (OSError mostly; anything else must not leave a half checkpoint)
            return where, exc
        return None

    def prepare():
        if rank == 0:
            os.makedirs(ckpt_root, exist_ok=True)
            if os.path.isdir(tag_dir):  # leftover of a save that was killed (or of a run we resumed before it)
                shutil.rmtree(tag_dir)

    def write_files():
        engine.save_checkpoint(ckpt_root, tag=tag, save_latest=False)
        os.makedirs(tag_dir, exist_ok=True)
        _atomic_torch_save({**rank_state, "rng": rng_state()}, os.path.join(tag_dir, f"rank_{rank:05d}.pt"))

    def commit():
        if rank != 0:
            return
        for name in os.listdir(tag_dir):  # make DeepSpeed's files durable before declaring the tag complete
            p = os.path.join(tag_dir, name)
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        atomic_write_text(os.path.join(tag_dir, TRAINER_STATE), json.dumps({**trainer_state, "step": step}, indent=1))
        atomic_write_text(os.path.join(tag_dir, COMPLETE), tag + "\n")
        atomic_write_text(os.path.join(ckpt_root, LATEST), tag)

    failure = _agree(stage("preparing the folder", prepare))
    if failure is None:
        failure = _agree(stage("writing the checkpoint files", write_files))
    if failure is None:
        failure = _agree(stage("committing the checkpoint", commit))
    if failure is not None:
        if rank == 0:  # nothing of the failed tag may look complete; `latest` was not moved (or is put back)
            shutil.rmtree(tag_dir, ignore_errors=True)
            try:
                if previous is not None:
                    atomic_write_text(os.path.join(ckpt_root, LATEST), previous)
            except OSError:
                pass  # `find_latest` ignores a pointer to a removed tag and takes the newest complete one
        _barrier()
        where, exc = failure
        raise CheckpointSaveError(f"checkpoint {tag} not saved ({where}: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())}); {previous or 'no earlier checkpoint'} stays "
                                  f"latest")
    if rank == 0:
        try:
            _prune(ckpt_root, keep_last, tag, protect)
        except OSError:
            pass  # old tags left behind are removed by the next save's prune
    _barrier()
    return tag


def load_weights(engine, ckpt_root: str, tag: str) -> None:
    """Load only the model weights of checkpoint `tag` into `engine` (all ranks), e.g. the best one before testing."""
    load_path, _ = engine.load_checkpoint(ckpt_root, tag=tag, load_module_only=True, load_optimizer_states=False,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_root, tag)}")


def universal_checkpoint(ckpt_root: str, tag: str) -> str:
    """The folder holding DeepSpeed's universal form of checkpoint `tag` (all ranks call this): rank 0 converts it
    once (`deepspeed.checkpoint.ds_to_universal`, into `<ckpt_root>/universal/<tag>`, COMPLETE written last) while
    the others wait; a conversion that fails on rank 0 fails every rank with its one line (`UserInputError`)."""
    root = os.path.join(ckpt_root, UNIVERSAL)
    out = os.path.join(root, tag)

    def convert():
        if _rank() != 0 or is_complete(root, tag):
            return
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(out, ignore_errors=True)  # a conversion killed part-way
        os.makedirs(root, exist_ok=True)
        args = argparse.Namespace(input_folder=os.path.join(ckpt_root, tag), output_folder=out,
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # only the format version: no tensor parallelism here
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # its progress bars and prints: not the run's output
        atomic_write_text(os.path.join(out, COMPLETE), tag + "\n")

    failure = None
    try:
        convert()
    except Exception as exc:  # noqa: BLE001  (any failure of the conversion: every rank must learn of it)
        failure = ("converting it to DeepSpeed's universal checkpoint", exc)
    failure = _agree(failure)
    if failure is not None:
        where, exc = failure
        raise UserInputError(f"cannot resume on another number of ranks ({where}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())})", os.path.join(ckpt_root, tag))
    return root


def has_partitioned_optimizer(ckpt_root: str, tag: str) -> bool:
    """Whether the tag's optimizer state is split over its ranks (ZeRO, or DeepSpeed's bf16 optimizer), i.e. whether
    another number of ranks needs the universal form to load it."""
    return any(name.endswith("optim_states.pt") for name in os.listdir(os.path.join(ckpt_root, tag)))


def load_checkpoint(engine, ckpt_root: str, tag: str, universal: bool = False, same_ranks: bool = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load engine (weights, optimizer, LR scheduler) and return (trainer_state, this rank's rank_state).

    ``universal``: the engine state comes from the tag's universal form (module docstring; needed when the
    checkpoint was written by another number of ranks). ``same_ranks=False`` (another number of ranks): rank_state
    is rank 0's (the data position, the same on every rank) without RNG states (those were per old rank).

    RNG states are NOT restored here: the caller restores them (`set_rng_state(rank_state["rng"])`) after it has
    rebuilt everything else, so that nothing built afterwards consumes random numbers out of order.
    """
    if universal and has_partitioned_optimizer(ckpt_root, tag):
        load_path = _load_universal(engine, universal_checkpoint(ckpt_root, tag), tag)
    else:
        load_path, _ = engine.load_checkpoint(ckpt_root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_root, tag)}")
    tag_dir = os.path.join(ckpt_root, tag)
    with open(os.path.join(tag_dir, TRAINER_STATE), encoding="utf-8") as fh:
        trainer_state = json.load(fh)
    rank_file = os.path.join(tag_dir, f"rank_{_rank() if same_ranks else 0:05d}.pt")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    if not same_ranks:
        rank_state.pop("rng", None)
    return trainer_state, rank_state


def _load_universal(engine, load_dir: str, tag: str):
    """`engine.load_checkpoint` from a universal checkpoint. DeepSpeed reads `load_universal` from the engine's
    config at load time, so it is switched on for this load only (a later load, e.g. of the best checkpoint of a
    fine-tune, reads the ordinary files). Its ZeRO-3 loader copies the first parameter group's hyper-parameters into
    every group, which would put weight decay on the groups that have none (and group 0's LR on a group with its
    own, `--new-params-lr`): they are put back."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = before
    # it also hands every parameter group's state the same `step` tensor, which torch's Adam increments in place:
    # once per group and step, so the bias correction would drift; each state gets its own
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in inner.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value):
                if id(value) in seen:
                    state[key] = value.clone()
                seen.add(id(state[key]))
    loaded_lr = engine.optimizer.param_groups[0].get("lr") if groups else None
    for group, saved in zip(engine.optimizer.param_groups, groups):
        group.update({k: v for k, v in saved.items() if k != "lr"})
        if loaded_lr is not None and groups[0].get("lr"):  # the saved LR of group 0, in each group's own ratio
            group["lr"] = loaded_lr * saved["lr"] / groups[0]["lr"]
    return load_path
