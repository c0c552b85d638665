"""The scFoundation-style backbone (xTrimoGene; Hao et al., Nat Methods 2024).

Encoder over the nonzero, unmasked genes only (no `<cls>`) plus two total-count tokens T and S, auto-discretization
value embedding added to a plain gene embedding (its "pos_emb", no norm), a LayerNorm after the encoder; head =
scFoundation's decoder over all G genes of the store and the T / S tokens, whose input is every gene's value embedding
with the encoder states written at the encoder genes' columns (and T / S's encoder states), plus every token's
identity embedding; its layers are pre-norm with FAVOR+ (`decoder_attention="performer"`, scFoundation's) or exact
attention (`heads.ScFoundationDecoder`). Cell embedding "all" = concat(S state, T state, max-pool, mean-pool over the
genes) as scFoundation's get_embedding (4 x hidden). `import_checkpoint` reads scFoundation's `models.ckpt`.

Layouts: padded, the encoder input is (B, L) genes and the T / S tokens are put first here (the encoder has no
positional order, so this equals scFoundation's appending them, and keeps the genes at fixed slots 2..L+1); packed,
each cell's segment starts with two reserved slots that the T / S tokens fill. T / S have no graph node: their keys
are masked in the fusion. Tokenization: `grnformer_ds.data.scfoundation_collator`.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import initialization as init

from .backbone_base import Backbone, ImportedCheckpoint, map_torch_encoder_layer, register_backbone
from .dummy_graphs import add_graphs
from .embeddings import AutoDiscretizationEncoder, GeneEncoder, build_value_encoder
from .layout import Embedded, keys_without_lead, pool_packed, pool_padded
from .performer import PerformerAttention


@register_backbone
class ScFoundationBackbone(Backbone):
    name = "scfoundation"
    # decoder_*: scFoundation's decoder is performer-pytorch's pre-norm GELU stack; decoder_attention "exact" for a
    # new model, "performer" (FAVOR+, decoder_performer_features random features, None = int(d ln d)) for an import
    defaults = {"value_encoding": "autobin", "final_layer_norm": True, "cell_embedding_pooling": "all",
                "decoder_norm_first": True, "decoder_hidden_act": "gelu", "decoder_attention": "exact",
                "decoder_performer_features": None}
    decoder_attentions = ("exact", "performer")
    poolings = ("all", "max", "mean")
    lead_slots = 2
    model_inputs = ("total_counts",)
    head_inputs = ("decoder_values", "decoder_input_ids")

    def validate(self, config) -> None:
        super().validate(config)
        if config.decoder_hidden_size % config.decoder_num_attention_heads:
            raise ValueError(f"GRNFormerConfig: decoder_hidden_size={config.decoder_hidden_size} is not divisible by "
                             f"decoder_num_attention_heads={config.decoder_num_attention_heads}")
        if config.decoder_attention not in self.decoder_attentions:
            raise ValueError(f"GRNFormerConfig: decoder_attention={config.decoder_attention!r} is not one of "
                             f"{list(self.decoder_attentions)}")

    def build_embeddings(self, model, config) -> None:
        # scFoundation's gene identity embedding is a plain embedding (its "pos_emb"); scGPT normalises it
        model.gene_encoder = GeneEncoder(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         config.layer_norm_eps, use_norm=False)
        model.value_encoder = build_value_encoder(config)
        # identity embeddings of the two total-count tokens T and S (scFoundation's gene ids 19264, 19265)
        model.total_count_embeddings = nn.Embedding(2, config.hidden_size)

    def build_head(self, lm, config) -> None:
        from .heads import ScFoundationDecoder

        lm.decoder = ScFoundationDecoder(config)

    def init_weights(self, module, config) -> bool:
        if isinstance(module, AutoDiscretizationEncoder):
            init.normal_(module.mask_embedding, mean=0.0, std=config.initializer_range)
            init.normal_(module.pad_embedding, mean=0.0, std=config.initializer_range)
            return True
        if isinstance(module, PerformerAttention):
            init.copy_(module.projection_matrix, module.draw_projection())
            return True
        return False

    # ------------------------------------------------------------------ encoder side
    def _total_count_tokens(self, model, total_counts, dtype):
        if total_counts is None:
            raise ValueError("GRNFormerModel: backbone='scfoundation' needs total_counts (B, 2)")
        tc = model.value_encoder(total_counts.to(dtype)) + model.total_count_embeddings.weight.unsqueeze(0)
        return tc  # (B, 2, H)

    def embed(self, model, input_ids, values, attention_mask, packed, inputs) -> Embedded:
        emb = super().embed(model, input_ids, values, attention_mask, packed, inputs)
        tc = self._total_count_tokens(model, inputs.get("total_counts"), values.dtype)
        if not emb.packed:
            bsz = input_ids.shape[0]
            lead = torch.zeros(bsz, 2, dtype=torch.bool, device=attention_mask.device)
            emb.tokens = torch.cat([tc.to(emb.tokens.dtype), emb.tokens], dim=1)
            emb.mask = torch.cat([~lead, attention_mask], dim=1)
            emb.gene_tokens = torch.cat([lead, attention_mask], dim=1)
            emb.out_slice = 2
            emb.extras["input_mask"] = attention_mask
            return emb
        # the T and S tokens take the two reserved slots at the start of each cell's segment
        ts_slots = torch.stack([emb.starts, emb.starts + 1], dim=1).reshape(-1)  # (2B,)
        tokens = emb.tokens[0].index_copy(0, ts_slots, tc.reshape(-1, tc.shape[-1]).to(emb.tokens.dtype))
        emb.tokens = tokens.unsqueeze(0)
        emb.extras["ts_slots"] = ts_slots
        return emb

    def fusion_keys(self, model, emb: Embedded, structure_states: torch.Tensor):
        hidden = structure_states.shape[-1]
        if not emb.packed:
            # the total-count tokens have no graph node: zero states, masked keys
            bsz = emb.n_cells
            struct = structure_states.reshape(bsz, -1, hidden)
            kv = torch.cat([struct.new_zeros(bsz, 2, hidden), struct], dim=1)
            return kv, emb.gene_tokens, None
        # keys are the cells' gene tokens only, as the padded layout's key mask
        kv, kv_seq = keys_without_lead(structure_states, emb, 2)
        return kv, None, kv_seq

    def _total_count_states(self, emb: Embedded, states: torch.Tensor) -> torch.Tensor:
        """(B, 2, H) final states of T and S; states (B, Lt, H) padded / (Tt, H) packed."""
        if emb.packed:
            return states[emb.extras["ts_slots"]].reshape(emb.n_cells, 2, -1)
        return states[:, :2]

    def cell_embedding_size(self, config) -> int:
        return 4 * config.hidden_size if config.cell_embedding_pooling == "all" else config.hidden_size

    def cell_embedding(self, model, emb: Embedded, states: torch.Tensor) -> torch.Tensor:
        pooling = model.config.cell_embedding_pooling
        pool = (lambda how: pool_packed(states, emb, how)) if emb.packed else (
            lambda how: pool_padded(states, emb.gene_tokens, how))
        if pooling != "all":
            return pool(pooling)
        tc = self._total_count_states(emb, states)
        # "all" as scFoundation's get_embedding: S state, T state, max-pool, mean-pool over the genes
        return torch.cat([tc[:, 1], tc[:, 0], pool("max"), pool("mean")], dim=-1)

    def outputs(self, model, emb: Embedded, hidden: torch.Tensor) -> dict:
        out = super().outputs(model, emb, hidden)
        out["total_count_states"] = self._total_count_states(emb, hidden[0] if emb.packed else hidden)
        return out

    # ------------------------------------------------------------------ head
    @staticmethod
    def decoder_inputs(lm, token_states, token_ids, token_cells, is_gene, decoder_values, decoder_input_ids):
        """scFoundation decoder input (B, G, H): value embedding of every gene, the encoder states written at the
        encoder genes' columns, plus every gene's identity embedding.

        Encoder tokens come flat, whatever the layout: token_states (N, H), token_ids (N,), token_cells (N,) the
        cell of each token (in [0, B)), is_gene (N,) bool (False at padding, T / S and dummy slots). Each gene
        token's state is copied to row cell * G + column of a (B * G + 1, H) table whose last row takes every
        non-gene token (static shapes, no host sync)."""
        bsz, n_genes = decoder_values.shape
        if decoder_input_ids.dim() == 1:
            decoder_input_ids = decoder_input_ids.unsqueeze(0).expand(bsz, -1)
        model = lm.grnformer
        dec = model.value_encoder(decoder_values).to(token_states.dtype)
        hidden = dec.shape[-1]
        # column of each encoder token in its cell's decoder gene list, through a (B, vocab) lookup table
        lut = torch.full((bsz, lm.config.vocab_size), -1, dtype=torch.long, device=token_ids.device)
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

    def head(self, lm, enc, emb: Embedded, input_ids, inputs) -> dict:
        decoder_values, decoder_input_ids = inputs.get("decoder_values"), inputs.get("decoder_input_ids")
        if decoder_values is None or decoder_input_ids is None:
            raise ValueError("GRNFormerForMaskedLM: backbone='scfoundation' needs decoder_values (B, G) and "
                             "decoder_input_ids (B, G) or (G,)")
        states = enc.last_hidden_state
        if emb.packed:
            token_cells = emb.seq_ids.clamp(max=max(emb.n_cells - 1, 0))  # dummy tokens borrow the last cell
            flat = (states[0], input_ids[0], token_cells, emb.gene_tokens)
        else:
            bsz, seqlen = input_ids.shape
            cells = torch.arange(bsz, device=input_ids.device).repeat_interleave(seqlen)
            flat = (states.reshape(bsz * seqlen, -1), input_ids.reshape(-1), cells,
                    emb.extras["input_mask"].reshape(-1))
        dec_in = self.decoder_inputs(lm, *flat, decoder_values, decoder_input_ids)
        # T and S join the decoder's tokens as in scFoundation (they are in its encoder_labels): encoder state +
        # identity embedding; their predictions are not returned (no label)
        ts = enc.total_count_states + lm.grnformer.total_count_embeddings.weight.unsqueeze(0)
        predictions, decoder_states = lm.decoder(torch.cat([dec_in, ts.to(dec_in.dtype)], dim=1))
        n_genes = decoder_values.shape[1]
        return {"predictions": predictions[:, :n_genes], "gene_embeddings": decoder_states[:, :n_genes]}

    # ------------------------------------------------------------------ other projects' checkpoints
    def import_checkpoint(self, path: str, variant: str | None = None, gene_list: str | None = None):
        """scFoundation's `models.ckpt` (`import_scfoundation`)."""
        return import_scfoundation(path, variant, gene_list)

    # ------------------------------------------------------------------ inputs
    def dummy_batch(self, config, gen, bsz, seqlen, n_genes, lengths, mask_ratio, first_gene_id, graphs,
                    edges_per_cell):
        """L = seq_len encoder slots (nonzero unmasked genes), G = n_genes decoder genes, masked genes (a few
        nonzero ones and a few zeros, as scFoundation masks both) get mask_value in decoder_values and a label."""
        mask = torch.zeros(bsz, seqlen, dtype=torch.bool)
        cols = torch.stack([torch.randperm(n_genes, generator=gen)[:seqlen] for _ in range(bsz)])
        dense = torch.zeros(bsz, n_genes)
        for b in range(bsz):
            dense[b, cols[b, : lengths[b]]] = torch.rand(lengths[b], generator=gen) * 4 + 0.1
        is_masked = (torch.rand(bsz, n_genes, generator=gen) < mask_ratio * 0.2)
        for b in range(bsz):
            is_masked[b, cols[b, lengths[b] - 1]] = True
        labels = torch.where(is_masked, dense, torch.full_like(dense, -100.0))
        decoder_values = torch.where(is_masked, torch.full_like(dense, config.mask_value), dense)
        input_ids = torch.full((bsz, seqlen), config.pad_token_id, dtype=torch.long)
        values = torch.full((bsz, seqlen), config.pad_value)
        for b in range(bsz):
            cell_cols = cols[b, : lengths[b]]
            enc_cols = cell_cols[~is_masked[b, cell_cols]]
            n = len(enc_cols)
            input_ids[b, :n] = enc_cols + first_gene_id
            values[b, :n] = dense[b, enc_cols]
            mask[b, :n] = True
        total = dense.expm1().sum(1).clamp(min=1).log10()
        batch = dict(input_ids=input_ids, values=values, attention_mask=mask,
                     total_counts=torch.stack([total, total], dim=1).float(), decoder_values=decoder_values,
                     decoder_input_ids=(torch.arange(n_genes) + first_gene_id).expand(bsz, -1).contiguous(),
                     labels=labels)
        if graphs:
            add_graphs(batch, gen, mask, 0, edges_per_cell)
        return batch


