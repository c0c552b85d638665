"""Cell embeddings of a trained or imported GRNFormer for every cell of a store, each exactly once, in store order.

    from grnformer_ds.inference import embed, load_model
    model = load_model("my_model")                       # an export_hf.py / import_checkpoint.py folder
    emb = embed(model, "my_store")                       # Embeddings: cell_index (N,), cells (N, H')

The cells stream through the same loader as training (`data.StreamingCellDataset`) with everything random turned off:
``split="all"``, no shuffle, no masking, no edge perturbation, no dropped tail, and each cell's remaining random
tokenization draws (scGPT's tie-breaking between equal bin edges, the gene subset of a cell longer than max_seq_len)
keyed by the cell, not the batch (`data.cell_random`), so an embedding does not depend on the batch size, the
layout or the number of ranks; token-packed micro-batches; the
model's own tokenization options (its collator's `model_config_fields`). When the store has GRN assets and the model
has its GRN parts, the embeddings use them. Several ranks each embed their share (`rank`, `world_size`; cells the
last batch repeats to even out ranks are written once); `gather_embeddings` joins them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from grnformer_ds.errors import UserInputError


@dataclass
class Embeddings:
    """cell_index: (N,) int64 store positions of the embedded cells, ascending. cells: (N, H') float32 cell
    embeddings (the backbone's pooling: `<cls>` for scGPT, concat(S, T, max, mean) for scFoundation, ...)."""

    cell_index: np.ndarray
    cells: np.ndarray


def load_model(model_dir: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The folder's model (its config's `architectures`: `GRNFormerForMaskedLM` for a pretraining export, the
    fine-tuned class for a fine-tuning one) in eval mode on `device` (default: CUDA when visible, else CPU); `dtype`
    default float32 (`embed` runs bf16 autocast on a GPU). One-line `UserInputError` for a folder that is not one of
    ours."""
    import json
    import os

    from grnformer_ds.modeling import model_class

    for name in ("config.json", "model.safetensors", "vocab.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise UserInputError(f"{name} is missing (a folder written by export_hf.py or import_checkpoint.py)",
                                 model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            architecture = (json.load(fh).get("architectures") or ["GRNFormerForMaskedLM"])[0]
        model = model_class(architecture).from_pretrained(model_dir, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load the model ({' '.join(str(exc).split())})", model_dir) from None
    return model.to(device).eval()


def _model_vocab_check(model_dir_vocab: dict[str, int] | None, store) -> None:
    if model_dir_vocab is None:
        return
    from grnformer_ds.store.vocab import tokens_off_model_ids

    wrong = tokens_off_model_ids(dict(store.vocab), model_dir_vocab)
    if wrong:
        raise UserInputError(f"the store's vocabulary is not the model's ({len(wrong):,} of its tokens differ, e.g. "
                             f"{wrong[0]!r}); give the .h5ad instead (it is mapped on the fly) or rebuild the store "
                             f"with data_prep/build_store.py --gene-vocab MODEL/vocab.json", str(store.path))


def embedding_dataset(model, store_path: str, *, max_tokens: int | None = None, batch_size: int | None = None,
                      graphs: bool | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0):
    """The deterministic loader `embed` reads (module docstring). graphs: None = when both the store has GRN
    assets and the model its GRN parts."""
    from grnformer_ds.data import StreamingCellDataset, get_collator
    from grnformer_ds.data.dataset import longest_cell_tokens
    from grnformer_ds.grn import has_grn_assets
    from grnformer_ds.training.settings import default_max_tokens

    config = model.config
    use_graphs = bool(config.use_graph) and has_grn_assets(store_path) if graphs is None else bool(graphs)
    if use_graphs and not config.use_graph:
        raise UserInputError("graphs requested but the model has no GRN parts (use_graph=False)")
    collator = get_collator(config.backbone)
    kw: dict[str, Any] = dict(seed=0, rank=rank, world_size=world_size, backbone=config.backbone, split="all",
                              training=False, shuffle=False, drop_last=False, graphs=use_graphs, graph_layout="csr",
                              undirected_graphs=bool(config.gnn_add_reverse_edges), mask_ratio=0.0,
                              cell_keyed_random=True,
                              collator_kwargs={f: getattr(config, f) for f in collator.model_config_fields})
    if batch_size is None:
        kw["max_tokens"] = max_tokens or default_max_tokens(longest_cell_tokens(config.backbone),
                                                            torch.cuda.is_available())
    else:
        kw["batch_size"] = batch_size
    return StreamingCellDataset(store_path, **kw)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def embed(model, store, *, max_tokens: int | None = None, batch_size: int | None = None,
          graphs: bool | None = None, rank: int = 0, world_size: int = 1, vocab: dict[str, int] | None = None,
          progress: bool = False, say: Callable[[str], None] | None = None) -> Embeddings:
    """Embed every cell of `store` (a path or an opened store) with `model` (`load_model`; a
    `GRNFormerForMaskedLM` or `GRNFormerModel`). With `world_size` > 1 this rank embeds its share only.

    max_tokens / batch_size: packed micro-batches of that many tokens (default: the training default for the
    device) or padded batches of that many cells. vocab: the model folder's vocabulary, checked against the store's.
    bf16 autocast on a GPU. Returns `Embeddings` of the cells this rank saw, ascending store position."""
    from grnformer_ds.store import open_store

    opened = open_store(store) if isinstance(store, (str, bytes)) or hasattr(store, "__fspath__") else store
    _model_vocab_check(vocab, opened)
    base = model.grnformer if hasattr(model, "grnformer") else model
    device = next(base.parameters()).device
    dataset = embedding_dataset(base, str(opened.path), max_tokens=max_tokens, batch_size=batch_size,
                                graphs=graphs, rank=rank, world_size=world_size)
    if say is not None and rank == 0:
        say(f"embedding {opened.n_cells:,} cells on {world_size} rank(s), {device.type}"
            + (", GRN graphs" if dataset.graphs else ", no GRN graphs")
            + (f", packed micro-batches of <= {dataset.max_tokens} tokens" if dataset.packed
               else f", batches of {dataset.batch_size} cells"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    chunks: dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), desc="embed", unit="batch", disable=rank != 0)
    for batch in dataset:
        cell_index = batch["cell_index"].numpy()
        with autocast:
            out = base(**_to_device(batch, device))
        cells = out.cell_embedding.float().cpu().numpy()
        for i, c in zip(cell_index.tolist(), cells):
            chunks[i] = c  # a cell repeated to fill the last batch has the same embedding
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    order = np.array(sorted(chunks), dtype=np.int64)
    dim = next(iter(chunks.values())).shape[0] if chunks else 0
    cells = np.stack([chunks[i] for i in order.tolist()]) if chunks else np.zeros((0, dim), np.float32)
    return Embeddings(cell_index=order, cells=cells.astype(np.float32))


def gather_embeddings(parts: list[Embeddings], n_cells: int) -> Embeddings:
    """Join the ranks' `Embeddings` into one with every cell of the store exactly once, in store order; a cell that
    no rank embedded is an error (it cannot happen with `embed`'s loader, which covers the whole split)."""
    index = np.concatenate([p.cell_index for p in parts])
    cells = np.concatenate([p.cells for p in parts])
    uniq, first = np.unique(index, return_index=True)
    if len(uniq) != n_cells or (n_cells and (uniq[0] != 0 or uniq[-1] != n_cells - 1)):
        raise RuntimeError(f"embeddings cover {len(uniq)} of {n_cells} cells")
    return Embeddings(cell_index=uniq, cells=cells[first])
