"""Glue between the trainer and the other layers: store (+ demo store with GRN assets), model config and model,
streaming datasets. Each function turns the other layers' errors into one-line `UserInputError`s."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from grnformer_ds.errors import UserInputError, load_json_object

DEMO_DIR_NAME = "demo_store"


def demo_cache_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("GRNFORMER_DS_CACHE") or os.path.join(Path.home(), ".cache", "grnformer_ds")


def ensure_demo(cache_dir: str | None = None, say: Callable[[str], None] = print, verbose: bool = False) -> str:
    """Build (once) and return the demo store: pbmc68k_reduced cells plus GRN assets (graphs).

    One line per thing built. The GRN build's own report (prior genes missing from the 765-gene store, small cell
    types, …) is about a prior the user did not choose: it is counted in that line and kept in the manifest
    (`assets.grn.report`); `verbose` prints it as `build_grn.py` does."""
    import time

    from grnformer_ds.grn import has_grn_assets
    from grnformer_ds.grn.demo import ensure_demo_grn
    from grnformer_ds.store import ensure_demo_store

    path = os.path.join(demo_cache_dir(cache_dir), DEMO_DIR_NAME)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        t0 = time.time()
        ensure_demo_store(path)
        say(f"demo store: built {path} from scanpy's pbmc68k_reduced (first use, {time.time() - t0:.0f} s)")
    if not has_grn_assets(path):
        t0, lines = time.time(), []
        assets = ensure_demo_grn(path, log=say if verbose else lines.append)
        notes = sum(line.startswith("warning") for line in lines)
        say(f"demo GRN assets: built from the built-in human prior with --infer (first use, {time.time() - t0:.0f} "
            f"s): {assets.n_regulons} regulons, {len(assets.celltype_src)} cell-type edges"
            + (f"; {notes} notes in its manifest (assets.grn.report), --verbose prints them" if notes else ""))
    return str(path)


def prepare_store(data: str | None, cache_dir: str | None, is_main: bool, say: Callable[[str], None],
                  verbose: bool = False) -> str:
    """The store to train on: `data`, or the demo store (built by rank 0; callers barrier afterwards)."""
    if data is not None:
        if not os.path.isdir(data):
            raise UserInputError("store directory not found", data)
        return data
    if is_main:
        return ensure_demo(cache_dir, say, verbose)
    return os.path.join(demo_cache_dir(cache_dir), DEMO_DIR_NAME)


def open_store(path: str):
    from grnformer_ds.store import open_store as _open

    return _open(path)


def store_vocab(store) -> dict[str, int]:
    return dict(store.vocab)


def store_has_graphs(store) -> bool:
    from grnformer_ds.grn import has_grn_assets

    return has_grn_assets(store.path if hasattr(store, "path") else store.root)


def describe_store(store, path: str) -> str:
    """The run's one line about its data."""
    grn = ((getattr(store, "manifest", {}) or {}).get("assets") or {}).get("grn")
    graphs = (f"GRN assets ({grn.get('n_regulons', '?')} regulons)" if grn and store_has_graphs(store)
              else "no GRN assets (data_prep/build_grn.py adds them)")
    return (f"store: {path}: {store.n_cells:,} cells, {store.n_genes:,} genes, {len(store.cell_types)} cell types, "
            f"{graphs}")


def tokenization_summary(dataset) -> dict[str, Any]:
    """The tokenization a run actually uses (the backbone collator's defaults and what the command line set), for
    run_settings.resolved.json."""
    import dataclasses

    c = dataset.collator
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
           if f.name not in ("gene_token_ids", "max_tokens", "pad_to_max_tokens")}
    if dataset.graphs:
        out["edge_perturbation"] = dataset.edge_perturbation
    return out


def store_summary(store, path: str) -> dict[str, Any]:
    """Manifest facts worth logging as MLflow params."""
    m = getattr(store, "manifest", {}) or {}
    return {"path": os.path.abspath(path), "n_cells": store.n_cells, "n_genes": store.n_genes,
            "nnz": getattr(store, "nnz", None), "vocab_size": store.vocab_size, "n_cell_types": len(store.cell_types),
            "vocab_sha256": m.get("vocab_sha256"), "n_shards": len(store.shards), "graphs": store_has_graphs(store),
            "assets": sorted((m.get("assets") or {}).keys())}


