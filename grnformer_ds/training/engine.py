"""Everything that touches DeepSpeed: distributed init, config validation, `deepspeed.initialize`, ZeRO-3 specifics,
and consolidation of ZeRO checkpoints. No other module imports deepspeed.

ZeRO-3 notes:
* `deepspeed.zero.Init` partitions each parameter as soon as its module is constructed. torch-geometric convs
  (GCNConv, GATConv, ...) re-initialise their `Linear` in `reset_parameters()` through code that expects the full
  tensor, which breaks on a partitioned parameter; `zero_init_context()` is therefore applied only to the parts of a
  model the caller chooses (the transformer), and the GNN is built outside it and partitioned by
  `deepspeed.initialize` like any other module.
* Parameters used outside the forward of the module that owns them (e.g. `self.emb.weight` read in the parent's
  forward) are external parameters. DeepSpeed >= 0.10 discovers them automatically during `engine(...)` forwards
  (ZeROOrderedDict); a forward that bypasses the engine needs `register_external_parameters()` first.
* `stage3_gather_16bit_weights_on_model_save` (on in ds_configs/zero3.json) lets `engine.save_16bit_model` gather full
  weights; the HF export instead consolidates the fp32 master weights from the checkpoint (`consolidate_fp32`).
* ZeRO-3 leaf modules: the model's blocks (its HF `_no_split_modules`: encoder layers, the fusion adapter, the
  structure encoder) are marked `set_z3_leaf_modules` before `deepspeed.initialize`, so ZeRO-3 fetches and releases
  a block's parameters once, at the block, instead of with hooks on every Linear / LayerNorm inside it (the per-module
  fetch / release is what made ZeRO-3 several times slower than plain torch for sub-100M models, BENCHMARKS.md), and
  a compiled block (compile.py) has no ZeRO hook inside it to break its graph.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from grnformer_ds.errors import UserInputError
from grnformer_ds.training.ds_config import ResolvedConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    has_gpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Start the process group (NCCL on GPU, gloo on CPU). Works under the `deepspeed` launcher, torchrun, SLURM
    (through DeepSpeed's MPI/env discovery) and as a plain single process (env defaults for one rank)."""
    import deepspeed

    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        # On CPU DeepSpeed would otherwise JIT-compile its shared-memory all-reduce op with g++ (~60 s) at init.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
            # `srun python launchers/pretrain.py ...` with one task per GPU: SLURM numbers the ranks.
            if "MASTER_ADDR" not in os.environ:
                raise UserInputError("under srun set MASTER_ADDR (and MASTER_PORT) to the first node, e.g. "
                                     "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)")
            os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                              LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
            os.environ.setdefault("MASTER_PORT", "29500")
        else:  # a plain single process (python launchers/pretrain.py, a notebook, pytest)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            # port 0: the rendezvous store binds a port of its own choosing. A port found free and handed over would
            # race any other process that takes it first (a client socket of a parallel job: EADDRINUSE)
            os.environ.setdefault("MASTER_PORT", "0")
    if local_rank is not None and local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if has_gpu else "gloo", verbose=False)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    lr = int(os.environ.get("LOCAL_RANK", 0))
    if has_gpu:
        torch.cuda.set_device(lr)
        device = torch.device("cuda", lr)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=lr, device=device, has_gpu=has_gpu)


def bf16_supported(info: DistInfo) -> bool:
    """bf16 autocast/arith works on every recent CPU torch build and on Ampere+ GPUs."""
    if info.has_gpu:
        return torch.cuda.is_bf16_supported()
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except RuntimeError:
        return False


def validate_ds_config(resolved: ResolvedConfig, path: str) -> None:
    """Let DeepSpeed parse the resolved dict now (before the model is built) so a bad key is one clear line."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(resolved.ds_config)
    except Exception as exc:  # pydantic ValidationError, AssertionError, ... — all mean "this JSON is wrong"
        msg = " ".join(str(exc).split())
        raise UserInputError(f"invalid DeepSpeed config: {msg[:400]}", path) from None


def zero_init_context(resolved: ResolvedConfig, enabled: bool = True):
    """`deepspeed.zero.Init` under ZeRO-3 (modules built inside are partitioned at construction, so a model larger
    than one GPU can be built); a null context otherwise. Build torch-geometric convs OUTSIDE it."""
    if not enabled or resolved.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=resolved.ds_config)


def register_external_parameters(pairs: Iterable[tuple[torch.nn.Module, torch.nn.Parameter]]) -> None:
    """Declare parameters a module uses in its forward but does not own (e.g. tied embeddings) to ZeRO-3."""
    import deepspeed

    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)


def param_groups(model: torch.nn.Module, weight_decay: float, new_params: set[str] | None = None,
                 new_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and other 1-d parameters (the BERT/HF convention); frozen
    parameters left out; with `new_params` (names) and `new_lr`, those parameters in groups of their own at that
    peak learning rate (the schedule scales every group alike)."""
    new_params = new_params or set()
    groups: dict[tuple[bool, bool], list] = {(n, d): [] for n in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        groups[(new_lr is not None and name in new_params, len(shape) >= 2)].append(p)
    out = []
    for (is_new, decay), params in groups.items():
        if params or not is_new:  # the two plain groups always exist (their order is what checkpoints hold)
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if is_new:
                group["lr"] = new_lr
            out.append(group)
    return out


def block_classes(model: torch.nn.Module) -> list[type]:
    """The classes of the model's blocks: transformers' `_no_split_modules` names (found among the model's
    modules; an empty list for models without it)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return list({type(m) for m in model.modules() if type(m).__name__ in names})


def build_engine(model: torch.nn.Module, resolved: ResolvedConfig, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, scheduler_fn: Callable, has_gpu: bool,
                 leaf_blocks: bool = True, new_params: set[str] | None = None, new_lr: float | None = None):
    """`deepspeed.initialize` with torch AdamW as client optimizer (unless the JSON has an "optimizer" block) and our
    warmup + cosine schedule. Under ZeRO-3 the model's blocks become leaf modules (module docstring; `leaf_blocks`
    False keeps DeepSpeed's per-module hooks, for comparison). Returns the engine; `engine.optimizer`,
    `engine.lr_scheduler` hold the rest."""
    import deepspeed

    # With frozen parameters (--freeze-backbone) leaf blocks fail in backward under DeepSpeed 0.19.8: a block
    # whose inputs need no gradient (the fusion reading a frozen encoder) has its weights released before its own
    # backward; DeepSpeed's per-module hooks handle that case.
    frozen = any(not p.requires_grad for p in model.parameters())
    if frozen:  # expected with a frozen backbone: the fusion's inputs need no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    if resolved.zero_stage == 3 and leaf_blocks and not frozen and block_classes(model):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, block_classes(model))
    groups = param_groups(model, weight_decay, new_params, new_lr)
    optimizer = None
    if resolved.client_optimizer:
        # torch AdamW: no JIT build (FusedAdam/CPUAdam compile C++/CUDA at first use); fused kernel on GPU.
        kw = {"fused": True} if has_gpu else {}
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           model_parameters=None if optimizer is not None else groups,
                                           lr_scheduler=scheduler_fn, config=resolved.ds_config)
    return engine


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, modifier_rank: int | None = None):
    """Within the block, ZeRO-3 partitioned parameters of `module` are whole on every rank (no-op otherwise)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def consolidate_fp32(ckpt_root: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (CPU) from a ZeRO stage 1/2/3 checkpoint written by any number of ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
