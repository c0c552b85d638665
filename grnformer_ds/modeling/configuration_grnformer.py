"""`GRNFormerConfig`: one HF config for every backbone, the GRN structure encoder and the fusion adapter.

Only torch / transformers / stdlib imports and relative imports here: `save_pretrained` copies this file into the
export folder, where `trust_remote_code=True` loads it without grnformer_ds installed.

Attention implementation: transformers owns the `attn_implementation` keyword (it is popped into
`config._attn_implementation`, is NOT written to config.json, and is chosen again at load time, e.g.
`from_pretrained(path, attn_implementation="flash_attention_2")`). GRNFormer uses exactly that field; the model
validates it once at build (`eager` | `sdpa` (default) | `flash_attention_2`).
"""
from __future__ import annotations

from transformers import PretrainedConfig

from .backbones import backbone_names, get_backbone
from .presets import PRESETS

VALUE_ENCODINGS = ("continuous", "categorical", "autobin")
GNN_TYPES = ("sage", "gcn", "gin", "gat")
FUSION_POSITIONS = ("replace", "after")
GNN_NODE_INPUTS = ("gene", "gene+value")
GNN_AGGREGATIONS = ("scatter", "csr")
GRAPH_SCALES = ("celltype", "cell")


class GRNFormerConfig(PretrainedConfig):
    r"""Configuration of a GRNFormer model (Qiu et al., ACL Findings 2025).

    Backbone:
        backbone (`str`, "scgpt"): a registered backbone (`backbones.backbone_names()`): "scgpt" (gene token + value
            embedding, encoder, `<cls>` cell embedding, MLP expression decoder), "scfoundation" (xTrimoGene: encoder
            over nonzero genes + two total-count tokens, auto-discretization value embedding, transformer decoder
            over all genes), "scpalm" (patched gene embedding + pathway codebook; `backbone_scpalm`), or a plug-in.
            Fields left None below take the backbone's defaults (`Backbone.defaults`), which may also add the
            backbone's own fields (e.g. scPaLM's patch_size).
        backbone_module (`str`, None): the module that registers a plug-in backbone, imported when the backbone is
            not registered yet (so that a saved model finds its backbone where that module is importable).
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        hidden_dropout_prob, attention_probs_dropout_prob, layer_norm_eps, initializer_range: as in BERT.
        norm_first (`bool`, False): pre-norm layers; both reference models are post-norm.
        final_layer_norm (`bool`, None): LayerNorm after the encoder; None = backbone default (scFoundation and
            scPaLM yes, scGPT no).
        pad_token_id, cls_token_id: ids of `<pad>` and `<cls>` in vocab.json.
    Values:
        value_encoding (`str`, None): "continuous" (scGPT's whole-human default: Linear-ReLU-Linear-LayerNorm on the
            binned value), "categorical" (one embedding per bin), "autobin" (scFoundation's auto-discretization).
            None = the backbone's ("continuous" for scgpt / scpalm, "autobin" for scfoundation).
        n_bins (`int`, 51): scGPT's number of value bins (categorical embedding size is n_bins + 2).
        max_value (`float`, 512): clamp of the continuous value encoder input (scGPT).
        mask_value (-1), pad_value (-2): value at masked / padded positions in the batch.
        autobin_num_bins (`int`, 100), autobin_alpha (`float`, 1.0): scFoundation auto-discretization.
        use_mvc (`bool`, False): scGPT's gene-expression prediction from the cell embedding (GEPC/MVC) as an extra
            loss (scgpt only).
    scFoundation decoder:
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size.
        The scfoundation backbone adds (its `defaults`): decoder_norm_first (True: pre-norm layers, as scFoundation's
        Performer stack), decoder_hidden_act ("gelu"), decoder_attention ("exact" through the attention dispatch, or
        "performer": FAVOR+ as scFoundation, linear in the genes; what an imported models.ckpt uses),
        decoder_performer_features (random features per head, None = int(d ln d)).
        cell_embedding_pooling (`str`, None): "cls" (scgpt), "all" = concat(S token, T token, max, mean) as
            scFoundation's get_embedding (4 x hidden), "max", "mean"; each backbone lists the ones it supports.
            None = backbone default.
    Structure encoder (torch-geometric):
        use_graph (`bool`, True): build the structure encoder and the fusion adapter. False = the plain backbone.
        gnn_type (`str`, "sage"): "sage" | "gcn" | "gin" | "gat".
        gnn_num_layers (`int`, 2), gnn_hidden_size (`int`, None = hidden_size), gnn_dropout (`float`, 0.0),
        gat_heads (`int`, 4).
        gnn_share_weights (`bool`, True): one GNN for both graph scales (else one per scale).
        gnn_add_reverse_edges (`bool`, True): make the TF -> target graphs undirected before message passing.
        gnn_use_edge_weight (`bool`, True): pass edge weights to convs that take them (GCN: edge_weight, GAT:
            edge_attr); SAGE and GIN ignore weights.
        gnn_node_input (`str`, "gene+value"): node features = gene embedding (+ the cell's value embedding).
        graph_scales (`list[str]`, ["celltype", "cell"]): which graph scales to use; node embeddings are summed.
        gnn_aggregation (`str`, "scatter"): how messages reach their nodes: "scatter" (PyG's per-edge scatter-add)
            or "csr" (a sparse adjacency product over destination-sorted graphs; `gnn.StructureEncoder`).
    Fusion (graph topological adapter):
        fusion_position (`str`, "replace"): "replace" the last encoder layer (paper default) or "after" it.
        fusion_num_attention_heads (`int`, None = num_attention_heads).
        fusion_beta_init (`float`, 1.0): initial value of the learnable β in `h = h_expr + β·h_fusion`.
        classifier_hidden_layers (`int`, 2), classifier_dropout (`float`, 0.1): the cell-level task head
            (`GRNFormerForCellClassification`; scGPT's ClsDecoder has 2 hidden blocks). With HF's `num_labels`,
            `id2label` / `label2id` and `problem_type`. condition_feature_size (`int`, 0): width of a per-sample
            condition vector the classifier also reads (e.g. a drug's fingerprint; 0 = none). condition_genes
            (`bool`, False): the condition is a set of genes (`condition_gene_ids`, a genetic perturbation), read
            as the mean of their gene embeddings.
    """

    model_type = "grnformer"

    def __init__(
        self,
        backbone: str = "scgpt",
        backbone_module: str | None = None,
        vocab_size: int = 60697,
        hidden_size: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        intermediate_size: int = 512,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.2,
        attention_probs_dropout_prob: float = 0.2,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        norm_first: bool = False,
        final_layer_norm: bool | None = None,
        pad_token_id: int = 0,
        cls_token_id: int = 1,
        value_encoding: str | None = None,
        n_bins: int = 51,
        max_value: float = 512.0,
        mask_value: float = -1.0,
        pad_value: float = -2.0,
        autobin_num_bins: int = 100,
        autobin_alpha: float = 1.0,
        use_mvc: bool = False,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 6,
        decoder_num_attention_heads: int = 8,
        decoder_intermediate_size: int = 2048,
        cell_embedding_pooling: str | None = None,
        use_graph: bool = True,
        gnn_type: str = "sage",
        gnn_num_layers: int = 2,
        gnn_hidden_size: int | None = None,
        gnn_dropout: float = 0.0,
        gat_heads: int = 4,
        gnn_share_weights: bool = True,
        gnn_add_reverse_edges: bool = True,
        gnn_use_edge_weight: bool = True,
        gnn_node_input: str = "gene+value",
        graph_scales: list[str] | tuple[str, ...] = GRAPH_SCALES,
        gnn_aggregation: str = "scatter",
        fusion_position: str = "replace",
        fusion_num_attention_heads: int | None = None,
        fusion_beta_init: float = 1.0,
        classifier_hidden_layers: int = 2,
        classifier_dropout: float = 0.1,
        condition_feature_size: int = 0,
        condition_genes: bool = False,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_module = backbone_module
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.norm_first = norm_first
        self.final_layer_norm = final_layer_norm
        self.cls_token_id = cls_token_id
        self.value_encoding = value_encoding
        self.n_bins = n_bins
        self.max_value = max_value
        self.mask_value = mask_value
        self.pad_value = pad_value
        self.autobin_num_bins = autobin_num_bins
        self.autobin_alpha = autobin_alpha
        self.use_mvc = use_mvc
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.cell_embedding_pooling = cell_embedding_pooling
        self.use_graph = use_graph
        self.gnn_type = gnn_type
        self.gnn_num_layers = gnn_num_layers
        self.gnn_hidden_size = gnn_hidden_size
        self.gnn_dropout = gnn_dropout
        self.gat_heads = gat_heads
        self.gnn_share_weights = gnn_share_weights
        self.gnn_add_reverse_edges = gnn_add_reverse_edges
        self.gnn_use_edge_weight = gnn_use_edge_weight
        self.gnn_node_input = gnn_node_input
        self.graph_scales = list(graph_scales)
        self.gnn_aggregation = gnn_aggregation
        self.fusion_position = fusion_position
        self.fusion_num_attention_heads = fusion_num_attention_heads
        self.fusion_beta_init = fusion_beta_init
        self.classifier_hidden_layers = classifier_hidden_layers
        self.classifier_dropout = classifier_dropout
        self.condition_feature_size = condition_feature_size
        self.condition_genes = condition_genes
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        spec = self.backbone_spec
        if self.backbone_module is None and type(spec).__module__.rpartition(".")[0] != __name__.rpartition(".")[0]:
            self.backbone_module = type(spec).__module__  # a plug-in: where a saved model finds it again
        # the backbone's defaults fill what was left None (and add the backbone's own fields)
        for name, value in spec.all_defaults().items():
            if getattr(self, name, None) is None:
                setattr(self, name, value)
        self.validate_grnformer()

    @property
    def backbone_spec(self):
        """The registered `backbone_base.Backbone` this config selects."""
        return get_backbone(self.backbone, self.backbone_module)

    def validate_grnformer(self) -> None:
        """Raise a one-line ValueError naming the bad field (kept separate from HF's own `validate`)."""

        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"GRNFormerConfig: {name}={value!r} is not one of {list(allowed)}")

        if self.backbone not in backbone_names():  # imports backbone_module, or raises naming the registered ones
            get_backbone(self.backbone, self.backbone_module)
        choice("value_encoding", VALUE_ENCODINGS)
        choice("gnn_type", GNN_TYPES)
        choice("fusion_position", FUSION_POSITIONS)
        choice("gnn_node_input", GNN_NODE_INPUTS)
        choice("gnn_aggregation", GNN_AGGREGATIONS)
        for scale in self.graph_scales:
            if scale not in GRAPH_SCALES:
                raise ValueError(f"GRNFormerConfig: graph_scales has {scale!r}, allowed {list(GRAPH_SCALES)}")
        if not self.graph_scales and self.use_graph:
            raise ValueError("GRNFormerConfig: use_graph=True needs at least one of graph_scales")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"GRNFormerConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.fusion_heads and self.hidden_size % self.fusion_heads:
            raise ValueError(
                f"GRNFormerConfig: hidden_size={self.hidden_size} is not divisible by "
                f"fusion_num_attention_heads={self.fusion_heads}"
            )
        if self.use_graph and self.fusion_position == "replace" and self.num_hidden_layers < 1:
            raise ValueError("GRNFormerConfig: fusion_position='replace' needs num_hidden_layers >= 1")
        self.backbone_spec.validate(self)
        if self.gnn_type == "gat" and (self.gnn_hidden_size or self.hidden_size) % self.gat_heads:
            raise ValueError(
                f"GRNFormerConfig: GAT hidden size {self.gnn_hidden_size or self.hidden_size} is not divisible by "
                f"gat_heads={self.gat_heads}"
            )

    @property
    def fusion_heads(self) -> int:
        return self.fusion_num_attention_heads or self.num_attention_heads

    @property
    def num_encoder_layers(self) -> int:
        """Transformer layers actually built: one fewer when the fusion adapter replaces the last one."""
        if self.use_graph and self.fusion_position == "replace":
            return self.num_hidden_layers - 1
        return self.num_hidden_layers

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GRNFormerConfig":
        """`GRNFormerConfig.from_preset("scgpt-base", vocab_size=..., backbone=...)`; backbones add their own
        presets (e.g. "scpalm-small", which also sets backbone="scpalm")."""
        if name not in PRESETS:
            raise ValueError(f"GRNFormerConfig: unknown preset {name!r}, choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
