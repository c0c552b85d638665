"""Export a ZeRO checkpoint (stage 1/2/3, any number of ranks) to a Hugging Face `save_pretrained` folder.

The folder holds `model.safetensors` (fp32 master weights, consolidated), `config.json` with `auto_map`, the
modeling code (copied by transformers' `custom_object_save` from `grnformer_ds/modeling/`, which only uses relative
imports) and `vocab.json` (the gene vocabulary). It loads offline without grnformer_ds installed:

    AutoModelForMaskedLM.from_pretrained(HF_DIR, trust_remote_code=True)                  # a pretraining run
    AutoModelForSequenceClassification.from_pretrained(HF_DIR, trust_remote_code=True)    # a cell-level fine-tune

A run records what the export needs next to its checkpoints: `model_config.json` (the GRNFormerConfig, whose
`architectures` names the run's model class, set by its task) and `vocab.json`, in the checkpoints folder.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from grnformer_ds.errors import UserInputError
from grnformer_ds.training import checkpoint as ckpt

MODEL_CONFIG = "model_config.json"
VOCAB = "vocab.json"


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoints root, tag) for a run's output dir, its `checkpoints/` dir, one tag dir, or a runs root such as
    `runs/demo` (its `latest` run, run_dir.py)."""
    from grnformer_ds.training.run_dir import latest_run

    if not os.path.isdir(path):
        raise UserInputError("checkpoint directory not found", path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        path = latest_run(path) or path
    if os.path.isfile(os.path.join(path, ckpt.COMPLETE)):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    for root in (path, os.path.join(path, "checkpoints")):
        tag = ckpt.find_latest(root)
        if tag is not None:
            return root, tag
    raise UserInputError("no complete checkpoint here (expected a run output dir, its checkpoints/ dir or a "
                         "global_stepN dir with a COMPLETE marker)", path)


def write_run_assets(ckpt_root: str, config, vocab: dict[str, int], model_class=None) -> None:
    """Record the model config (with `architectures` = the run's model class) and the gene vocabulary next to the
    checkpoints (rank 0, once per run)."""
    os.makedirs(ckpt_root, exist_ok=True)
    if model_class is not None:
        config.architectures = [model_class.__name__]
    ckpt.atomic_write_text(os.path.join(ckpt_root, MODEL_CONFIG), config.to_json_string())
    ckpt.atomic_write_text(os.path.join(ckpt_root, VOCAB), json.dumps(vocab, indent=0, sort_keys=False))


def load_run_assets(ckpt_root: str):
    """(GRNFormerConfig, vocab) recorded by `write_run_assets`."""
    from grnformer_ds.modeling import GRNFormerConfig

    cfg_path = os.path.join(ckpt_root, MODEL_CONFIG)
    if not os.path.isfile(cfg_path):
        raise UserInputError(f"{MODEL_CONFIG} is missing; was this checkpoint written by launchers/pretrain.py?",
                             ckpt_root)
    try:
        config = GRNFormerConfig.from_json_file(cfg_path)
    except ValueError as exc:  # e.g. a plug-in backbone whose module cannot be imported here
        raise UserInputError(" ".join(str(exc).split()), cfg_path) from None
    with open(os.path.join(ckpt_root, VOCAB), encoding="utf-8") as fh:
        vocab = json.load(fh)
    return config, vocab


def save_hf_folder(model, vocab: dict[str, int], out_dir: str) -> str:
    """`save_pretrained` with remote code + `vocab.json`. Writes to `<out>.tmp` then renames (no half folder)."""
    from grnformer_ds.modeling import AUTO_CLASSES

    model.config.register_for_auto_class()
    type(model).register_for_auto_class(AUTO_CLASSES[type(model)])
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, VOCAB), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, indent=0)
    # The modeling package is flat (relative imports only); copy every module so that imports the class file makes
    # lazily (e.g. optional attention kernels) resolve too.
    import grnformer_ds.modeling as modeling_pkg

    pkg_dir = os.path.dirname(modeling_pkg.__file__)
    for name in sorted(os.listdir(pkg_dir)):
        if name.endswith(".py") and name != "__init__.py" and not os.path.exists(os.path.join(tmp, name)):
            shutil.copy2(os.path.join(pkg_dir, name), os.path.join(tmp, name))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def restore_frozen_weights(ckpt_root: str, state: dict) -> int:
    """A --freeze-backbone run keeps no fp32 master copy of its frozen weights (DeepSpeed holds them in the training
    dtype only, e.g. bf16): put back the --init-from folder's own values, where the checkpoint's are exactly those
    values in the training dtype (so nothing that trained is replaced). Returns how many tensors were restored."""
    settings_path = os.path.join(os.path.dirname(os.path.abspath(ckpt_root)), "run_settings.resolved.json")
    if not os.path.isfile(settings_path):
        return 0
    with open(settings_path, encoding="utf-8") as fh:
        settings = json.load(fh)
    init_from = settings.get("init_from")
    weights_file = os.path.join(init_from or "", "model.safetensors")
    if not (settings.get("freeze_backbone") and init_from and os.path.isfile(weights_file)):
        return 0
    from safetensors.torch import load_file

    from grnformer_ds.training.importing import NEW_PARTS

    init, restored = load_file(weights_file), 0
    for key, value in state.items():
        original = init.get(key)
        if original is None or not key.startswith("grnformer.") or key.startswith(NEW_PARTS):
            continue
        # the frozen value as the run held it: itself (fp32 runs) or rounded to the training dtype
        if original.shape == value.shape and any(torch.equal(original.to(dtype).float(), value.float())
                                                 for dtype in (torch.float32, torch.bfloat16, torch.float16)):
            state[key] = original
            restored += 1
    return restored


def export_checkpoint(checkpoint: str, out_dir: str, tag: str | None = None) -> str:
    """Consolidate the checkpoint's fp32 weights, load them (strictly) into the run's model class (its config's
    `architectures`; `GRNFormerForMaskedLM` for runs that did not record one) and save the HF folder. Returns
    `out_dir`."""
    from grnformer_ds.modeling import model_class
    from grnformer_ds.training.engine import consolidate_fp32

    root, found = resolve_checkpoint(checkpoint)
    tag = tag or found
    config, vocab = load_run_assets(root)
    state = consolidate_fp32(root, tag)
    restore_frozen_weights(root, state)
    try:
        cls = model_class((config.architectures or ["GRNFormerForMaskedLM"])[0])
    except ValueError as exc:
        raise UserInputError(str(exc), os.path.join(root, MODEL_CONFIG)) from None
    model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied/shared parameters are stored once by DeepSpeed; anything else missing is a real mismatch.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserInputError(f"checkpoint does not match the model config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}", os.path.join(root, tag))
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise UserInputError("checkpoint holds non-finite weights", os.path.join(root, tag))
    model.eval()
    return save_hf_folder(model, vocab, out_dir)
