"""GRNFormer models in HF transformers style: `GRNFormerModel` (backbone encoder + GRN fusion),
`GRNFormerForMaskedLM` (+ the backbone's pretraining head) and `GRNFormerForCellClassification` (+ a classifier on the
cell embedding; fine-tuning).

The shared pieces live here: encoder layers (one attention dispatch), the torch-geometric structure encoder, the
fusion adapter, the final norm, the loss sum. What differs between backbones (embeddings, extra tokens, how structure
states reach tokens, pooling, head, extra inputs) is the config's registered `backbone_base.Backbone`, called at
fixed points of the forward; no backbone name is tested here.

Forward arguments are the batch keys of docs/design.md section 3, so `model(**batch)` works for every backbone and
both layouts: `input_ids`, `values`, `attention_mask` (padded) or `cu_seq_lens_q/k`, `max_length_q/k` (packed),
`labels`, the backbone's own keys (scFoundation's `total_counts`, `decoder_values`, `decoder_input_ids`; a plug-in's
through `**backbone_inputs`), the graphs (`celltype_edge_index`, `celltype_edge_weight`, `cell_edge_index`,
`cell_edge_weight`, `graph_layout`, `batch`, `ptr`) and the bookkeeping keys `cell_index`, `cell_type_ids` (accepted;
in the packed layout `cell_index` tells real cells from dummy segments).

Padded layout: (B, L) tokens, the reference. Packed layout (transformers' flattening convention): the cells back to
back in one (1, T) row; `cu_seq_lens_q` (S+1,) int32 gives the segments (cells first, then any dummy padding
segments), `max_length_q` the longest; every token-level tensor keeps the packed (1, T) shape, per-cell outputs are
(B, ...) for the B real cells. The varlen metadata is built once per forward (`attention.PackedSequences`).

Only relative imports of this package and torch / transformers / torch_geometric: the folder is copied verbatim
by `save_pretrained` and loaded with `trust_remote_code=True` where grnformer_ds is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .attention import GRNFormerAttention, resolve_attn_implementation
from .configuration_grnformer import GRNFormerConfig
from .fusion import GraphFusionAdapter
from .gnn import StructureEncoder
from .layers import build_layers
from .layout import num_packed_cells
from .losses import IGNORE_INDEX, masked_mse_loss  # noqa: F401  (re-exported)

logger = logging.get_logger(__name__)


@dataclass
class GRNFormerModelOutput(ModelOutput):
    """
    last_hidden_state: (B, Lt, H) token states after the encoder and the fusion (packed: (1, Tt, H),
        scfoundation's T / S states at their slots). Tokens are the input slots (scgpt, scfoundation: aligned with
        `input_ids`) or gene patches (scpalm: `token_index` maps input slots to them).
    cell_embedding: (B, H) `<cls>` state (scgpt, scpalm) or pooled states (scfoundation "all": (B, 4H)).
    hidden_states: tuple of token states: embeddings, each encoder layer, and the fusion output when it ran.
    structure_states: (B, L, H) h_struct from the GNNs, one per input slot (graph node), when graphs were given
        (packed: (1, T, H)).
    fusion_attentions: (B, heads, Lt, Lk) cross-attention weights over tokens, when `output_fusion_attentions=True`
        (packed: per segment, (S, heads, Mq, Mk) over each segment's own tokens, M = max_length);
        `fusion_attention.gene_attention` maps them to genes.
    total_count_states: (B, 2, H) encoder states of the T and S tokens (scfoundation only).
    token_index: (B, L) int64 token of each input slot, -1 for none (scpalm: its gene's patch; packed (1, T)).
    codebook_loss, codebook_perplexity: scpalm's pathway codebook (VQ) loss and code-usage perplexity.
    backbone_outputs: a plug-in backbone's own outputs.
    """

    last_hidden_state: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    structure_states: torch.Tensor | None = None
    fusion_attentions: torch.Tensor | None = None
    total_count_states: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    codebook_loss: torch.Tensor | None = None
    codebook_perplexity: torch.Tensor | None = None
    backbone_outputs: dict | None = None


@dataclass
class GRNFormerCellClassifierOutput(ModelOutput):
    """
    loss: cross-entropy over the cells whose label != -100 (single_label_classification; the mean, or the sum
        divided by `num_items_in_batch` when it is given), or the squared error per value for
        `problem_type="regression"` / `num_labels == 1` (bulk drug response: ln IC50; perturbation: every gene).
    logits: (B, num_labels) per cell (packed: the B real cells).
    cell_embedding, last_hidden_state, hidden_states, structure_states, fusion_attentions: from the encoder.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    structure_states: torch.Tensor | None = None
    fusion_attentions: torch.Tensor | None = None


@dataclass
class GRNFormerMaskedLMOutput(ModelOutput):
    """
    loss: the sum of `loss_terms`: masked-value MSE over positions whose label != -100 (the mean, or the sum
        divided by `num_items_in_batch` when it is given) + the backbone's other terms.
    predictions: predicted values aligned with `labels`: (B, L) (scgpt, scpalm; packed (1, T)) or (B, G)
        (scfoundation).
    cell_embedding: see `GRNFormerModelOutput`.
    gene_embeddings: (B, L, H) contextual token states (scgpt), (B, G, H_dec) decoder states over all genes
        (scfoundation, as its "gene" embeddings), (B, L, H) per-gene decoder inputs (scpalm).
    last_hidden_state, hidden_states, structure_states, fusion_attentions, token_index, codebook_perplexity: from
        the encoder.
    mvc_predictions: (B, L) GEPC/MVC predictions when `use_mvc`.
    mlm_loss, mvc_loss: two of the loss terms. loss_terms: every term by name ("mlm", "mvc", "codebook", ...).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    gene_embeddings: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    structure_states: torch.Tensor | None = None
    fusion_attentions: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    codebook_perplexity: torch.Tensor | None = None
    mvc_predictions: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mvc_loss: torch.Tensor | None = None
    loss_terms: dict | None = None


class GRNFormerPreTrainedModel(PreTrainedModel):
    config_class = GRNFormerConfig
    config: GRNFormerConfig
    base_model_prefix = "grnformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GRNFormerLayer", "GraphFusionAdapter", "StructureEncoder"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False,
                                              **kwargs):
        # GRNFormer's own resolution: its flash path is flash-attn's varlen kernel (not a hub kernel), and the error
        # names the pip extra. Called by PreTrainedModel.__init__ with config._attn_implementation.
        return resolve_attn_implementation(attn_implementation)

    def set_attn_implementation(self, attn_implementation, **kwargs):
        """Switch every attention module (self and cross) to another implementation after build."""
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", self.config._attn_implementation)
        impl = resolve_attn_implementation(attn_implementation)
        self.config._attn_implementation = impl
        for module in self.modules():
            if isinstance(module, GRNFormerAttention):
                module.attn_implementation = impl

    def save_pretrained(self, save_directory, *args, **kwargs):
        # HF writes only the saved class into auto_map; list both so that a masked-LM export also loads as the
        # base model (cell / gene embeddings) with AutoModel + trust_remote_code
        module = type(self).__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{module}.GRNFormerModel")
        auto_map.setdefault("AutoModelForMaskedLM", f"{module}.GRNFormerForMaskedLM")
        auto_map.setdefault("AutoModelForSequenceClassification", f"{module}.GRNFormerForCellClassification")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        if any(hasattr(p, "ds_id") and p.numel() == 0 for p in module.parameters(recurse=False)):
            # ZeRO-3 partitioned (empty) parameters: HF's init cannot write them; say how to build instead
            raise RuntimeError(
                "GRNFormer: weights are ZeRO-3 partitioned at init; build the model inside "
                "transformers.initialization.no_init_weights() and deepspeed.zero.Init(), then call "
                "transformers.integrations.deepspeed.initialize_weights_zero3(model)"
            )
        super()._init_weights(module)  # Linear / Embedding (pad row zero) / LayerNorm, std = initializer_range
        if isinstance(module, GraphFusionAdapter):
            init.constant_(module.beta, float(self.config.fusion_beta_init))
        else:
            self.config.backbone_spec.init_weights(module, self.config)
        # torch-geometric convs keep PyG's own initialisation (glorot etc.), done in their constructors.


class GRNFormerModel(GRNFormerPreTrainedModel):
    """Backbone encoder (the config's registered backbone) + GRN structure encoder + cross-attention fusion.

    Args:
        config: `GRNFormerConfig`.
        build_structure_encoder: False skips the torch-geometric GNNs (e.g. inside `deepspeed.zero.Init`); call
            `build_structure_encoder()` afterwards, outside that context, before the first forward with graphs.
    """

    def __init__(self, config: GRNFormerConfig, build_structure_encoder: bool = True):
        super().__init__(config)
        self.backbone_spec = config.backbone_spec  # stateless: its modules are attached to this model
        self.backbone_spec.build_embeddings(self, config)
        self.layers = build_layers(config, config.num_encoder_layers, config.hidden_size,
                                   config.num_attention_heads, config.intermediate_size)
        self.fusion = GraphFusionAdapter(config) if config.use_graph else None
        self.structure_encoder = None
        if config.use_graph and build_structure_encoder:
            self.structure_encoder = StructureEncoder(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_layer_norm \
            else None
        # loaded alone (AutoModel) from a GRNFormerForMaskedLM folder, the head's weights are expected leftovers, not
        # an "UNEXPECTED" warning: ignore every key outside this model's own modules (whatever the backbone's head)
        own = "|".join(sorted(name for name, _ in self.named_children()) + ["structure_encoder"])
        self._keys_to_ignore_on_load_unexpected = [rf"^(?!(?:{own})\.)"]
        self.post_init()

    def build_structure_encoder(self) -> StructureEncoder | None:
        """Build and attach the torch-geometric structure encoder if it is missing (idempotent)."""
        if self.config.use_graph and self.structure_encoder is None:
            param = self.get_input_embeddings().weight  # follow the model's device / dtype
            encoder = StructureEncoder(self.config)
            # (a ZeRO-3 partitioned parameter has numel 0: leave placement to deepspeed.initialize)
            if param.device.type != "meta" and param.numel() > 0:
                encoder = encoder.to(device=param.device, dtype=param.dtype)
            self.structure_encoder = encoder
        return self.structure_encoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gene_encoder.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.gene_encoder.embedding = value

    @property
    def lead_slots(self) -> int:
        """Special slots at the start of a packed cell segment: <cls> (scgpt), the T and S tokens (scfoundation)."""
        return self.backbone_spec.lead_slots

    def _graphs(self, celltype_edge_index, celltype_edge_weight, cell_edge_index, cell_edge_weight) -> dict:
        graphs = {}
        if celltype_edge_index is not None:
            graphs["celltype"] = (celltype_edge_index, celltype_edge_weight)
        if cell_edge_index is not None:
            graphs["cell"] = (cell_edge_index, cell_edge_weight)
        graphs = {k: v for k, v in graphs.items() if k in self.config.graph_scales}
        if graphs and not self.config.use_graph:
            logger.warning_once("GRNFormerModel: use_graph=False, the graph inputs of the batch are ignored")
            return {}
        if graphs and self.structure_encoder is None:
            raise RuntimeError("GRNFormerModel: the structure encoder was not built; call "
                               "model.build_structure_encoder() before a forward with graphs")
        return graphs

    def backbone_inputs(self, names: tuple[str, ...], given: dict) -> dict:
        """The backbone's own inputs among `given` (None = absent); a non-None key nobody declared is refused."""
        declared = set(self.backbone_spec.model_inputs) | set(self.backbone_spec.head_inputs)
        unknown = sorted(k for k, v in given.items() if v is not None and k not in declared
                         and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"GRNFormerModel: unexpected input {', '.join(unknown)} for backbone "
                             f"{self.config.backbone!r} (it takes {sorted(declared) or 'no extra inputs'})")
        return {k: given.get(k) for k in names}

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        total_counts: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        celltype_edge_index: torch.Tensor | None = None,
        celltype_edge_weight: torch.Tensor | None = None,
        cell_edge_index: torch.Tensor | None = None,
        cell_edge_weight: torch.Tensor | None = None,
        graph_layout: str | None = None,
        batch: torch.Tensor | None = None,
        ptr: torch.Tensor | None = None,
        cell_index: torch.Tensor | None = None,
        cell_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_fusion_attentions: bool = False,
        return_dict: bool | None = None,
        **backbone_inputs,
    ):
        """
        Args:
            input_ids: (B, L) int64 token ids (`<pad>` at padding; scgpt / scpalm: `<cls>` at position 0); packed:
                (1, T), each cell's segment starting with its `<cls>` or two reserved T / S slots (scfoundation).
            values: (B, L) float (packed (1, T)): binned (scgpt, scpalm) or continuous (scfoundation); mask_value /
                pad_value at masked / padded positions.
            attention_mask: (B, L) bool, True = real token; default `input_ids != pad_token_id` (padded layout).
            total_counts: (B, 2) float, log10 total counts T and S (scfoundation only, required there).
            cu_seq_lens_q: (S+1,) int32 segment offsets of a packed batch (its presence selects the packed layout);
                max_length_q: int >= the longest segment. The `_k` twins must equal them (self-attention).
            celltype_edge_index / cell_edge_index: (2, E) int64 over input slots (n = b * L + l; packed: n = packed
                position); *_edge_weight: (E,). graph_layout: "coo" (default; TF -> target, the model adds reverse
                edges when configured) or "csr" (already in final form, sorted by destination).
            batch, ptr, cell_type_ids: accepted so that `model(**batch)` works; unused (nodes are defined by the
                token layout). cell_index: unused, except that its length is the number of real cells of a packed
                batch (segments after them are padding).
            output_fusion_attentions: return the fusion cross-attention weights.
            backbone_inputs: a plug-in backbone's own inputs (`Backbone.model_inputs`); the training-only keys
                (`labels`, the head's `Backbone.head_inputs`) are accepted and ignored, so a training batch runs
                through the base model.
        Returns:
            `GRNFormerModelOutput` (or a tuple when return_dict=False).
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out, _ = self.encode(
            input_ids, values, attention_mask=attention_mask, cu_seq_lens_q=cu_seq_lens_q,
            max_length_q=max_length_q, cell_index=cell_index, graphs=self._graphs(
                celltype_edge_index, celltype_edge_weight, cell_edge_index, cell_edge_weight),
            graph_layout=graph_layout, inputs=self.backbone_inputs(self.backbone_spec.model_inputs,
                                                                   {"total_counts": total_counts, **backbone_inputs}),
            output_hidden_states=output_hidden_states, output_fusion_attentions=output_fusion_attentions)
        return out if return_dict else out.to_tuple()

    def encode(self, input_ids, values, *, attention_mask, cu_seq_lens_q, max_length_q, cell_index, graphs,
               graph_layout, inputs, output_hidden_states, output_fusion_attentions):
        """(GRNFormerModelOutput, `layout.Embedded`): the forward, plus the token layout the head needs."""
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        packed = mask = None
        if cu_seq_lens_q is not None:
            if attention_mask is not None:
                raise ValueError("GRNFormerModel: a packed batch (cu_seq_lens_q) takes no attention_mask")
            if max_length_q is None:
                raise ValueError("GRNFormerModel: a packed batch needs max_length_q with cu_seq_lens_q")
            packed = {"cu_seq_lens": cu_seq_lens_q, "max_length": max_length_q,
                      "n_cells": num_packed_cells(cu_seq_lens_q, cell_index, *inputs.values()),
                      "padded_view": output_fusion_attentions or cfg._attn_implementation in ("eager", "sdpa")}
        else:
            mask = (input_ids != cfg.pad_token_id) if attention_mask is None else attention_mask.bool()
        emb = self.backbone_spec.embed(self, input_ids, values, mask, packed, inputs)

        def visible(h):  # the token states a user sees (not scFoundation's prepended T / S)
            return h if emb.packed else h[:, emb.out_slice:]

        hidden = emb.tokens
        all_hidden = [visible(hidden)] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=emb.mask, packed=emb.seq)
            if output_hidden_states:
                all_hidden.append(visible(hidden))

        structure_states = fusion_weights = None
        if graphs:
            nodes = self.structure_encoder(emb.node_features, graphs, graph_layout or "coo").to(hidden.dtype)
            kv, key_mask, kv_seq = self.backbone_spec.fusion_keys(self, emb, nodes)
            hidden, fusion_weights = self.fusion(hidden, kv, emb.mask, key_mask,
                                                 output_attentions=output_fusion_attentions, packed=emb.seq,
                                                 kv_packed=kv_seq)
            structure_states = self.backbone_spec.structure_output(emb, nodes)
            if output_hidden_states:
                all_hidden.append(visible(hidden))

        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        out = GRNFormerModelOutput(hidden_states=tuple(all_hidden) if output_hidden_states else None,
                                   structure_states=structure_states, fusion_attentions=fusion_weights,
                                   **self.backbone_spec.outputs(self, emb, hidden))
        return out, emb


# batch keys the base model accepts and ignores whatever its backbone is: the training-only keys (a training batch
# runs through `GRNFormerModel`, e.g. for embeddings) and the built-in backbones' own keys
_IGNORED_KEYS = ("labels", "num_items_in_batch", "total_counts", "decoder_values", "decoder_input_ids",
                 "sample_index", "condition_features", "condition_gene_ids")


class GRNFormerForMaskedLM(GRNFormerPreTrainedModel):
    """GRNFormer with its backbone's pretraining head (scGPT's expression decoder (+ MVC/GEPC), scFoundation's
    transformer decoder over all genes, scPaLM's per-gene decoder + regularisers). Loss = MSE on positions whose
    label != -100 + the backbone's other terms."""

    def __init__(self, config: GRNFormerConfig, build_structure_encoder: bool = True):
        super().__init__(config)
        self.grnformer = GRNFormerModel(config, build_structure_encoder=build_structure_encoder)
        self.backbone_spec = self.grnformer.backbone_spec
        self.backbone_spec.build_head(self, config)
        self.post_init()
        # HF copies the base model's ignore-unexpected pattern into its parents; loaded whole, nothing is expected left
        self._keys_to_ignore_on_load_unexpected = set()

    def build_structure_encoder(self):
        """See `GRNFormerModel.build_structure_encoder`."""
        return self.grnformer.build_structure_encoder()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.grnformer.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        total_counts: torch.Tensor | None = None,
        decoder_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        celltype_edge_index: torch.Tensor | None = None,
        celltype_edge_weight: torch.Tensor | None = None,
        cell_edge_index: torch.Tensor | None = None,
        cell_edge_weight: torch.Tensor | None = None,
        graph_layout: str | None = None,
        batch: torch.Tensor | None = None,
        ptr: torch.Tensor | None = None,
        cell_index: torch.Tensor | None = None,
        cell_type_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        output_hidden_states: bool | None = None,
        output_fusion_attentions: bool = False,
        return_dict: bool | None = None,
        **backbone_inputs,
    ):
        """
        Args (beyond `GRNFormerModel.forward`):
            labels: float targets aligned with the backbone's predictions, -100 where ignored: (B, L) scgpt / scpalm
                (packed: (1, T)), (B, G) scfoundation.
            decoder_values: (B, G) scfoundation: every store gene's value, mask_value at masked genes, 0 at zeros.
            decoder_input_ids: (B, G) or (G,) int64 scfoundation: the token id of every store gene column.
            num_items_in_batch: divide the summed squared errors by this instead of this batch's masked-position
                count (transformers' name; the trainer passes the count of the whole optimizer step).
        Returns:
            `GRNFormerMaskedLMOutput` (or a tuple when return_dict=False).
        """
        model, spec = self.grnformer, self.backbone_spec
        return_dict = self.config.return_dict if return_dict is None else return_dict
        given = {"total_counts": total_counts, "decoder_values": decoder_values,
                 "decoder_input_ids": decoder_input_ids, **backbone_inputs}
        enc, emb = model.encode(
            input_ids, values, attention_mask=attention_mask, cu_seq_lens_q=cu_seq_lens_q,
            max_length_q=max_length_q, cell_index=cell_index,
            graphs=model._graphs(celltype_edge_index, celltype_edge_weight, cell_edge_index, cell_edge_weight),
            graph_layout=graph_layout, inputs=model.backbone_inputs(spec.model_inputs, given),
            output_hidden_states=output_hidden_states, output_fusion_attentions=output_fusion_attentions)
        head = spec.head(self, enc, emb, input_ids, model.backbone_inputs(spec.head_inputs, given))
        loss = terms = None
        if labels is not None:
            terms = spec.loss_terms(self, head, enc, labels, num_items_in_batch)
            loss = sum(terms.values())
        out = GRNFormerMaskedLMOutput(
            loss=loss,
            predictions=head["predictions"],
            cell_embedding=enc.cell_embedding,
            gene_embeddings=head.get("gene_embeddings"),
            last_hidden_state=enc.last_hidden_state,
            hidden_states=enc.hidden_states,
            structure_states=enc.structure_states,
            fusion_attentions=enc.fusion_attentions,
            token_index=enc.token_index,
            codebook_perplexity=enc.codebook_perplexity,
            mvc_predictions=head.get("mvc_predictions"),
            mlm_loss=None if terms is None else terms.get("mlm"),
            mvc_loss=None if terms is None else terms.get("mvc"),
            loss_terms=terms,
        )
        return out if return_dict else out.to_tuple()


class GRNFormerForCellClassification(GRNFormerPreTrainedModel):
    """GRNFormer with a classifier on the cell embedding (`heads.CellClassifier`): cell-type annotation, per-cell
    drug response, ... (the fine-tuning tasks, `grnformer_ds.tasks`); with `condition_feature_size` the embedding
    of a per-sample condition joins it (a drug's fingerprint: bulk drug response, DeepCDR's setup). Load a
    pretrained folder with `from_pretrained(folder, num_labels=K)`: the encoder's weights are kept, the pretraining
    head's are left out and the classifier is new. `num_labels == 1` is regression (MSE)."""

    _keys_to_ignore_on_load_missing = {r"^(classifier|condition_encoder)\."}

    def __init__(self, config: GRNFormerConfig, build_structure_encoder: bool = True):
        super().__init__(config)
        from .heads import CellClassifier

        self.num_labels = config.num_labels
        self.grnformer = GRNFormerModel(config, build_structure_encoder=build_structure_encoder)
        width = config.backbone_spec.cell_embedding_size(config)
        # a per-sample condition joins the cell embedding: a feature vector (a drug's fingerprint, DeepCDR's setup)
        # or a set of genes (a genetic perturbation: the mean of the model's own gene embeddings, so a gene never
        # perturbed in training still has a meaningful input)
        self.condition_encoder = None
        if config.condition_feature_size or config.condition_genes:
            size = config.condition_feature_size or config.hidden_size
            self.condition_encoder = nn.Sequential(nn.Linear(size, width), nn.ReLU(), nn.Linear(width, width))
        self.classifier = CellClassifier(2 * width if self.condition_encoder is not None else width,
                                         config.num_labels, config.classifier_hidden_layers,
                                         config.classifier_dropout, config.layer_norm_eps)
        self.post_init()
        # a pretrained folder's head (expression decoder, ...) has no place here: expected leftovers
        self._keys_to_ignore_on_load_unexpected = {r"^(?!(?:grnformer|classifier|condition_encoder)\.)"}

    def build_structure_encoder(self):
        """See `GRNFormerModel.build_structure_encoder`."""
        return self.grnformer.build_structure_encoder()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.grnformer.get_input_embeddings()

    def _condition(self, features: torch.Tensor | None, gene_ids: torch.Tensor | None) -> torch.Tensor:
        """The condition encoder's input: the features (B, F), or the mean gene embedding of each sample's genes
        (B, H)."""
        if self.config.condition_feature_size:
            if features is None:
                raise ValueError("GRNFormerForCellClassification: the config has condition_feature_size "
                                 f"{self.config.condition_feature_size}; pass condition_features (B, F)")
            return features
        if gene_ids is None:
            raise ValueError("GRNFormerForCellClassification: the config has condition_genes; pass "
                             "condition_gene_ids (B, P)")
        real = (gene_ids != self.config.pad_token_id).unsqueeze(-1)  # (B, P, 1)
        genes = self.get_input_embeddings()(gene_ids) * real  # (B, P, H)
        return genes.sum(1) / real.sum(1).clamp(min=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        total_counts: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        celltype_edge_index: torch.Tensor | None = None,
        celltype_edge_weight: torch.Tensor | None = None,
        cell_edge_index: torch.Tensor | None = None,
        cell_edge_weight: torch.Tensor | None = None,
        graph_layout: str | None = None,
        batch: torch.Tensor | None = None,
        ptr: torch.Tensor | None = None,
        cell_index: torch.Tensor | None = None,
        cell_type_ids: torch.Tensor | None = None,
        condition_features: torch.Tensor | None = None,
        condition_gene_ids: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        output_hidden_states: bool | None = None,
        output_fusion_attentions: bool = False,
        return_dict: bool | None = None,
        **backbone_inputs,
    ):
        """
        Args (beyond `GRNFormerModel.forward`):
            labels: (B,) int64 class per cell, -100 = ignored (float for regression). The backbone's pretraining
                inputs (e.g. scFoundation's `decoder_values`) are accepted and ignored.
            condition_features: (B, condition_feature_size) float per sample (e.g. a drug's Morgan fingerprint),
                required when the config has `condition_feature_size`. condition_gene_ids: (B, P) int64 vocabulary
                ids of each sample's condition genes (the perturbed genes), `pad_token_id` where a sample has fewer;
                required when the config has `condition_genes`. sample_index: bookkeeping, unused.
            num_items_in_batch: divide the summed per-cell losses by this instead of this batch's labelled cells
                (the trainer passes the count of the whole optimizer step).
        Returns:
            `GRNFormerCellClassifierOutput` (or a tuple when return_dict=False).
        """
        model = self.grnformer
        return_dict = self.config.return_dict if return_dict is None else return_dict
        given = {"total_counts": total_counts, **backbone_inputs}
        enc, _ = model.encode(
            input_ids, values, attention_mask=attention_mask, cu_seq_lens_q=cu_seq_lens_q,
            max_length_q=max_length_q, cell_index=cell_index,
            graphs=model._graphs(celltype_edge_index, celltype_edge_weight, cell_edge_index, cell_edge_weight),
            graph_layout=graph_layout, inputs=model.backbone_inputs(model.backbone_spec.model_inputs, given),
            output_hidden_states=output_hidden_states, output_fusion_attentions=output_fusion_attentions)
        features = enc.cell_embedding  # (B, H')
        if self.condition_encoder is not None:
            features = torch.cat([features, self.condition_encoder(
                self._condition(condition_features, condition_gene_ids).to(features.dtype))], dim=-1)  # (B, 2H')
        logits = self.classifier(features)  # (B, num_labels)
        loss = None
        if labels is not None:
            regression = self.config.problem_type == "regression" or self.num_labels == 1
            loss = cell_loss(logits, labels, num_items_in_batch, regression)
        out = GRNFormerCellClassifierOutput(
            loss=loss, logits=logits, cell_embedding=enc.cell_embedding, last_hidden_state=enc.last_hidden_state,
            hidden_states=enc.hidden_states, structure_states=enc.structure_states,
            fusion_attentions=enc.fusion_attentions)
        return out if return_dict else out.to_tuple()


def cell_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
              regression: bool = False) -> torch.Tensor:
    """Cross-entropy (logits (B, C), labels (B,) int64, -100 ignored) or, for `regression`, squared error against
    float labels (B,) (C == 1) or (B, C); summed over the labelled values and divided by `num_items_in_batch`
    (default: their count, i.e. the mean)."""
    logits = logits.float()
    if regression:
        target = labels.to(logits.dtype).reshape(logits.shape[0], -1)
        keep = target != IGNORE_INDEX
        total = (((logits - target) ** 2) * keep).sum()
        count = keep.sum()
    else:
        total = nn.functional.cross_entropy(logits, labels.long(), ignore_index=int(IGNORE_INDEX), reduction="sum")
        count = (labels != IGNORE_INDEX).sum()
    denom = count.clamp(min=1).to(total.dtype) if num_items_in_batch is None else num_items_in_batch
    return total / denom
