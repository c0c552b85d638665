"""The scFoundation-style backbone (xTrimoGene; Hao et al., Nat Methods 2024).

Encoder over the nonzero, unmasked genes only (no `<cls>`) plus two total-count tokens T and S, auto-discretization
value embedding added to a plain gene embedding (its "pos_emb", no norm), a LayerNorm after the encoder; head = a
transformer decoder over all G genes of the store, whose input is every gene's value embedding with the encoder
states written at the encoder genes' columns, plus every gene's identity embedding. Cell embedding "all" =
concat(S state, T state, max-pool, mean-pool over the genes) as scFoundation's get_embedding (4 x hidden).

Layouts: padded, the encoder input is (B, L) genes and the T / S tokens are put first here (the encoder has no
positional order, so this equals scFoundation's appending them, and keeps the genes at fixed slots 2..L+1); packed,
each cell's segment starts with two reserved slots that the T / S tokens fill. T / S have no graph node: their keys
are masked in the fusion. Tokenization: `grnformer_ds.data.scfoundation_collator`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .backbone_base import Backbone, register_backbone
from .dummy_graphs import add_graphs
from .embeddings import AutoDiscretizationEncoder, GeneEncoder, build_value_encoder
from .layout import Embedded, keys_without_lead, pool_packed, pool_padded


@register_backbone
class ScFoundationBackbone(Backbone):
    name = "scfoundation"
    defaults = {"value_encoding": "autobin", "final_layer_norm": True, "cell_embedding_pooling": "all"}
    poolings = ("all", "max", "mean")
    lead_slots = 2
    model_inputs = ("total_counts",)
    head_inputs = ("decoder_values", "decoder_input_ids")

    def validate(self, config) -> None:
        super().validate(config)
        if config.decoder_hidden_size % config.decoder_num_attention_heads:
            raise ValueError(f"GRNFormerConfig: decoder_hidden_size={config.decoder_hidden_size} is not divisible by "
                             f"decoder_num_attention_heads={config.decoder_num_attention_heads}")

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
        predictions, gene_embeddings = lm.decoder(dec_in)
        return {"predictions": predictions, "gene_embeddings": gene_embeddings}

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
