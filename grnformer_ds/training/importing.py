"""Other projects' checkpoints -> GRNFormer Hugging Face folders (`launchers/import_checkpoint.py`).

The format knowledge (files, key mapping, config fields) lives with each backbone (`Backbone.import_checkpoint`);
this module builds the model the checkpoint describes (the plain backbone: no GNN, no fusion, which continued
pretraining adds: `init_from`), loads the mapped weights strictly and writes the folder `export_hf.py` would write.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from grnformer_ds.errors import UserInputError


def build_imported_model(backbone: str, path: str, variant: str | None = None, gene_list: str | None = None):
    """(GRNFormerForMaskedLM with the checkpoint's weights, ImportedCheckpoint). One-line `UserInputError`s."""
    from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, get_backbone

    try:
        spec = get_backbone(backbone)
        ckpt = spec.import_checkpoint(path, variant, gene_list)
    except (ValueError, FileNotFoundError) as exc:
        raise UserInputError(" ".join(str(exc).split())) from None
    try:
        config = GRNFormerConfig(backbone=backbone, use_graph=False, **ckpt.config)
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"{ckpt.source}: {' '.join(str(exc).split())}") from None
    model = GRNFormerForMaskedLM(config)
    expected = model.state_dict()
    for key, value in ckpt.state_dict.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise UserInputError(f"{ckpt.source}: {key} has shape {tuple(value.shape)} but the config gives "
                                 f"{tuple(expected[key].shape)} (args and weights disagree)")
    missing = sorted(set(expected) - set(ckpt.state_dict))
    if missing:
        raise UserInputError(f"{ckpt.source}: weights missing for {len(missing)} parameters of the model "
                             f"(first: {', '.join(missing[:3])})")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in ckpt.state_dict.items()}, strict=True)
    return model.eval(), ckpt


def import_checkpoint(backbone: str, path: str, out: str, variant: str | None = None,
                      say: Callable[[str], None] = print, gene_list: str | None = None) -> str:
    """Write `out`: safetensors, config.json with auto_map, the modeling code, vocab.json (the checkpoint's)."""
    from grnformer_ds.training.export import save_hf_folder

    t0 = time.time()
    model, ckpt = build_imported_model(backbone, path, variant, gene_list)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"read {ckpt.source}: {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers x "
        f"{model.config.hidden_size}, vocabulary of {len(ckpt.vocab):,} tokens")
    if ckpt.unused:
        groups = sorted({k.split(".")[0] + ".*" for k in ckpt.unused})
        say(f"not used: {len(ckpt.unused)} checkpoint keys ({', '.join(groups)}): no place in a masked-value model")
    with torch.no_grad():
        out_dir = save_hf_folder(model, ckpt.vocab, out)
    say(f"wrote {out_dir} ({time.time() - t0:.1f} s); continue pretraining with "
        f"deepspeed launchers/pretrain.py --init-from {out} --data STORE (a store built with "
        f"data_prep/build_store.py --gene-vocab {out}/vocab.json)")
    return out_dir


# ------------------------------------------------------------------------------------------------ --init-from
NEW_PARTS = ("grnformer.structure_encoder.", "grnformer.fusion.")  # what GRNFormer adds to a foundation model


def _read_json(path: str, what: str) -> dict:
    from grnformer_ds.errors import load_json_object

    return load_json_object(path, what)


