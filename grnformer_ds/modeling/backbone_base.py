"""What a backbone is, and the registry that names them.

A backbone is everything that differs between RNA foundation models (scGPT, scFoundation, scPaLM, a user's own):
the config defaults it sets, its embedding modules and how input slots become encoder tokens (extra tokens such as
`<cls>` or scFoundation's T / S, gene patches), how GRN structure states reach those tokens as fusion keys, how token
states pool into a cell embedding, its pretraining head and loss, and its dummy inputs. The shared pieces (attention
dispatch, encoder layers, GNN structure encoder, fusion adapter, final norm) stay in `modeling_grnformer`; a backbone
adds code only for what is really different.

A backbone is a subclass of `Backbone` registered under its name (`register_backbone`); `GRNFormerConfig.backbone`
selects it. Its data side (the collator that tokenizes cells for it) is registered under the same name in
`grnformer_ds.data.collators`. A backbone defined outside the package registers itself when its module is imported
(`--plugin MODULE` on the command line); the config records that module (`backbone_module`) so that a saved model
finds its backbone again when loaded. docs/backbones.md has a complete small example.

The default methods here are the scGPT layout (tokens = the batch's input slots, `<cls>` first); other backbones
override what differs. Every method gets the model it builds or serves (modules live on the model, so state-dict
keys stay the model's own) and is stateless.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .attention import PackedSequences
from .layout import Embedded, packed_token_cells, pool
from .presets import PRESETS

_REGISTRY: dict[str, type["Backbone"]] = {}


@dataclass
class ImportedCheckpoint:
    """A checkpoint in another project's format, read and mapped by its backbone (`Backbone.import_checkpoint`).

    config: `GRNFormerConfig` fields (sizes, vocabulary ids, value encoding ...). state_dict: the weights under
    `GRNFormerForMaskedLM`'s names. vocab: the checkpoint's gene vocabulary {token: id}. unused: checkpoint keys
    that have no place in the model (e.g. a classification head), reported, not fatal. source: what was read."""

    config: dict
    state_dict: dict
    vocab: dict
    unused: list = field(default_factory=list)
    source: str = ""


# torch.nn.TransformerEncoderLayer's parameter names (scGPT's and scFoundation's encoders) -> `layers.GRNFormerLayer`'s
_TORCH_LAYER = {"self_attn.out_proj.": "self_attn.o_proj.", "linear1.": "ffn.linear1.", "linear2.": "ffn.linear2.",
                "norm1.": "norm1.", "norm2.": "norm2."}
_FUSED_QKV = ("self_attn.in_proj_weight", "self_attn.in_proj_bias",  # torch
              "self_attn.Wqkv.weight", "self_attn.Wqkv.bias")  # flash-attn (scGPT's published checkpoints)


def map_torch_encoder_layer(rest: str, value: torch.Tensor, base: str, ours: dict) -> bool:
    """Put one key of a torch-style encoder layer (`rest`: the name after the layer index) into `ours` under `base`
    (e.g. "grnformer.layers.3."); the fused q; k; v rows are split into q_proj / k_proj / v_proj. False when the key
    is not one of the layer's (the caller reports it as unused)."""
    if rest in _FUSED_QKV:
        kind = "weight" if rest.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            ours[f"{base}self_attn.{name}.{kind}"] = part.clone()
        return True
    for theirs, mine in _TORCH_LAYER.items():
        if rest.startswith(theirs):
            ours[base + mine + rest[len(theirs):]] = value
            return True
    return False


