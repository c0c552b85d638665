"""Kernels and compilation, applied outside the model (torchtitan's rule): the attention implementation for the run,
`torch.compile` of the DeepSpeed engine's module, and the batch marks that keep a compiled model from recompiling.

Compilation (`--compile`) is regional, as torchtitan compiles each transformer block: the forward of every block of
the model (its HF `_no_split_modules`: encoder / decoder layers, the fusion adapter, the structure encoder) is
`torch.compile`d, and the glue between blocks stays eager. Under ZeRO-3 the blocks are DeepSpeed leaf modules
(engine.py), so the parameter fetch / release hooks run at the block boundary, outside the compiled code: compiling
the whole module instead (DeepSpeed's `engine.compile()`) puts a ZeRO hook, a graph break and a recompile at every
Linear (many times slower than eager on the CPU demo run, BENCHMARKS.md). Identical layers share one compiled
graph, so compile time does not grow with depth. With `"compile": {"deepcompile": true}` in the JSON,
`engine.compile()` hands the whole graph to DeepCompile's ZeRO passes instead (`compile_engine`; GPU only).

The packed forward has no graph break at all (tests/test_model_compile.py asserts it for the whole model with
`torch._dynamo.explain`). The blocks compile with dynamic shapes, so what varies from one micro-batch to the next
(cells, segments, edges, the longest segment) never recompiles them; with ``--pad-to-max-tokens`` (on when compiling)
the token count is fixed too. `mark_dynamic` marks the same dims on a batch for a whole-model compile (DeepCompile).
"""
from __future__ import annotations

import importlib.util

import torch

# dims that change from one packed micro-batch to the next: (key, dim)
_DYNAMIC_DIMS = (
    ("cu_seq_lens_q", 0), ("cu_seq_lens_k", 0),  # segments
    ("cell_index", 0), ("cell_type_ids", 0), ("total_counts", 0),  # cells
    ("decoder_values", 0), ("decoder_input_ids", 0),  # cells (scFoundation's all-gene decoder)
    ("celltype_edge_index", 1), ("celltype_edge_weight", 0), ("cell_edge_index", 1), ("cell_edge_weight", 0),
    ("batch", 0), ("ptr", 0),
)


def mark_dynamic(batch: dict) -> dict:
    """Mark the varying dims of a batch dynamic for `torch.compile` (in place; returns the batch). For padded
    batches the cells and the padded length vary too."""
    dims = list(_DYNAMIC_DIMS)
    if batch.get("cu_seq_lens_q") is None:
        dims += [("input_ids", 0), ("input_ids", 1), ("values", 0), ("values", 1), ("attention_mask", 0),
                 ("attention_mask", 1), ("labels", 0)]
        if batch.get("labels") is not None and batch["labels"].shape == batch["input_ids"].shape:
            dims.append(("labels", 1))
    elif batch.get("labels") is not None and batch["labels"].dim() == 2 and batch["labels"].shape[0] > 1:
        dims.append(("labels", 0))  # scFoundation's (B, G) labels
    for key, dim in dims:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    return batch


def compile_blocks(model: torch.nn.Module, dynamic: bool = True, **compile_kwargs) -> int:
    """`torch.compile` the forward of every block of `model` in place (module hooks, e.g. ZeRO-3's, stay outside).
    Blocks compile with dynamic shapes: their inputs (per-batch varlen metadata, edge lists) are made inside the
    model, where `mark_dynamic` cannot reach them. Returns the number of blocks compiled."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=dynamic, **compile_kwargs)
    return len(blocks)


def compile_engine(engine):
    """Compile the engine's model: DeepCompile through `engine.compile()` when the DeepSpeed JSON enables it
    (`"compile": {"deepcompile": true}`), else the blocks (`compile_blocks`). Returns what each batch needs before
    the forward: `mark_dynamic` for the whole-graph DeepCompile, None for compiled blocks (dynamic already)."""
    if engine.is_deepcompile_enabled():
        engine.compile()
        return mark_dynamic
    compile_blocks(engine.module)
    return None


def choose_attn_implementation(requested: str | None, config, has_gpu: bool) -> tuple[str, str | None]:
    """The attention kernel of a run: the requested one, or for None the fastest this device and model can use.

    GPU: torch's `varlen` (FlashAttention inside PyTorch) when the model trains without attention dropout, which
    that kernel lacks; else flash-attn's `flash_attention_2` when installed; else `sdpa`. CPU: `sdpa`.
    Returns (implementation, a note saying why, or None)."""
    if requested is not None:
        return requested, None
    if not has_gpu:
        return "sdpa", None
    has_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if has_varlen and config.attention_probs_dropout_prob == 0:
        return "varlen", None
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", None
    why = (f"attention dropout {config.attention_probs_dropout_prob} rules out torch's varlen_attn" if has_varlen
           else f"torch {torch.__version__} has no varlen_attn")
    return "sdpa", (f"attention: sdpa ({why}; set attention_probs_dropout_prob=0 in --config or install flash-attn "
                    f"for a varlen kernel)")