def build_model_config(store, preset: str, config_path: str | None, backbone: str | None = None,
                       use_graph: bool = True):
    """GRNFormerConfig from a preset + an optional JSON of overrides, sized to the store's vocabulary.

    The store's vocabulary must fit the model: `vocab_size` is the store's unless the JSON sets it, in which case it
    must be at least the store's; `<pad>`/`<cls>` ids must be the store's.
    """
    from grnformer_ds.modeling import PRESETS, GRNFormerConfig

    if preset not in PRESETS:
        raise UserInputError(f"unknown --model-preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    overrides: dict[str, Any] = {}
    src = config_path or "--model-preset"
    if config_path is not None:
        overrides = load_json_object(config_path, "model config")
        for k in ("model_type", "architectures", "auto_map", "transformers_version"):
            overrides.pop(k, None)
    special = store.special_tokens
    vocab_size = overrides.pop("vocab_size", None)
    if vocab_size is not None and vocab_size < store.vocab_size:
        raise UserInputError(f"the store's vocabulary has {store.vocab_size} tokens but the model config has "
                             f"vocab_size {vocab_size}; the vocabulary does not fit (drop vocab_size to take the "
                             f"store's)", src)
    for key, tok in (("pad_token_id", "<pad>"), ("cls_token_id", "<cls>")):
        if key in overrides and tok in special and overrides[key] != special[tok]:
            raise UserInputError(f"{key} is {overrides[key]} but the store's {tok} id is {special[tok]}", src)
        if tok in special:
            overrides[key] = special[tok]
    if backbone is not None:
        overrides["backbone"] = backbone
    has_graphs = store_has_graphs(store)
    if overrides.get("use_graph") and not has_graphs:
        raise UserInputError("the model config asks for use_graph but the store has no GRN assets "
                             "(run data_prep/build_grn.py, or pass --no-graph)", src)
    overrides["use_graph"] = bool(overrides.get("use_graph", True) and use_graph and has_graphs)
    try:
        return GRNFormerConfig.from_preset(preset, vocab_size=vocab_size or store.vocab_size, **overrides)
    except (ValueError, TypeError) as exc:
        raise UserInputError(" ".join(str(exc).split()), src) from None


def wants_zero_init(config) -> bool:
    """Build under zero.Init only when the transformer alone is big (~>1B params): below that, building the full
    model on each rank first is simpler and costs only host memory for a moment."""
    approx = 12 * config.num_hidden_layers * config.hidden_size ** 2
    return approx > 1e9


def build_model(config, zero_init_ctx=None, dtype: torch.dtype = torch.float32, model_class=None):
    """`model_class` (a task's; default GRNFormerForMaskedLM); with a `deepspeed.zero.Init` context
    (`zero_init_ctx`) the transformer is built partitioned and the torch-geometric structure encoder outside it (PyG's
    reset_parameters cannot run on partitioned parameters).

    Under zero.Init HF's weight init cannot write the empty shards, so the model is built under `no_init_weights()`
    and initialised afterwards by transformers' `initialize_weights_zero3` (gathers each module's shards, rank 0
    initialises, the result is re-partitioned) — the same initial weights as a plain build would get. `dtype` is
    the training dtype zero.Init gives the partitioned part; the structure encoder is cast to it.
    """
    from grnformer_ds.modeling import GRNFormerForMaskedLM

    cls = model_class or GRNFormerForMaskedLM
    if zero_init_ctx is None or isinstance(zero_init_ctx, contextlib.nullcontext):
        return cls(config)
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3

    with zero_init_ctx, no_init_weights():
        model = cls(config, build_structure_encoder=False)
    initialize_weights_zero3(model)
    encoder = model.build_structure_encoder()
    if encoder is not None:  # zero.Init cast the rest to the training dtype; ZeRO-3 needs one dtype throughout
        encoder.to(dtype)
    return model


BASELINE_CELLS = 4096  # training cells (over all ranks) whose masked targets fit the trivial baselines


def fit_baselines(store_path: str, config, settings, resolved, info, args, device):
    """`baselines.TrivialBaselines` fitted on the first ~`BASELINE_CELLS` training cells (this rank's share, no
    graphs: only the targets matter), summed over ranks; read by a separate loader, so the run's data position does
    not move."""
    import torch.distributed as dist

    from grnformer_ds.data import StreamingCellDataset
    from grnformer_ds.training.baselines import TrivialBaselines

    kw = {**dataset_kwargs(config, settings, resolved, info, args), "graphs": False}
    dataset = StreamingCellDataset(store_path, split="train", **kw)
    baselines, cells, quota = TrivialBaselines(config.vocab_size), 0, -(-BASELINE_CELLS // info.world_size)
    for batch in dataset:
        baselines.update(batch)
        cells += int(batch["cell_index"].shape[0])
        if cells >= quota:
            break

    def reduce(t):
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = t.to(device)
            dist.all_reduce(t)
        return t.cpu()

    return baselines.finish(reduce)


class EvalBatches:
    """Re-iterable held-out batches that restart from the beginning on every `iter()` (the dataset is stateful:
    a plain re-iteration after a partial pass would continue where the last evaluation stopped)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._start = dataset.state_dict()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.load_state_dict(self._start)
        return iter(self.dataset)


def choose_kernels(config, settings, info, say) -> None:
    """Set the run's attention implementation on the model config (`compile.choose_attn_implementation`), refusing
    one that cannot run here in one line."""
    from grnformer_ds.modeling import resolve_attn_implementation
    from grnformer_ds.training.compile import choose_attn_implementation

    if settings.compile and not config.backbone_spec.static_shapes:
        raise UserInputError(f"--compile: the {config.backbone} backbone's token layout has a data-dependent length "
                             f"(no static shapes to compile for); train it without --compile")
    impl, note = choose_attn_implementation(settings.attn_implementation, config, info.has_gpu)
    try:
        impl = resolve_attn_implementation(impl)
    except (ImportError, ValueError) as exc:
        raise UserInputError(f"--attn-implementation: {exc}") from None
    if impl == "varlen" and config.attention_probs_dropout_prob > 0:
        raise UserInputError(f"--attn-implementation varlen: torch's varlen_attn has no attention dropout and the "
                             f"model has attention_probs_dropout_prob={config.attention_probs_dropout_prob}; set it "
                             f"to 0 in --config, or use flash_attention_2 / sdpa")
    config._attn_implementation = impl
    if note:
        say(f"note: {note}")


def resolve_batch_layout(config, settings, resolved, info, args) -> None:
    """Fill the packed layout's defaults into `settings.batch` (the one place they are decided): the token budget
    (`settings.default_max_tokens` of the backbone's longest cell) and padding to it (on when compiling)."""
    from grnformer_ds.data.dataset import longest_cell_tokens
    from grnformer_ds.training.settings import default_max_tokens

    b = settings.batch
    if not resolved.packed:
        return
    longest = longest_cell_tokens(config.backbone, getattr(args, "max_seq_len", None))
    if b.max_tokens is None:
        b.max_tokens = default_max_tokens(longest, info.has_gpu)
    if b.max_tokens < longest:
        raise UserInputError(f"--max-tokens {b.max_tokens} is smaller than the longest cell, {longest} tokens for "
                             f"the {config.backbone} backbone (raise it, or lower --max-seq-len)")
    if b.pad_to_max_tokens is None:
        b.pad_to_max_tokens = settings.compile


def dataset_kwargs(config, settings, resolved, info, args) -> dict[str, Any]:
    from grnformer_ds.data import get_collator

    layout = (dict(max_tokens=settings.batch.max_tokens, pad_to_max_tokens=bool(settings.batch.pad_to_max_tokens))
              if resolved.packed else dict(batch_size=resolved.micro_batch_size))
    kw: dict[str, Any] = dict(seed=settings.seed, rank=info.rank, world_size=info.world_size,
                              backbone=config.backbone, graphs=bool(config.use_graph), graph_layout="csr",
                              undirected_graphs=bool(config.gnn_add_reverse_edges), **layout)
    # the tokenization options the model decides (bins, mask / pad values, patch size ...) come from its config
    kw["collator_kwargs"] = {f: getattr(config, f) for f in get_collator(config.backbone).model_config_fields}
    if getattr(args, "max_seq_len", None):
        kw["max_seq_len"] = args.max_seq_len
    if getattr(args, "mask_ratio", None) is not None:
        kw["mask_ratio"] = args.mask_ratio
    if getattr(args, "edge_perturbation", None) is not None:
        kw["edge_perturbation"] = args.edge_perturbation
    if getattr(args, "eval_fraction", None) is not None:
        kw["eval_fraction"] = args.eval_fraction
    return kw


def build_datasets(store_path: str, config, settings, resolved, info, args):
    """(train loader with state_dict/load_state_dict, held-out EvalBatches or None). Packed micro-batches of
    `settings.batch.max_tokens` tokens (`resolve_batch_layout` first) or padded ones of the resolved micro batch;
    graphs in the structure encoder's final form (undirected as the config says, sorted by destination)."""
    from grnformer_ds.data import StatefulCellLoader, StreamingCellDataset

    kw = dataset_kwargs(config, settings, resolved, info, args)
    train = StreamingCellDataset(store_path, split="train", **kw)
    loader = StatefulCellLoader(train, num_workers=settings.num_workers, pin_memory=info.has_gpu,
                                prefetch_factor=4 if settings.num_workers else None)
    eval_batches = None
    if settings.eval_batches > 0 and kw.get("eval_fraction", 0.05) > 0:
        eval_batches = EvalBatches(StreamingCellDataset(store_path, split="eval", **kw))
    return loader, eval_batches