# ----------------------------------------------------------------------------------------------- scFoundation files
# `models.ckpt` (BioMap's release) holds several fine-tuned copies of the 100M model, each {config, state_dict} with
# "model."-prefixed MaeAutobin keys: "cell" (cell embeddings; the default here), "gene" (gene embeddings), "rde"
# (read-depth enhancement). A file with config / state_dict at the top (one model) is read too.
SCFOUNDATION_VARIANTS = ("cell", "gene", "rde")
SCFOUNDATION_GENE_FILE = "OS_scRNA_gene_index.19264.tsv"  # the gene order of pos_emb, shipped beside the model code
_GENE_LIST_HINT = (f"pass --gene-list {SCFOUNDATION_GENE_FILE} (in scFoundation's repository under model/, and in "
                   f"the omicverse wheel under omicverse/llm/scfoundation/)")

# MaeAutobin names -> ours. The encoder is torch's TransformerEncoderLayer stack (in_proj = q; k; v rows); the
# decoder is performer-pytorch's (layers.{i}.0 = PreLayerNorm(SelfAttention), layers.{i}.1 =
# PreLayerNorm(Chunk(FeedForward))) or, in some configs, the same torch stack as the encoder.
_SCF_DIRECT = {
    "token_emb.mlp.weight": "grnformer.value_encoder.mlp1.weight",
    "token_emb.mlp.bias": "grnformer.value_encoder.mlp1.bias",
    "token_emb.mlp2.weight": "grnformer.value_encoder.mlp2.weight",
    "token_emb.mlp2.bias": "grnformer.value_encoder.mlp2.bias",
    "token_emb.emb.weight": "grnformer.value_encoder.bin_embeddings.weight",
    "decoder_embed.weight": "decoder.embed.weight",
    "decoder_embed.bias": "decoder.embed.bias",
    "norm.weight": "decoder.norm.weight",
    "norm.bias": "decoder.norm.bias",
    "to_final.weight": "decoder.to_final.weight",
    "to_final.bias": "decoder.to_final.bias",
}
_PERFORMER_LAYER = {"0.norm.": "norm1.", "0.fn.to_q.": "self_attn.q_proj.", "0.fn.to_k.": "self_attn.k_proj.",
                    "0.fn.to_v.": "self_attn.v_proj.", "0.fn.to_out.": "self_attn.o_proj.",
                    "0.fn.fast_attention.projection_matrix": "self_attn.projection_matrix",
                    "1.norm.": "norm2.", "1.fn.fn.w1.": "ffn.linear1.", "1.fn.fn.w2.": "ffn.linear2."}


