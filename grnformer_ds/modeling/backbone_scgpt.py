"""The scGPT-style backbone (Cui et al., Nat Methods 2024): one token per expressed gene, `<cls>` first.

Token = LayerNorm(gene embedding) + value embedding of the binned expression (continuous MLP by default, or one
embedding per bin); cell embedding = the `<cls>` state; head = scGPT's MLP expression decoder per token (+ the
optional GEPC/MVC loss from the cell embedding, `use_mvc`). Everything here is `Backbone`'s default layout (dummy
batch included), so this file only names it and imports scGPT's checkpoints. Tokenization:
`grnformer_ds.data.scgpt_collator`.
"""
from __future__ import annotations

import torch

from .backbone_base import Backbone, ImportedCheckpoint, map_torch_encoder_layer, register_backbone


@register_backbone
class ScGPTBackbone(Backbone):
    name = "scgpt"
    uses_mvc = True

    def import_checkpoint(self, path: str, variant: str | None = None, gene_list: str | None = None):
        """scGPT's checkpoint folder (best_model.pt, args.json, vocab.json; `import_scgpt`)."""
        if variant is not None:
            raise ValueError(f"--variant {variant!r}: scGPT checkpoints have no variants")
        if gene_list is not None:
            raise ValueError("--gene-list: an scGPT checkpoint folder has its own vocab.json")
        return import_scgpt(path)


# ---------------------------------------------------------------------------------------------------- scGPT files
# scGPT's TransformerModel parameter names -> ours (GRNFormerForMaskedLM). The attention block comes in two namings:
# torch's `in_proj_weight` / `in_proj_bias` (use_fast_transformer=False) and flash-attn's `Wqkv.weight` / `Wqkv.bias`
# (the published whole-human checkpoint); both hold the q; k; v rows in that order.
_SCGPT_DIRECT = {
    "encoder.embedding.weight": "grnformer.gene_encoder.embedding.weight",
    "encoder.enc_norm.weight": "grnformer.gene_encoder.norm.weight",
    "encoder.enc_norm.bias": "grnformer.gene_encoder.norm.bias",
}
_SCGPT_PREFIXES = {
    "value_encoder.enc_norm.": "grnformer.value_encoder.norm.",  # category style
    "value_encoder.": "grnformer.value_encoder.",
    "decoder.fc.": "expr_decoder.fc.",
    "mvc_decoder.gene2query.": "mvc_decoder.gene2query.",
    "mvc_decoder.W.": "mvc_decoder.W.",
}


def _read_scgpt_folder(path: str):
    import json
    import os

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (an scGPT checkpoint folder holds best_model.pt, "
                                f"args.json, vocab.json)")
    files = {}
    for name in ("args.json", "vocab.json"):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{full}: missing (an scGPT checkpoint folder holds best_model.pt, args.json, "
                                    f"vocab.json)")
        try:
            with open(full, encoding="utf-8") as fh:
                files[name] = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{full}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    weights = [n for n in ("best_model.pt", "model.pt") if os.path.isfile(os.path.join(path, n))]
    if not weights:
        raise FileNotFoundError(f"{os.path.join(path, 'best_model.pt')}: missing (the scGPT state dict)")
    full = os.path.join(path, weights[0])
    try:
        state = torch.load(full, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: one line, whatever torch raised
        raise ValueError(f"{full}: cannot be read as a torch state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{full}: not an scGPT state dict (expected parameter name -> tensor)")
    return files["args.json"], files["vocab.json"], state, full


def map_scgpt_state_dict(state: dict) -> tuple[dict, list[str], bool]:
    """scGPT TransformerModel state dict -> (ours, unused keys, has_mvc). Raises ValueError on an unknown layout."""
    ours, unused = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key in _SCGPT_DIRECT:
            ours[_SCGPT_DIRECT[key]] = value
            continue
        if key.startswith("transformer_encoder.layers."):
            i, rest = key[len("transformer_encoder.layers."):].split(".", 1)
            if not map_torch_encoder_layer(rest, value, f"grnformer.layers.{i}.", ours):
                unused.append(key)
            continue
        for theirs, mine in _SCGPT_PREFIXES.items():
            if key.startswith(theirs):
                ours[mine + key[len(theirs):]] = value
                break
        else:
            unused.append(key)
    if "grnformer.gene_encoder.embedding.weight" not in ours or not any(".self_attn.q_proj." in k for k in ours):
        raise ValueError("not an scGPT TransformerModel state dict (no encoder.embedding.weight or no "
                         "transformer_encoder.layers.*.self_attn weights)")
    # scGPT's ExprDecoder with explicit_zero_prob adds zero_logit layers: not part of our head
    unused += [k for k in list(ours) if k.startswith("expr_decoder.fc.") and k.split(".")[2] not in ("0", "2", "4")]
    for k in unused:
        ours.pop(k, None)
    return ours, unused, any(k.startswith("mvc_decoder.") for k in ours)


def import_scgpt(path: str) -> ImportedCheckpoint:
    """An scGPT checkpoint folder (best_model.pt, args.json, vocab.json) -> `ImportedCheckpoint`."""
    args, vocab, state, weights_file = _read_scgpt_folder(path)
    try:
        ours, unused, has_mvc = map_scgpt_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{weights_file}: {exc}") from None
    pad_token = args.get("pad_token", "<pad>")
    for token in (pad_token, "<cls>"):
        if token not in vocab:
            raise ValueError(f"{path}/vocab.json: has no {token!r} token")
    n_layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("grnformer.layers."))
    style = args.get("input_emb_style", "continuous")
    if style not in ("continuous", "category"):
        raise ValueError(f"{path}/args.json: input_emb_style {style!r} is not supported (continuous, category)")
    emb = ours["grnformer.gene_encoder.embedding.weight"]
    hidden = int(args.get("embsize", args.get("layer_size", emb.shape[1])))
    config = {
        "vocab_size": int(emb.shape[0]), "hidden_size": hidden, "num_hidden_layers": int(args.get("nlayers", n_layers)),
        "num_attention_heads": int(args.get("nheads", args.get("nhead", 8))),
        "intermediate_size": int(args.get("d_hid", ours["grnformer.layers.0.ffn.linear1.weight"].shape[0])),
        "hidden_dropout_prob": float(args.get("dropout", 0.2)),
        "attention_probs_dropout_prob": float(args.get("dropout", 0.2)),
        "norm_first": bool(args.get("pre_norm", False)), "hidden_act": "relu", "layer_norm_eps": 1e-5,
        "pad_token_id": int(vocab[pad_token]), "cls_token_id": int(vocab["<cls>"]),
        "n_bins": int(args.get("n_bins", 51)), "mask_value": float(args.get("mask_value", -1)),
        "pad_value": float(args.get("pad_value", -2)), "use_mvc": has_mvc,
        "value_encoding": "categorical" if style == "category" else "continuous",
    }
    if n_layers != config["num_hidden_layers"]:
        raise ValueError(f"{path}/args.json: nlayers={config['num_hidden_layers']} but {weights_file} has "
                         f"{n_layers} transformer layers")
    if hidden != emb.shape[1]:
        raise ValueError(f"{path}/args.json: embsize={hidden} but {weights_file} has embeddings of width "
                         f"{emb.shape[1]}")
    return ImportedCheckpoint(config=config, state_dict=ours, vocab={str(k): int(v) for k, v in vocab.items()},
                              unused=unused, source=weights_file)