class Backbone:
    """The backbone-specific part of a GRNFormer model; subclass it and decorate with `register_backbone`.

    Class attributes:
        name: the `GRNFormerConfig.backbone` value that selects it.
        defaults: `GRNFormerConfig` fields this backbone sets when the config leaves them None (value_encoding,
            final_layer_norm, cell_embedding_pooling, ...).
        poolings: the `cell_embedding_pooling` values it supports.
        lead_slots: special tokens at the start of each cell's packed segment (`<cls>` = 1, T and S = 2).
        model_inputs / head_inputs: forward arguments (batch keys) it needs beyond the shared ones, for the base
            model / for the pretraining head; a batch key that no backbone declares is refused.
        uses_mvc: whether `use_mvc` (scGPT's GEPC loss) applies.
        static_shapes: whether a packed batch padded to a fixed token budget gives fixed shapes (`--compile`).
        presets: named size presets this backbone adds to `GRNFormerConfig.from_preset` (each sets `backbone`).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict] = {"value_encoding": "continuous", "final_layer_norm": False,
                                "cell_embedding_pooling": "cls"}
    poolings: ClassVar[tuple[str, ...]] = ("cls", "mean", "max")
    lead_slots: ClassVar[int] = 1
    model_inputs: ClassVar[tuple[str, ...]] = ()
    head_inputs: ClassVar[tuple[str, ...]] = ()
    uses_mvc: ClassVar[bool] = False
    static_shapes: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict]] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def all_defaults(cls) -> dict:
        """`defaults` merged along the class hierarchy (a subclass names only what it changes)."""
        merged: dict = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("defaults", {}))
        return merged

    def validate(self, config) -> None:
        """Raise a one-line ValueError for a config this backbone cannot run (called by `GRNFormerConfig`)."""
        if config.cell_embedding_pooling not in self.poolings:
            raise ValueError(f"GRNFormerConfig: cell_embedding_pooling={config.cell_embedding_pooling!r} is not one "
                             f"of {list(self.poolings)} for backbone={self.name!r}")
        if config.use_mvc and not self.uses_mvc:
            raise ValueError(f"GRNFormerConfig: use_mvc=True is scGPT's GEPC loss; backbone={self.name!r} has none")

    # ------------------------------------------------------------------ modules
    def build_embeddings(self, model, config) -> None:
        """Attach the embedding modules to `model` (a `GRNFormerModel`); the shared ones are built by the model."""
        from .embeddings import GeneEncoder, build_value_encoder

        model.gene_encoder = GeneEncoder(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         config.layer_norm_eps, use_norm=True)
        model.value_encoder = build_value_encoder(config)

    def build_head(self, lm, config) -> None:
        """Attach the pretraining head's modules to `lm` (a `GRNFormerForMaskedLM`)."""
        from .heads import ExprDecoder, MVCDecoder

        lm.expr_decoder = ExprDecoder(config.hidden_size)
        lm.mvc_decoder = MVCDecoder(config.hidden_size) if config.use_mvc else None

    def init_weights(self, module, config) -> bool:
        """Initialise a module of this backbone's own kind; True when handled (after HF's default init)."""
        return False

    # ------------------------------------------------------------------ encoder side
    def embed(self, model, input_ids, values, attention_mask, packed: dict | None, inputs: dict) -> Embedded:
        """Input slots -> encoder tokens. Padded: input_ids / values (B, L), attention_mask (B, L) bool. Packed:
        (1, T) with `packed` = {cu_seq_lens (S+1,), max_length, n_cells, padded_view (bool)}. `inputs`: the values
        of `model_inputs`."""
        gene_emb = model.gene_encoder(input_ids)
        tokens = gene_emb + model.value_encoder(values)
        node_features = tokens if model.config.gnn_node_input == "gene+value" else gene_emb
        if packed is None:
            bsz, seqlen = input_ids.shape
            slots = torch.arange(seqlen, device=input_ids.device)
            return Embedded(tokens=tokens, mask=attention_mask, seq=None,
                            gene_tokens=attention_mask & (slots >= self.lead_slots)[None, :],
                            node_features=node_features.reshape(bsz * seqlen, -1), n_cells=bsz)
        total = input_ids.shape[1]
        seq = PackedSequences.build(packed["cu_seq_lens"], packed["max_length"], total,
                                    with_padded_view=packed["padded_view"])
        n_cells = packed["n_cells"]
        seq_ids, is_gene = packed_token_cells(seq.cu_seqlens, n_cells, total, self.lead_slots, seq.seq_ids)
        return Embedded(tokens=tokens, mask=None, seq=seq, gene_tokens=is_gene, node_features=node_features[0],
                        n_cells=n_cells, starts=seq.cu_seqlens[:n_cells].to(torch.int64), seq_ids=seq_ids)

    def fusion_keys(self, model, emb: Embedded, structure_states: torch.Tensor):
        """Structure states (N, H) of the graph nodes -> the fusion's keys: (kv, key_mask, kv_seq) with kv
        (B, Lk, H) + key_mask (B, Lk) padded, or kv (1, Tk, H) + kv_seq (`PackedSequences`) packed."""
        if emb.packed:
            return structure_states.unsqueeze(0), None, emb.seq
        bsz = emb.tokens.shape[0]
        return structure_states.reshape(bsz, -1, structure_states.shape[-1]), emb.mask, None

    def structure_output(self, emb: Embedded, structure_states: torch.Tensor) -> torch.Tensor:
        """The node states as returned to the user: (B, L, H) padded, (1, T, H) packed (one per input slot)."""
        if emb.packed:
            return structure_states.unsqueeze(0)
        return structure_states.reshape(emb.n_cells, -1, structure_states.shape[-1])

    def cell_embedding_size(self, config) -> int:
        """H', the width of `cell_embedding` (what a task head on the cell embedding takes)."""
        return config.hidden_size

    def cell_embedding(self, model, emb: Embedded, states: torch.Tensor) -> torch.Tensor:
        """Token states (B, Lt, H) padded / (Tt, H) packed -> (B, H') cell embedding."""
        return pool(states, emb, model.config.cell_embedding_pooling)

    def outputs(self, model, emb: Embedded, hidden: torch.Tensor) -> dict:
        """The base model's outputs from the final token states: last_hidden_state, cell_embedding and any of the
        backbone's own `GRNFormerModelOutput` fields."""
        if emb.packed:
            return {"last_hidden_state": hidden, "cell_embedding": self.cell_embedding(model, emb, hidden[0])}
        return {"last_hidden_state": hidden[:, emb.out_slice:],
                "cell_embedding": self.cell_embedding(model, emb, hidden)}

    # ------------------------------------------------------------------ pretraining head
    def head(self, lm, enc, emb: Embedded, input_ids: torch.Tensor, inputs: dict) -> dict:
        """The head on the encoder output `enc` (`GRNFormerModelOutput`): a dict with "predictions" (aligned with the
        batch's labels), "gene_embeddings" and whatever else this backbone's `loss_terms` reads. `inputs`: the values
        of `head_inputs`."""
        predictions = lm.expr_decoder(enc.last_hidden_state)
        out = {"predictions": predictions, "gene_embeddings": enc.last_hidden_state}
        if lm.mvc_decoder is not None:
            token_cells = emb.seq_ids.clamp(max=max(emb.n_cells - 1, 0)) if emb.packed else None
            out["mvc_predictions"] = lm.mvc_decoder(enc.cell_embedding, lm.grnformer.gene_encoder(input_ids),
                                                    token_cells)
        return out

    def loss_terms(self, lm, head_out: dict, enc, labels: torch.Tensor, num_items_in_batch) -> dict:
        """Named loss terms (summed into the loss): "mlm" (masked-value MSE) first."""
        from .losses import masked_mse_loss

        terms = {"mlm": masked_mse_loss(head_out["predictions"], labels, num_items_in_batch)}
        if head_out.get("mvc_predictions") is not None:
            terms["mvc"] = masked_mse_loss(head_out["mvc_predictions"], labels, num_items_in_batch)
        return terms

    def encoder_lengths(self, config, slots: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of cells with ``slots`` input slots each (int64 tensor; scFoundation's T / S counted in
        the slots), for throughput and FLOP counts: one token per slot."""
        return slots

    # ------------------------------------------------------------------ other projects' checkpoints
    def import_checkpoint(self, path: str, variant: str | None = None,
                          gene_list: str | None = None) -> ImportedCheckpoint:
        """Read a checkpoint written by this backbone's reference project and map it onto our names. `variant`: which
        model of a multi-model file; `gene_list`: the gene order, for formats that do not store it. Errors are
        one-line `ValueError` / `FileNotFoundError` naming the file and the problem."""
        raise ValueError(f"backbone {self.name!r} has no checkpoint importer")

    # ------------------------------------------------------------------ inputs
    def dummy_batch(self, config, gen, bsz, seqlen, n_genes, lengths, mask_ratio, first_gene_id, graphs,
                    edges_per_cell) -> dict:
        """A small random batch with this backbone's keys (`dummy_inputs.make_dummy_batch`); here scGPT's:
        `<cls>` + binned gene values, masked slots at mask_value with a label (at least one per cell)."""
        from .dummy_graphs import add_graphs

        mask = torch.zeros(bsz, seqlen, dtype=torch.bool)
        for b, n in enumerate(lengths):
            mask[b, :n] = True
        cols = torch.stack([torch.randperm(n_genes, generator=gen)[:seqlen] for _ in range(bsz)])
        input_ids = cols + first_gene_id
        input_ids[:, 0] = config.cls_token_id
        values = torch.randint(1, config.n_bins, (bsz, seqlen), generator=gen).float()
        values[:, 0] = 0.0
        labels = torch.full((bsz, seqlen), -100.0)
        is_masked = (torch.rand(bsz, seqlen, generator=gen) < mask_ratio) & mask
        is_masked[:, 0] = False
        is_masked[:, 1] = True  # at least one masked position per cell
        labels[is_masked] = values[is_masked]
        values[is_masked] = config.mask_value
        input_ids[~mask] = config.pad_token_id
        values[~mask] = config.pad_value
        batch = dict(input_ids=input_ids, values=values, attention_mask=mask, labels=labels)
        if graphs:
            add_graphs(batch, gen, mask, self.lead_slots, edges_per_cell)
        return batch


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make `cls` selectable as `GRNFormerConfig(backbone=cls.name)`."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"backbone class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    for preset, fields in cls.presets.items():
        PRESETS[preset] = {**fields, "backbone": cls.name}
    return cls


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str, module: str | None = None) -> Backbone:
    """The registered backbone `name`, importing `module` first when it is not registered yet (a plug-in)."""
    if name not in _REGISTRY and module:
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"GRNFormerConfig: backbone {name!r} comes from module {module!r}, which cannot be "
                             f"imported ({exc})") from None
        # a model loaded with trust_remote_code has its own copy of this registry: take the class from the module
        for obj in vars(imported).values():
            if isinstance(obj, type) and getattr(obj, "name", None) == name and hasattr(obj, "embed"):
                _REGISTRY.setdefault(name, obj)
    if name not in _REGISTRY:
        raise ValueError(f"GRNFormerConfig: backbone={name!r} is not one of {backbone_names()} (a plug-in backbone "
                         f"registers itself when its module is imported: --plugin MODULE)")
    return _REGISTRY[name]()