def map_scfoundation_state_dict(state: dict) -> tuple[dict, list[str], str]:
    """MaeAutobin state dict (with or without the "model." prefix) -> (ours without the gene / T / S embeddings,
    unused keys, decoder kind "performer" | "transformer"). pos_emb and the mask / pad embeddings are left to the
    caller (they need the gene count). Raises ValueError on an unknown layout."""
    ours, unused, decoder = {}, [], None
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key in _SCF_DIRECT:
            ours[_SCF_DIRECT[key]] = value
        elif key.startswith("encoder.transformer_encoder."):
            i, rest = key[len("encoder.transformer_encoder."):].split(".", 1)
            if not map_torch_encoder_layer(rest, value, f"grnformer.layers.{i}.", ours):
                unused.append(key)
        elif key.startswith("encoder.norm."):
            ours["grnformer.final_norm." + key[len("encoder.norm."):]] = value
        elif key.startswith("encoder.performer."):
            raise ValueError("has a Performer encoder (encoder.performer.*); only scFoundation's transformer "
                             "encoder (encoder.transformer_encoder.*) is supported")
        elif key.startswith("decoder.performer.net.layers."):
            decoder = "performer"
            i, rest = key[len("decoder.performer.net.layers."):].split(".", 1)
            for theirs, mine in _PERFORMER_LAYER.items():
                if rest.startswith(theirs):
                    ours[f"decoder.layers.{i}.{mine}{rest[len(theirs):]}"] = value
                    break
            else:
                unused.append(key)
        elif key.startswith("decoder.transformer_encoder."):
            decoder = "transformer"
            i, rest = key[len("decoder.transformer_encoder."):].split(".", 1)
            if not map_torch_encoder_layer(rest, value, f"decoder.layers.{i}.", ours):
                unused.append(key)
        elif key.startswith("decoder.norm."):  # the decoder stack's own final norm (PerformerModule.norm)
            ours["decoder.layers_norm." + key[len("decoder.norm."):]] = value
        elif key.endswith("calls_since_last_redraw"):
            pass  # performer-pytorch's redraw counter: training state, no weight
        elif key not in ("pos_emb.weight", "token_emb.emb_mask.weight", "token_emb.emb_pad.weight"):
            unused.append(key)
    needed = ("token_emb.emb.weight", "pos_emb.weight", "encoder.transformer_encoder.0.linear1.weight")
    present = {k.removeprefix("model.") for k in state}
    lacking = [k for k in needed if k not in present]
    if lacking or decoder is None:
        raise ValueError("not an scFoundation MaeAutobin state dict (no " + (lacking[0] if lacking else
                         "decoder.performer.* or decoder.transformer_encoder.* weights") + ")")
    return ours, unused, decoder


