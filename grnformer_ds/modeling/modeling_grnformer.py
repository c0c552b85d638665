"""GRNFormer models in HF transformers style: `GRNFormerModel` (encoder + GRN fusion) and `GRNFormerForMaskedLM`
(+ masked-value regression head).

Forward arguments are the batch keys of docs/design.md section 3, so `model(**batch)` works for both backbones and both
layouts: `input_ids`, `values`, `attention_mask` (padded) or `cu_seq_lens_q/k`, `max_length_q/k` (packed), `labels`,
scFoundation's `total_counts`, `decoder_values`, `decoder_input_ids`, the graphs (`celltype_edge_index`,
`celltype_edge_weight`, `cell_edge_index`, `cell_edge_weight`, `graph_layout`, `batch`, `ptr`) and the bookkeeping
keys `cell_index`, `cell_type_ids` (accepted; in the packed layout `cell_index` tells real cells from dummy segments).

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

from .attention import GRNFormerAttention, PackedSequences, resolve_attn_implementation
from .configuration_grnformer import GRNFormerConfig
from .embeddings import AutoDiscretizationEncoder, GeneEncoder, build_value_encoder
from .fusion import GraphFusionAdapter
from .gnn import StructureEncoder
from .heads import ExprDecoder, MVCDecoder, ScFoundationDecoder
from .layers import build_layers

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100.0


@dataclass
class GRNFormerModelOutput(ModelOutput):
    """
    last_hidden_state: (B, L, H) token states after the encoder and the fusion, aligned with `input_ids` (packed:
        (1, T, H), scfoundation's T / S states at their slots).
    cell_embedding: (B, H) `<cls>` state (scgpt) or pooled states (scfoundation "all": (B, 4H) = S, T, max, mean).
    hidden_states: tuple of (B, L, H): embeddings, each encoder layer, and the fusion output when it ran.
    structure_states: (B, L, H) h_struct from the GNNs, when graphs were given (packed: (1, T, H)).
    fusion_attentions: (B, heads, Lq, Lk) cross-attention weights, when `output_fusion_attentions=True` (packed: per
        segment, (S, heads, Mq, Mk) over each segment's own tokens, M = max_length).
    total_count_states: (B, 2, H) encoder states of the T and S tokens (scfoundation only).
    """

    last_hidden_state: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    structure_states: torch.Tensor | None = None
    fusion_attentions: torch.Tensor | None = None
    total_count_states: torch.Tensor | None = None


@dataclass
class GRNFormerMaskedLMOutput(ModelOutput):
    """
    loss: scalar masked-value MSE over positions whose label != -100 (+ the MVC loss when `use_mvc`): the mean, or
        the sum divided by `num_items_in_batch` when it is given.
    predictions: (B, L) (scgpt; packed (1, T)) or (B, G) (scfoundation) predicted values.
    cell_embedding: see `GRNFormerModelOutput`.
    gene_embeddings: (B, L, H) contextual token states (scgpt) or (B, G, H_dec) decoder states over all genes
        (scfoundation, as its "gene" embeddings).
    last_hidden_state, hidden_states, structure_states, fusion_attentions: from the encoder.
    mvc_predictions: (B, L) GEPC/MVC predictions when `use_mvc`.
    mlm_loss, mvc_loss: the loss terms.
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    gene_embeddings: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    structure_states: torch.Tensor | None = None
    fusion_attentions: torch.Tensor | None = None
    mvc_predictions: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    mvc_loss: torch.Tensor | None = None


def masked_mse_loss(predictions: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
    """Squared error over positions with label != -100 (scGPT's masked_mse_loss), in float32: the mean over this
    batch's masked positions, or, with `num_items_in_batch` (transformers' name), the sum divided by it. The trainer
    passes the number of masked positions of the whole optimizer step (every accumulated micro-batch on every rank),
    so that accumulating micro-batches gives the loss (and gradient) of one step over all of them.

    Uses a where-mask instead of boolean indexing: no host sync, and ignored positions contribute exactly zero
    (also their gradient). Returns 0 (with grad) when nothing is masked.
    """
    keep = labels != IGNORE_INDEX
    diff = torch.where(keep, predictions.float() - labels.float(), torch.zeros((), device=labels.device))
    denominator = keep.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return diff.pow(2).sum() / denominator


def num_packed_cells(cu_seq_lens: torch.Tensor, total_counts: torch.Tensor | None,
                     cell_index: torch.Tensor | None) -> int:
    """Real cells of a packed batch: the first B segments (the rest are dummy padding segments). B comes from a
    per-cell key when the batch has one (its size is static for the compiler), else every segment is a cell."""
    for per_cell in (total_counts, cell_index):
        if per_cell is not None:
            return per_cell.shape[0]
    return cu_seq_lens.shape[0] - 1


def packed_token_cells(cu_seq_lens: torch.Tensor, n_cells: int, total: int, lead: int,
                       seq_ids: torch.Tensor | None = None):
    """(seq_ids (T,) int64 segment of each packed token, is_gene (T,) bool: the token is a gene of a real cell,
    i.e. not one of the ``lead`` special slots at the start of its segment (<cls>, or T and S) nor dummy).
    ``seq_ids`` when the caller has them already (`PackedSequences.seq_ids`)."""
    starts = cu_seq_lens.to(torch.int64)
    positions = torch.arange(total, device=starts.device)
    if seq_ids is None:
        seq_ids = torch.searchsorted(starts[1:], positions, right=True)
    is_gene = (positions - starts[seq_ids] >= lead) & (seq_ids < n_cells)
    return seq_ids, is_gene


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
        std = self.config.initializer_range
        if isinstance(module, GraphFusionAdapter):
            init.constant_(module.beta, float(self.config.fusion_beta_init))
        elif isinstance(module, AutoDiscretizationEncoder):
            init.normal_(module.mask_embedding, mean=0.0, std=std)
            init.normal_(module.pad_embedding, mean=0.0, std=std)
        # torch-geometric convs keep PyG's own initialisation (glorot etc.), done in their constructors.


class GRNFormerModel(GRNFormerPreTrainedModel):
    """Backbone encoder (scGPT- or scFoundation-style) + GRN structure encoder + cross-attention fusion.

    Args:
        config: `GRNFormerConfig`.
        build_structure_encoder: False skips the torch-geometric GNNs (e.g. inside `deepspeed.zero.Init`); call
            `build_structure_encoder()` afterwards, outside that context, before the first forward with graphs.
    """

    def __init__(self, config: GRNFormerConfig, build_structure_encoder: bool = True):
        super().__init__(config)
        self.is_scfoundation = config.backbone == "scfoundation"
        # scFoundation's gene identity embedding is a plain embedding (its "pos_emb"); scGPT normalises it
        self.gene_encoder = GeneEncoder(config.vocab_size, config.hidden_size, config.pad_token_id,
                                        config.layer_norm_eps, use_norm=not self.is_scfoundation)
        self.value_encoder = build_value_encoder(config)
        if self.is_scfoundation:
            # identity embeddings of the two total-count tokens T and S (scFoundation's gene ids 19264, 19265)
            self.total_count_embeddings = nn.Embedding(2, config.hidden_size)
        self.layers = build_layers(config, config.num_encoder_layers, config.hidden_size,
                                   config.num_attention_heads, config.intermediate_size)
        self.fusion = GraphFusionAdapter(config) if config.use_graph else None
        self.structure_encoder = None
        if config.use_graph and build_structure_encoder:
            self.structure_encoder = StructureEncoder(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_layer_norm \
            else None
        self.post_init()

    def build_structure_encoder(self) -> StructureEncoder | None:
        """Build and attach the torch-geometric structure encoder if it is missing (idempotent)."""
        if self.config.use_graph and self.structure_encoder is None:
            param = self.gene_encoder.embedding.weight  # follow the model's device / dtype
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
        return 2 if self.is_scfoundation else 1

    def _cell_embedding(self, states: torch.Tensor, mask: torch.Tensor, total_count_states):
        pooling = self.config.cell_embedding_pooling
        if pooling == "cls":
            return states[:, 0]
        if not self.is_scfoundation:  # scGPT-style pooling skips the <cls> slot
            states, mask = states[:, 1:], mask[:, 1:]
        m = mask.unsqueeze(-1)
        mean = (states * m).sum(1) / m.sum(1).clamp(min=1).to(states.dtype)
        if pooling == "mean":
            return mean
        maximum = states.masked_fill(~m, torch.finfo(states.dtype).min).max(1).values
        if pooling == "max":
            return maximum
        # "all" as scFoundation's get_embedding: S state, T state, max-pool, mean-pool over the genes
        return torch.cat([total_count_states[:, 1], total_count_states[:, 0], maximum, mean], dim=-1)

    def _packed_cell_embedding(self, states: torch.Tensor, starts: torch.Tensor, seq_ids: torch.Tensor,
                               is_gene: torch.Tensor, n_segments: int, total_count_states):
        """`_cell_embedding` on packed states (T, H): per-segment sums / maxima over each cell's gene tokens by
        index_add / scatter_reduce (static shapes), the first B segments kept. starts (B,) int64."""
        pooling = self.config.cell_embedding_pooling
        n_cells = starts.shape[0]
        if pooling == "cls":
            return states[starts]
        hidden = states.shape[-1]
        w = is_gene.to(states.dtype).unsqueeze(-1)
        sums = states.new_zeros(n_segments, hidden).index_add(0, seq_ids, states * w)
        counts = w.new_zeros(n_segments, 1).index_add(0, seq_ids, w)
        mean = (sums / counts.clamp(min=1))[:n_cells]
        if pooling == "mean":
            return mean
        low = torch.finfo(states.dtype).min
        maximum = states.new_full((n_segments, hidden), low).scatter_reduce(
            0, seq_ids.unsqueeze(-1).expand(-1, hidden), states.masked_fill(~is_gene.unsqueeze(-1), low), "amax",
            include_self=True)[:n_cells]
        if pooling == "max":
            return maximum
        return torch.cat([total_count_states[:, 1], total_count_states[:, 0], maximum, mean], dim=-1)

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
    ):
        """
        Args:
            input_ids: (B, L) int64 token ids (`<pad>` at padding; scgpt: `<cls>` at position 0); packed: (1, T),
                each cell's segment starting with its `<cls>` (scgpt) or two reserved T / S slots (scfoundation).
            values: (B, L) float (packed (1, T)): binned (scgpt) or continuous (scfoundation); mask_value /
                pad_value at masked / padded positions.
            attention_mask: (B, L) bool, True = real token; default `input_ids != pad_token_id` (padded layout).
            total_counts: (B, 2) float, log10 total counts T and S (scfoundation only, required there).
            cu_seq_lens_q: (S+1,) int32 segment offsets of a packed batch (its presence selects the packed layout);
                max_length_q: int >= the longest segment. The `_k` twins must equal them (self-attention).
            celltype_edge_index / cell_edge_index: (2, E) int64 over token slots (n = b * L + l; packed: n = packed
                position); *_edge_weight: (E,). graph_layout: "coo" (default; TF -> target, the model adds reverse
                edges when configured) or "csr" (already in final form, sorted by destination).
            batch, ptr, cell_type_ids: accepted so that `model(**batch)` works; unused (nodes are defined by the
                token layout). cell_index: unused, except that its length is the number of real cells of a packed
                batch (segments after them are padding).
            output_fusion_attentions: return the fusion cross-attention weights.
        Returns:
            `GRNFormerModelOutput` (or a tuple when return_dict=False).
        """
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        graphs = self._graphs(celltype_edge_index, celltype_edge_weight, cell_edge_index, cell_edge_weight)
        layout = graph_layout or "coo"
        if self.is_scfoundation and total_counts is None:
            raise ValueError("GRNFormerModel: backbone='scfoundation' needs total_counts (B, 2)")
        if cu_seq_lens_q is not None:
            if attention_mask is not None:
                raise ValueError("GRNFormerModel: a packed batch (cu_seq_lens_q) takes no attention_mask")
            if max_length_q is None:
                raise ValueError("GRNFormerModel: a packed batch needs max_length_q with cu_seq_lens_q")
            out = self._forward_packed(input_ids, values, total_counts, cu_seq_lens_q, max_length_q, cell_index,
                                       graphs, layout, output_hidden_states, output_fusion_attentions)
        else:
            out = self._forward_padded(input_ids, values, attention_mask, total_counts, graphs, layout,
                                       output_hidden_states, output_fusion_attentions)
        return out if return_dict else out.to_tuple()

    def _forward_padded(self, input_ids, values, attention_mask, total_counts, graphs, layout,
                        output_hidden_states, output_fusion_attentions) -> GRNFormerModelOutput:
        """The (B, L) layout: the reference for the packed one."""
        cfg = self.config
        mask = (input_ids != cfg.pad_token_id) if attention_mask is None else attention_mask.bool()
        bsz, seqlen = input_ids.shape

        gene_emb = self.gene_encoder(input_ids)
        value_emb = self.value_encoder(values)
        tokens = gene_emb + value_emb
        node_features = tokens if cfg.gnn_node_input == "gene+value" else gene_emb

        offset = 0
        full_mask = mask
        if self.is_scfoundation:
            tc = self.value_encoder(total_counts.to(values.dtype)) + self.total_count_embeddings.weight.unsqueeze(0)
            # T and S tokens go first: the encoder has no positional order, so this equals scFoundation's
            # appending them after the genes, and keeps the gene tokens at fixed slots 2..L+1
            tokens = torch.cat([tc.to(tokens.dtype), tokens], dim=1)
            full_mask = torch.cat([torch.ones(bsz, 2, dtype=torch.bool, device=mask.device), mask], dim=1)
            offset = 2

        hidden = tokens
        all_hidden = [hidden[:, offset:]] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=full_mask)
            if output_hidden_states:
                all_hidden.append(hidden[:, offset:])

        structure_states = fusion_weights = None
        if graphs:
            flat = node_features.reshape(bsz * seqlen, -1)
            structure_states = self.structure_encoder(flat, graphs, layout).reshape(bsz, seqlen, -1).to(hidden.dtype)
            struct_full, key_mask = structure_states, mask
            if offset:
                # the total-count tokens have no graph node: zero states, masked keys
                struct_full = torch.cat([structure_states.new_zeros(bsz, offset, structure_states.shape[-1]),
                                         structure_states], dim=1)
                key_mask = full_mask.clone()
                key_mask[:, :offset] = False
            hidden, fusion_weights = self.fusion(hidden, struct_full, full_mask, key_mask,
                                                 output_attentions=output_fusion_attentions)
            if output_hidden_states:
                all_hidden.append(hidden[:, offset:])

        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        token_states = hidden[:, offset:]
        total_count_states = hidden[:, :offset] if offset else None
        return GRNFormerModelOutput(
            last_hidden_state=token_states,
            cell_embedding=self._cell_embedding(token_states, mask, total_count_states),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            structure_states=structure_states,
            fusion_attentions=fusion_weights,
            total_count_states=total_count_states,
        )

    def _forward_packed(self, input_ids, values, total_counts, cu_seq_lens, max_length, cell_index, graphs, layout,
                        output_hidden_states, output_fusion_attentions) -> GRNFormerModelOutput:
        """The packed (1, T) layout. Shapes: T tokens, S segments, B real cells (S - B dummy segments)."""
        cfg = self.config
        ids, vals = input_ids[0], values[0]  # (T,)
        total = ids.shape[0]
        n_cells = num_packed_cells(cu_seq_lens, total_counts, cell_index)
        n_segments = cu_seq_lens.shape[0] - 1
        view = output_fusion_attentions or cfg._attn_implementation in ("eager", "sdpa")
        seq = PackedSequences.build(cu_seq_lens, max_length, total, with_padded_view=view)
        seq_ids, is_gene = packed_token_cells(cu_seq_lens, n_cells, total, self.lead_slots, seq.seq_ids)
        starts = seq.cu_seqlens[:n_cells].to(torch.int64)  # (B,) first slot of each cell

        gene_emb = self.gene_encoder(ids)  # (T, H)
        tokens = gene_emb + self.value_encoder(vals)
        node_features = tokens if cfg.gnn_node_input == "gene+value" else gene_emb
        ts_slots = None
        if self.is_scfoundation:
            # the T and S tokens take the two reserved slots at the start of each cell's segment
            tc = self.value_encoder(total_counts.to(vals.dtype)) + self.total_count_embeddings.weight.unsqueeze(0)
            ts_slots = torch.stack([starts, starts + 1], dim=1).reshape(-1)  # (2B,)
            tokens = tokens.index_copy(0, ts_slots, tc.reshape(-1, tc.shape[-1]).to(tokens.dtype))

        hidden = tokens.unsqueeze(0)  # (1, T, H)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, packed=seq)
            if output_hidden_states:
                all_hidden.append(hidden)

        structure_states = fusion_weights = None
        if graphs:
            structure_states = self.structure_encoder(node_features, graphs, layout).to(hidden.dtype)  # (T, H)
            kv, kv_seq = structure_states, seq
            if self.is_scfoundation:
                # keys are the cells' gene tokens only (the T / S slots have no graph node), as the padded
                # layout's key mask: drop the two lead slots of each cell segment from the key side
                lead = 2 * torch.arange(n_segments + 1, device=starts.device).clamp(max=n_cells)
                cu_k = seq.cu_seqlens.to(torch.int64) - lead
                k_total = total - 2 * n_cells
                k_pos = torch.arange(k_total, device=starts.device)
                k_seg = torch.searchsorted(cu_k[1:], k_pos, right=True)
                kv = structure_states[k_pos + 2 * (k_seg + 1).clamp(max=n_cells)]
                kv_seq = PackedSequences.build(cu_k, max_length, k_total, with_padded_view=view)
            hidden, fusion_weights = self.fusion(hidden, kv.unsqueeze(0), None, None,
                                                 output_attentions=output_fusion_attentions, packed=seq,
                                                 kv_packed=kv_seq)
            structure_states = structure_states.unsqueeze(0)
            if output_hidden_states:
                all_hidden.append(hidden)

        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        states = hidden[0]
        total_count_states = states[ts_slots].reshape(n_cells, 2, -1) if ts_slots is not None else None
        return GRNFormerModelOutput(
            last_hidden_state=hidden,
            cell_embedding=self._packed_cell_embedding(states, starts, seq_ids, is_gene, n_segments,
                                                       total_count_states),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            structure_states=structure_states,
            fusion_attentions=fusion_weights,
            total_count_states=total_count_states,
        )


class GRNFormerForMaskedLM(GRNFormerPreTrainedModel):
    """GRNFormer with the masked-value regression head: scGPT's expression decoder (+ optional MVC/GEPC), or
    scFoundation's transformer decoder over all genes. Loss = MSE on positions whose label != -100."""

    def __init__(self, config: GRNFormerConfig, build_structure_encoder: bool = True):
        super().__init__(config)
        self.grnformer = GRNFormerModel(config, build_structure_encoder=build_structure_encoder)
        if config.backbone == "scfoundation":
            self.decoder = ScFoundationDecoder(config)
        else:
            self.expr_decoder = ExprDecoder(config.hidden_size)
            self.mvc_decoder = MVCDecoder(config.hidden_size) if config.use_mvc else None
        self.post_init()

    def build_structure_encoder(self):
        """See `GRNFormerModel.build_structure_encoder`."""
        return self.grnformer.build_structure_encoder()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.grnformer.get_input_embeddings()

    def _decoder_inputs(self, token_states, token_ids, token_cells, is_gene, decoder_values, decoder_input_ids):
        """scFoundation decoder input (B, G, H): value embedding of every gene, the encoder states written at the
        encoder genes' columns, plus every gene's identity embedding.

        Encoder tokens come flat, whatever the layout: token_states (N, H), token_ids (N,), token_cells (N,) the
        cell of each token (in [0, B)), is_gene (N,) bool (False at padding, T / S and dummy slots). Each gene
        token's state is copied to row cell * G + column of a (B * G + 1, H) table whose last row takes every
        non-gene token (static shapes, no host sync)."""
        bsz, n_genes = decoder_values.shape
        if decoder_input_ids.dim() == 1:
            decoder_input_ids = decoder_input_ids.unsqueeze(0).expand(bsz, -1)
        model = self.grnformer
        dec = model.value_encoder(decoder_values).to(token_states.dtype)
        hidden = dec.shape[-1]
        # column of each encoder token in its cell's decoder gene list, through a (B, vocab) lookup table
        lut = torch.full((bsz, self.config.vocab_size), -1, dtype=torch.long, device=token_ids.device)
        cols = torch.arange(n_genes, device=token_ids.device).unsqueeze(0).expand(bsz, -1)
        lut.scatter_(1, decoder_input_ids, cols)
        token_cols = lut[token_cells, token_ids]
        if not torch.compiler.is_compiling() and bool((is_gene & (token_cols < 0)).any()):
            raise ValueError("GRNFormerForMaskedLM: an encoder token id is missing from decoder_input_ids")
        sink = bsz * n_genes
        target = torch.where(is_gene & (token_cols >= 0), token_cells * n_genes + token_cols, sink)
        table = torch.cat([dec.reshape(sink, hidden), dec.new_zeros(1, hidden)])
        table = table.index_copy(0, target, token_states.to(dec.dtype))
        return table[:sink].reshape(bsz, n_genes, hidden) + model.gene_encoder(decoder_input_ids).to(dec.dtype)

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
    ):
        """
        Args (beyond `GRNFormerModel.forward`):
            labels: (B, L) scgpt (packed: (1, T)) / (B, G) scfoundation float targets, -100 where ignored.
            decoder_values: (B, G) scfoundation: every store gene's value, mask_value at masked genes, 0 at zeros.
            decoder_input_ids: (B, G) or (G,) int64 scfoundation: the token id of every store gene column.
            num_items_in_batch: divide the summed squared errors by this instead of this batch's masked-position
                count (transformers' name; the trainer passes the count of the whole optimizer step).
        Returns:
            `GRNFormerMaskedLMOutput` (or a tuple when return_dict=False).
        """
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        enc = self.grnformer(
            input_ids=input_ids, values=values, attention_mask=attention_mask, total_counts=total_counts,
            cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
            max_length_k=max_length_k, celltype_edge_index=celltype_edge_index,
            celltype_edge_weight=celltype_edge_weight, cell_edge_index=cell_edge_index,
            cell_edge_weight=cell_edge_weight, graph_layout=graph_layout, cell_index=cell_index,
            output_hidden_states=output_hidden_states, output_fusion_attentions=output_fusion_attentions,
            return_dict=True,
        )
        packed = cu_seq_lens_q is not None
        if packed:
            n_cells = num_packed_cells(cu_seq_lens_q, total_counts, cell_index)
            seq_ids, is_gene = packed_token_cells(cu_seq_lens_q, n_cells, input_ids.shape[1],
                                                  self.grnformer.lead_slots)
            token_cells = seq_ids.clamp(max=max(n_cells - 1, 0))  # dummy tokens borrow the last cell (ignored)
        mvc_predictions = None
        if cfg.backbone == "scfoundation":
            if decoder_values is None or decoder_input_ids is None:
                raise ValueError("GRNFormerForMaskedLM: backbone='scfoundation' needs decoder_values (B, G) and "
                                 "decoder_input_ids (B, G) or (G,)")
            states = enc.last_hidden_state
            if packed:
                flat = (states[0], input_ids[0], token_cells, is_gene)
            else:
                mask = (input_ids != cfg.pad_token_id) if attention_mask is None else attention_mask.bool()
                bsz, seqlen = input_ids.shape
                cells = torch.arange(bsz, device=input_ids.device).repeat_interleave(seqlen)
                flat = (states.reshape(bsz * seqlen, -1), input_ids.reshape(-1), cells, mask.reshape(-1))
            dec_in = self._decoder_inputs(*flat, decoder_values, decoder_input_ids)
            predictions, gene_embeddings = self.decoder(dec_in)
        else:
            predictions = self.expr_decoder(enc.last_hidden_state)
            gene_embeddings = enc.last_hidden_state
            if self.mvc_decoder is not None:
                mvc_predictions = self.mvc_decoder(enc.cell_embedding, self.grnformer.gene_encoder(input_ids),
                                                   token_cells if packed else None)

        loss = mlm_loss = mvc_loss = None
        if labels is not None:
            mlm_loss = masked_mse_loss(predictions, labels, num_items_in_batch)
            loss = mlm_loss
            if mvc_predictions is not None:
                mvc_loss = masked_mse_loss(mvc_predictions, labels, num_items_in_batch)
                loss = loss + mvc_loss

        out = GRNFormerMaskedLMOutput(
            loss=loss,
            predictions=predictions,
            cell_embedding=enc.cell_embedding,
            gene_embeddings=gene_embeddings,
            last_hidden_state=enc.last_hidden_state,
            hidden_states=enc.hidden_states,
            structure_states=enc.structure_states,
            fusion_attentions=enc.fusion_attentions,
            mvc_predictions=mvc_predictions,
            mlm_loss=mlm_loss,
            mvc_loss=mvc_loss,
        )
        return out if return_dict else out.to_tuple()
