"""scGPT 0.2.4's model code for the parity tests, imported without scgpt/__init__ (which pulls IPython, flash-attn,
torchtext ...), and checkpoint folders in scGPT's published format (best_model.pt, args.json, vocab.json)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
import warnings

import pytest
import torch


def scgpt_model_module():
    """`scgpt.model.model` (TransformerModel), or skip when scgpt==0.2.4 is not installed."""
    if "scgpt.model.model" not in sys.modules:
        pkg = sys.modules.get("scgpt")  # the tokenizer tests' bare package object (its __spec__ is None)
        if pkg is not None and getattr(pkg, "__path__", None):
            root = list(pkg.__path__)[0]
        else:
            spec = importlib.util.find_spec("scgpt")
            if spec is None:
                pytest.skip("scgpt==0.2.4 not installed (pip install --no-deps scgpt==0.2.4)")
            root = os.path.dirname(spec.origin)
        for name, path in (("scgpt", root), ("scgpt.model", os.path.join(root, "model"))):
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__path__ = [path]
                sys.modules[name] = module
        if not hasattr(sys.modules["scgpt"], "logger"):
            import logging

            sys.modules["scgpt"].logger = logging.getLogger("scgpt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not installed"
            importlib.import_module("scgpt.model.model")
    return sys.modules["scgpt.model.model"]


def make_scgpt(vocab: dict, d_model=32, nhead=4, d_hid=48, nlayers=3, style="continuous", n_bins=51, seed=0,
               mvc=True, randomize=True):
    """A scGPT TransformerModel (torch attention naming) with random weights everywhere (norms included)."""
    mm = scgpt_model_module()
    torch.manual_seed(seed)
    pad_value = n_bins if style == "category" else -2
    model = mm.TransformerModel(len(vocab), d_model, nhead, d_hid, nlayers, vocab=vocab, dropout=0.2,
                                pad_token="<pad>", pad_value=pad_value, do_mvc=mvc, input_emb_style=style,
                                n_input_bins=n_bins + 2, cell_emb_style="cls", use_fast_transformer=False)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.3, 0.3)
    return model.eval()


def write_scgpt_folder(model, vocab: dict, folder, naming: str = "torch", style="continuous", n_bins=51,
                       nlayers=None) -> str:
    """The model in scGPT's published checkpoint format. naming "flash": attention as flash-attn's Wqkv (the
    whole-human checkpoint), "torch": as torch's in_proj."""
    os.makedirs(folder, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if naming == "flash":
            k = k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
                "self_attn.in_proj_bias", "self_attn.Wqkv.bias")
        state[k] = v.clone()
    torch.save(state, os.path.join(folder, "best_model.pt"))
    args = {"embsize": model.d_model, "nheads": model.transformer_encoder.layers[0].self_attn.num_heads,
            "d_hid": model.transformer_encoder.layers[0].linear1.out_features,
            "nlayers": nlayers or len(model.transformer_encoder.layers), "dropout": 0.2, "n_bins": n_bins,
            "pad_token": "<pad>", "pad_value": n_bins if style == "category" else -2,
            "mask_value": n_bins + 1 if style == "category" else -1, "input_emb_style": style,
            "fast_transformer": naming == "flash", "MVC": True}
    with open(os.path.join(folder, "args.json"), "w") as fh:
        json.dump(args, fh)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    return str(folder)


def scgpt_batch(vocab: dict, lengths, n_bins=51, style="continuous", seed=1):
    """<cls> + genes with binned values, some masked, padded: (input_ids, values, mask (True = real))."""
    g = torch.Generator().manual_seed(seed)
    genes = [i for t, i in vocab.items() if not t.startswith("<")]
    bsz, seqlen = len(lengths), max(lengths)
    mask_value = n_bins + 1 if style == "category" else -1
    pad_value = n_bins if style == "category" else -2
    ids = torch.full((bsz, seqlen), vocab["<pad>"], dtype=torch.long)
    values = torch.full((bsz, seqlen), float(pad_value))
    mask = torch.zeros(bsz, seqlen, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pick = torch.tensor(genes)[torch.randperm(len(genes), generator=g)[: n - 1]]
        ids[b, 0], ids[b, 1:n] = vocab["<cls>"], pick
        values[b, 0] = 0.0
        values[b, 1:n] = torch.randint(1, n_bins, (n - 1,), generator=g).float()
        masked = torch.rand(n - 1, generator=g) < 0.3
        values[b, 1:n][masked] = float(mask_value)
        mask[b, :n] = True
    return ids, values, mask