def _read_models_ckpt(path: str, variant: str | None) -> tuple[dict, dict, str]:
    """(config, state_dict, "path [variant]") of one model of a models.ckpt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (scFoundation's models.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: one line, whatever torch raised
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not an scFoundation checkpoint (expected a dict, got {type(ckpt).__name__})")
    models = [k for k in SCFOUNDATION_VARIANTS if isinstance(ckpt.get(k), dict)]
    source = path
    if models:
        chosen = variant or ("cell" if "cell" in models else models[0])
        if chosen not in models:
            raise ValueError(f"{path}: has no {chosen!r} model (--variant one of {models})")
        entry, source = ckpt[chosen], f"{path} [{chosen}]"
    elif variant is not None:
        raise ValueError(f"{path}: --variant {variant}: this checkpoint holds one model (no "
                         f"{list(SCFOUNDATION_VARIANTS)} entries)")
    else:
        entry = ckpt
    config = entry.get("config", entry.get("configs"))
    state = entry.get("state_dict", entry.get("model_state_dict"))
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ValueError(f"{source}: not an scFoundation checkpoint (expected config and state_dict entries, found "
                         f"{sorted(map(str, entry))[:6]})")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: state_dict is not parameter name -> tensor")
    return config, state, source


def _model_config(config: dict, source: str) -> dict:
    """scFoundation's config, nested (model, model_config.<model>, dataset_config.rnaseq) or flat -> one flat dict,
    as its own loader (`convertconfig`) merges it."""
    flat = dict(config)
    model = config.get("model", config.get("model_type", "mae_autobin"))
    if isinstance(config.get("model_config"), dict):
        flat.update(config["model_config"].get(model, {}))
    rnaseq = (config.get("dataset_config") or {}).get("rnaseq") if isinstance(config.get("dataset_config"), dict) \
        else None
    if isinstance(rnaseq, dict):
        flat.update(rnaseq)
    if model != "mae_autobin":
        raise ValueError(f"{source}: model {model!r} is not scFoundation's mae_autobin")
    for part in ("encoder", "decoder"):
        if not isinstance(flat.get(part), dict):
            raise ValueError(f"{source}: config has no {part} section (hidden_dim, depth, heads, module_type)")
    return flat


def read_gene_list(path: str) -> list[str]:
    """scFoundation's gene order: its TSV (gene_name, index columns) or one gene per line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the checkpoint's gene order; {_GENE_LIST_HINT})")
    with open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip("\n\r") for ln in fh if ln.strip()]
    header = lines[0].split("\t") if lines else []
    if "gene_name" in header:
        col = header.index("gene_name")
        rows = [ln.split("\t") for ln in lines[1:]]
        if "index" in header:
            idx = header.index("index")
            try:
                rows.sort(key=lambda r: int(r[idx]))
            except (ValueError, IndexError):
                raise ValueError(f"{path}: the index column is not all integers") from None
        genes = [r[col].strip() for r in rows]
    else:
        genes = [ln.strip() for ln in lines]
    seen: set[str] = set()
    for gene in genes:
        if gene in seen:
            raise ValueError(f"{path}: gene {gene!r} is listed twice")
        seen.add(gene)
    return genes