def init_from_config(hf_dir: str, store, use_graph: bool, say: Callable[[str], None]):
    """(GRNFormerConfig, weights) to start a run from a Hugging Face folder (an import or one of our exports).

    The store must use the folder's vocabulary (same id for each of its tokens). When the store has GRN assets and
    the folder's model has no GRN parts, they are added after the last layer with beta = 0: the model's outputs equal
    the folder's until training moves beta (no layer is replaced, so no pretrained weight is dropped)."""
    import os

    from safetensors.torch import load_file

    from grnformer_ds.modeling import GRNFormerConfig
    from grnformer_ds.store.vocab import tokens_off_model_ids
    from grnformer_ds.training.integration import store_has_graphs

    for name in ("config.json", "vocab.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(hf_dir, name)):
            raise UserInputError(f"--init-from: {name} is missing (a folder written by import_checkpoint.py or "
                                 f"export_hf.py)", hf_dir)
    try:
        config = GRNFormerConfig.from_pretrained(hf_dir)
    except (ValueError, OSError) as exc:
        raise UserInputError(f"--init-from: {' '.join(str(exc).split())}", os.path.join(hf_dir, "config.json")) \
            from None
    vocab = _read_json(os.path.join(hf_dir, "vocab.json"), "gene vocabulary")
    store_vocab = dict(store.vocab)
    wrong = tokens_off_model_ids(store_vocab, vocab)
    if wrong:
        raise UserInputError(f"the store's vocabulary is not the model's ({len(wrong):,} of its {len(store_vocab):,} "
                             f"tokens differ, e.g. {wrong[0]!r}); rebuild the store with data_prep/build_store.py "
                             f"--gene-vocab {os.path.join(hf_dir, 'vocab.json')}", str(store.path))
    inputs = (getattr(store, "manifest", {}) or {}).get("inputs") or []
    mapped = [i.get("count_fraction_mapped") for i in inputs if i.get("count_fraction_mapped") is not None]
    if mapped:
        say(f"store counts on the model's {len(vocab):,}-token vocabulary: {min(mapped):.1%}"
            + (" (lowest input)" if len(mapped) > 1 else ""))
    graphs = use_graph and store_has_graphs(store)
    if graphs and not config.use_graph:
        config.use_graph = True
        config.fusion_position = "after"  # keep every pretrained layer
        config.fusion_beta_init = 0.0  # outputs = the foundation model's at step 0
    elif not graphs:
        if config.use_graph and config.fusion_position == "replace":
            why = "--no-graph" if store_has_graphs(store) else "the store has no GRN assets"
            raise UserInputError(f"{why}, but the model's GRN fusion replaces its last transformer layer "
                                 f"(fusion_position='replace'): without graphs it has no weights for that layer; "
                                 f"give a store with GRN assets (data_prep/build_grn.py) or a model trained with "
                                 f"fusion_position='after' or without graphs", hf_dir)
        config.use_graph = False
    config.validate_grnformer()
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    return config, weights


def load_init_weights(model, weights: dict, say: Callable[[str], None], head_prefixes: tuple[str, ...] = (),
                      flag: str = "--init-from") -> list[str]:
    """Load `weights` into `model`; returns the names of its parameters that were not in them (the new GRN parts,
    and a task head: `head_prefixes`). Anything else missing, or a shape that differs, is a one-line error."""
    new_parts = NEW_PARTS + tuple(head_prefixes)
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise UserInputError(f"{flag}: {bad[0]} has shape {tuple(weights[bad[0]].shape)}, the model "
                             f"{tuple(own[bad[0]].shape)}")
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    other = [k for k in missing if not k.startswith(new_parts)]
    if other:
        raise UserInputError(f"{flag}: no weights for {len(other)} parameters of the backbone (first: "
                             f"{other[0]})")
    skipped = [k for k in weights if k not in own]
    new = [n for n, _ in model.named_parameters() if n in set(missing)]
    parts = [what for what, prefixes in (("GRN structure encoder + fusion", NEW_PARTS), ("task head", head_prefixes))
             if prefixes and any(n.startswith(prefixes) for n in new)]
    beta = f", beta = {_beta(model):g}" if any(n.startswith(NEW_PARTS) for n in new) else ""
    groups = sorted({k.split(".")[0] if not k.startswith("grnformer.") else ".".join(k.split(".")[:2])
                     for k in skipped})
    say(f"init: {len(own) - len(missing):,} tensors from the folder, {len(new)} new parameters"
        + (f" ({', '.join(parts)}{beta})" if parts else "")
        + (f"; {len(skipped)} folder tensors not used ({', '.join(groups)})" if skipped else ""))
    return new


def _beta(model) -> float:
    fusion = model.grnformer.fusion
    return 0.0 if fusion is None else float(fusion.beta.detach().float().reshape(-1)[0])


def freeze_backbone(model) -> int:
    """Train only the GRN structure encoder, the fusion and the head: every other parameter of the base model stops
    requiring gradients. Returns how many parameters were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if name.startswith("grnformer.") and not name.startswith(NEW_PARTS):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
