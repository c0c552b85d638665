"""scFoundation's own model code (MaeAutobin, PerformerModule, pytorchTransformerModule), as the omicverse 2.3.2 wheel
ships it under omicverse/llm/scfoundation/pretrainmodels/, imported as a standalone package (omicverse's __init__ pulls
scanpy, plotting and half of PyPI), and `models.ckpt` files in BioMap's published layout with random weights."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import pytest
import torch

_PKG = "scfoundation_pretrainmodels"


def scfoundation_modules():
    """The reference package (select_model, mae_autobin, performer), or skip when it cannot be imported."""
    if _PKG not in sys.modules:
        spec = importlib.util.find_spec("omicverse")
        if spec is None:
            pytest.skip("omicverse==2.3.2 not installed (pip install --no-deps omicverse==2.3.2)")
        if importlib.util.find_spec("local_attention") is None or importlib.util.find_spec("einops") is None:
            pytest.skip("scFoundation's performer.py imports local_attention and einops (pip install --no-deps "
                        "'local-attention<1.10' einops)")
        root = os.path.join(os.path.dirname(spec.origin), "llm", "scfoundation", "pretrainmodels")
        pkg_spec = importlib.util.spec_from_file_location(_PKG, os.path.join(root, "__init__.py"),
                                                          submodule_search_locations=[root])
        module = importlib.util.module_from_spec(pkg_spec)
        sys.modules[_PKG] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp.autocast deprecation
            pkg_spec.loader.exec_module(module)
    return sys.modules[_PKG]


def scfoundation_config(n_genes: int, decoder: str = "performer", hidden=32, depth=2, heads=4, dec_hidden=24,
                        dec_depth=2, dec_heads=3) -> dict:
    """A MaeAutobin config in the nested layout of models.ckpt (model, model_config.mae_autobin, dataset_config)."""
    seq_len = n_genes + 2
    return {
        "model": "mae_autobin",
        "model_config": {"mae_autobin": {
            "encoder": {"hidden_dim": hidden, "depth": depth, "heads": heads, "dim_head": hidden // heads,
                        "seq_len": seq_len, "module_type": "transformer", "norm_first": False},
            "decoder": {"hidden_dim": dec_hidden, "depth": dec_depth, "heads": dec_heads,
                        "dim_head": dec_hidden // dec_heads, "seq_len": seq_len, "module_type": decoder},
            "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 20, "bin_alpha": 1.0,
            "seq_len": seq_len, "model": "mae_autobin"}},
        "dataset_config": {"rnaseq": {"bin_type": "auto_bin", "bin_num": 20, "value_mask_prob": 0.3}},
    }


def flat_config(config: dict) -> dict:
    """The flat dict scFoundation's `select_model` takes (as its loader's `convertconfig` builds it)."""
    return {**config["model_config"]["mae_autobin"], **config["dataset_config"]["rnaseq"]}


def make_maeautobin(config: dict, seed: int = 0, randomize: bool = True):
    """MaeAutobin with random weights everywhere (norms and the Performer projections included; `randomize=False`
    keeps torch's default init), eval mode."""
    ref = scfoundation_modules()
    torch.manual_seed(seed)
    model = ref.select_model(flat_config(config))
    if not randomize:
        return model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-0.25, 0.25) if p.dim() > 1 else p.uniform_(0.7, 1.3) if "norm" in name else \
                p.uniform_(-0.1, 0.1)
    return model.eval()


def write_models_ckpt(path, models: dict) -> str:
    """models.ckpt as BioMap publishes it: {variant: {"config": ..., "state_dict": {"model." + key: tensor}}}."""
    ckpt = {variant: {"config": config, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
            for variant, (model, config) in models.items()}
    torch.save(ckpt, path)
    return str(path)


def write_gene_list(path, genes) -> str:
    """OS_scRNA_gene_index.19264.tsv's layout: gene_name, index."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(genes)))
    return str(path)


def reference_cell(model, values: torch.Tensor, masked: torch.Tensor, total_counts: torch.Tensor,
                   mask_value: float = 102.0):
    """MaeAutobin on one cell, as its pretraining feeds it: the encoder gets the nonzero unmasked genes and T, S; the
    decoder every gene (mask_value at masked genes) and T, S.

    values (G,) expression, masked (G,) bool, total_counts (2,) = (T, S). Returns (predictions (G,), cell embedding
    (4H,) = concat(S, T, max, mean) as scFoundation's get_embedding with pool_type "all")."""
    full = torch.cat([torch.where(masked, torch.full_like(values, mask_value), values), total_counts]).float()
    enc_labels = torch.cat([(values > 0) & ~masked, torch.ones(2, dtype=torch.bool)])
    pos_ids = enc_labels.nonzero().flatten()
    x = full[enc_labels][None]
    padding = torch.zeros_like(x, dtype=torch.bool)
    n = full.shape[0]
    with torch.no_grad():
        pred = model(x=x, padding_label=padding, encoder_position_gene_ids=pos_ids[None],
                     encoder_labels=enc_labels[None], decoder_data=full[None].clone(), mask_gene_name=False,
                     mask_labels=None, decoder_position_gene_ids=torch.arange(n)[None],
                     decoder_data_padding_labels=torch.zeros(1, n, dtype=torch.bool))
        h = model.token_emb(x.unsqueeze(2), output_weight=0) + model.pos_emb(pos_ids[None])
        states = model.encoder(h, padding)[0]
    cell = torch.cat([states[-1], states[-2], states[:-2].max(0).values, states[:-2].mean(0)])
    return pred[0, :-2], cell