def import_scfoundation(path: str, variant: str | None = None, gene_list: str | None = None) -> ImportedCheckpoint:
    """scFoundation's models.ckpt (+ its gene order) -> `ImportedCheckpoint`.

    Vocabulary: the G genes in pos_emb order (ids 0..G-1), then `<pad>` (pos_emb's padding row) and `<cls>` (not
    used by this backbone; a zero row). pos_emb rows G, G+1 (T, S) become `total_count_embeddings`."""
    config, state, source = _read_models_ckpt(path, variant)
    cfg = _model_config(config, source)
    try:
        ours, unused, decoder = map_scfoundation_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    pos = state["pos_emb.weight"]
    hidden = pos.shape[1]
    seq_len = int(cfg.get("seq_len", pos.shape[0] - 1))
    if pos.shape[0] != seq_len + 1:
        raise ValueError(f"{source}: config seq_len={seq_len} but pos_emb.weight has {pos.shape[0]} rows (expected "
                         f"seq_len + 1)")
    n_genes = seq_len - 2  # the genes, then T and S
    gene_file = gene_list or os.path.join(os.path.dirname(os.path.abspath(path)), SCFOUNDATION_GENE_FILE)
    if gene_list is None and not os.path.isfile(gene_file):
        raise FileNotFoundError(f"{gene_file}: missing (the checkpoint's gene order); {_GENE_LIST_HINT}")
    genes = read_gene_list(gene_file)
    if len(genes) != n_genes:
        raise ValueError(f"{gene_file}: lists {len(genes):,} genes but {source} has {n_genes:,} gene positions "
                         f"(seq_len {seq_len} = genes + T + S)")
    ours["grnformer.gene_encoder.embedding.weight"] = torch.cat(
        [pos[:n_genes], pos[seq_len:seq_len + 1], pos.new_zeros(1, hidden)])  # genes, <pad>, <cls>
    ours["grnformer.total_count_embeddings.weight"] = pos[n_genes:seq_len].clone()
    for theirs, mine in (("token_emb.emb_mask.weight", "mask_embedding"), ("token_emb.emb_pad.weight",
                                                                          "pad_embedding")):
        if theirs not in state:
            raise ValueError(f"{source}: not an scFoundation MaeAutobin state dict (no {theirs})")
        ours[f"grnformer.value_encoder.{mine}"] = state[theirs].reshape(-1)

    enc, dec = cfg["encoder"], cfg["decoder"]
    enc_layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("grnformer.layers."))
    dec_layers = 1 + max(int(k.split(".")[2]) for k in ours if k.startswith("decoder.layers."))
    for part, sub, n in (("encoder", enc, enc_layers), ("decoder", dec, dec_layers)):
        if "depth" in sub and int(sub["depth"]) != n:
            raise ValueError(f"{source}: config {part}.depth={sub['depth']} but the weights have {n} {part} layers")
        if str(sub.get("module_type", "transformer" if part == "encoder" else decoder)) != \
                ("transformer" if part == "encoder" else decoder):
            raise ValueError(f"{source}: config {part}.module_type={sub.get('module_type')!r} does not match the "
                             f"weights")
    dec_hidden = ours["decoder.embed.weight"].shape[0]
    if "hidden_dim" in dec and int(dec["hidden_dim"]) != dec_hidden:
        raise ValueError(f"{source}: config decoder.hidden_dim={dec['hidden_dim']} but decoder_embed has width "
                         f"{dec_hidden}")
    if "hidden_dim" in enc and int(enc["hidden_dim"]) != hidden:
        raise ValueError(f"{source}: config encoder.hidden_dim={enc['hidden_dim']} but pos_emb has width {hidden}")
    dec_heads = int(dec.get("heads", 8))
    if decoder == "performer" and dec_heads * int(dec.get("dim_head", dec_hidden // dec_heads)) != dec_hidden:
        raise ValueError(f"{source}: decoder heads x dim_head = {dec_heads} x {dec.get('dim_head')} is not its "
                         f"width {dec_hidden} (only that layout is supported)")
    projection = ours.get("decoder.layers.0.self_attn.projection_matrix")
    vocab = {g: i for i, g in enumerate(genes)}
    vocab.update({"<pad>": n_genes, "<cls>": n_genes + 1})
    out = {
        "vocab_size": n_genes + 2, "hidden_size": hidden, "num_hidden_layers": enc_layers,
        "num_attention_heads": int(enc.get("heads", 12)),
        "intermediate_size": int(ours["grnformer.layers.0.ffn.linear1.weight"].shape[0]),
        "hidden_act": "relu", "norm_first": False, "final_layer_norm": True, "layer_norm_eps": 1e-5,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,  # torch's TransformerEncoderLayer default
        "pad_token_id": n_genes, "cls_token_id": n_genes + 1, "value_encoding": "autobin",
        "autobin_num_bins": int(ours["grnformer.value_encoder.bin_embeddings.weight"].shape[0]),
        "autobin_alpha": float(cfg.get("bin_alpha", 1.0)),
        "mask_value": float(cfg.get("mask_token_id", 102)), "pad_value": float(cfg.get("pad_token_id", 103)),
        "cell_embedding_pooling": "all",
        "decoder_hidden_size": dec_hidden, "decoder_num_hidden_layers": dec_layers,
        "decoder_num_attention_heads": dec_heads,
        "decoder_intermediate_size": int(ours["decoder.layers.0.ffn.linear1.weight"].shape[0]),
        "decoder_attention": "performer" if decoder == "performer" else "exact",
        "decoder_norm_first": decoder == "performer",
        "decoder_hidden_act": "gelu" if decoder == "performer" else "relu",
        "decoder_performer_features": None if projection is None else int(projection.shape[0]),
    }
    return ImportedCheckpoint(config=out, state_dict=ours, vocab=vocab, unused=unused, source=source)
