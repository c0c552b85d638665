"""The scPaLM-style backbone: patched gene embedding, genetic-pathway codebook, cell-level aggregation.

After scPaLM (Chen, Wang, Zitnik, Kellis, Chen: "Pre-training of Single-cell Language Models through Genetic
Pathway Learning", ICML 2024 workshop; longer version on OpenReview, 17fVzhteZT). The published text describes the
parts, not every formula; where it leaves a choice open, the choice and the reason are stated here.

1. Permutation-invariant patched gene embedding. A cell's expressed genes are put in a canonical order, by gene
   token id (choice: the input order of genes carries no biology, so it must not matter; sorting makes the whole
   token multiset independent of it), and cut into patches of ``patch_size`` consecutive genes. A patch token is
   ``LayerNorm(sum_g phi(e_g + v_g))`` over its genes (a DeepSets sum: invariant to the order inside the patch; e_g
   the normalised gene embedding, v_g the value embedding, phi a 2-layer MLP). A cell with n genes becomes
   ``1 + ceil(n / patch_size)`` tokens (`<cls>` first) instead of ``1 + n``: the transformer, whose cost grows with
   the square of the tokens, sees ``patch_size`` times fewer. Choice: patches are cut per cell from its own expressed
   genes (rather than a fixed gene partition shared by all cells) so that the reduction is exactly ``patch_size``
   whatever the sparsity; the gene identities inside the sum say which genes a patch holds.
2. Genetic Pathway Learning module: each patch token is matched to the nearest of ``codebook_size`` learned codes
   (cosine similarity in a ``codebook_dim`` projection, the l2-normalised lookup that keeps codebooks in use) and
   the code's embedding is added to the token: a discrete vocabulary of collective gene behaviour that the
   transformer reads beside the continuous token. Trained with the VQ-VAE codebook and commitment losses
   (``codebook_commitment`` = beta) and a code-usage entropy regulariser (``codebook_entropy_weight``; without it
   the codebook collapsed to one code on the demo data); the code-usage perplexity is reported (a collapsed
   codebook has perplexity 1).
   Choice: added, not substituted, so that quantisation never removes expression detail the head needs.
3. Cell-level aggregation into `<cls>` with its masking strategy: masking hides whole patches (every gene value in
   a masked patch, ``mask_ratio`` of a cell's patches; `grnformer_ds.data.scpalm_collator`), so a masked patch can
   only be recovered from the other patches and the cell token. Two losses read the masked genes: from their patch
   state (+ the gene identity) and from the `<cls>` state alone (inner product with a gene query, as scGPT's
   GEPC), weighted by ``cell_loss_weight``; the second forces the cell state to aggregate the whole cell. Choice: a
   constant weight (the paper's "progressive" aggregation schedule is not specified; a run can ramp it by resuming
   with another config).
4. Token-level contrastive regulariser: for every masked patch, its output state (through a projection) must
   identify the patch's own unmasked embedding among those of all masked patches of the micro-batch (InfoNCE,
   temperature ``contrastive_temperature``, weight ``contrastive_weight``; targets without gradient). Choice: the
   unmasked embedding is the natural positive, and the other masked patches of the batch are free negatives. The
   default weight, 10, is set against the MSE terms, which are in squared bins: on the demo data (100 steps) a
   weight of 0.1 left the term at chance level (ln of the masked patches per micro-batch, 3.5 nats), 10 brought it
   to 0.8 nats with the held-out MSE unchanged and more codes in use.

GRN fusion: GRN nodes are genes (the input slots, as for scGPT), tokens are patches. A patch's structure state is
the mean of its genes' structure states, and those are the fusion keys (`<cls>` has no node: its key is masked).
`layout.gene_attention` maps fusion attention over patches back to genes (a patch's weight shared equally by its
genes, matching the mean), which is what the TF-attention analysis reads; `token_index` in the output says which
patch each gene went to.

Inputs are scGPT's: `<cls>` + binned gene values per cell (padded (B, L) or packed (1, T)); the patches are made here,
so the loader, graphs and packing are the same as scGPT's. The packed layout builds the patch segments with one
host sync (their total length depends on the data), so compiled static shapes are not available for this backbone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedSequences
from .backbone_base import Backbone, register_backbone
from .layout import Embedded, keys_without_lead, packed_token_cells
from .losses import IGNORE_INDEX, masked_mse_loss


class PatchEmbedding(nn.Module):
    """DeepSets patch embedding: per-gene MLP phi, summed over a patch, then LayerNorm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, gene_states: torch.Tensor, dest: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """gene_states (N, H), dest (N,) int64 token row of each gene (n_tokens = sink) -> (n_tokens, H)."""
        sums = gene_states.new_zeros(n_tokens + 1, gene_states.shape[-1]).index_add(0, dest, self.phi(gene_states))
        return self.norm(sums[:n_tokens])


class PathwayCodebook(nn.Module):
    """Nearest-code lookup (cosine, in a low-dimensional projection) whose code embedding is added to each token.

    Loss = VQ-VAE codebook + commitment terms, + ``entropy_weight`` x (mean entropy of each token's soft assignment
    - entropy of the batch's mean assignment), the usage regulariser of lookup-free quantisation (MAGVIT-v2): without
    it the commitment term is cheapest when every token maps to one code, and the codebook collapses (perplexity 1
    on the demo data within 40 steps)."""

    def __init__(self, hidden_size: int, codebook_size: int, codebook_dim: int, temperature: float = 0.1):
        super().__init__()
        self.proj_in = nn.Linear(hidden_size, codebook_dim)
        self.codes = nn.Embedding(codebook_size, codebook_dim)
        self.proj_out = nn.Linear(codebook_dim, hidden_size)
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, commitment: float, entropy_weight: float):
        """tokens (N, H), valid (N,) bool -> (tokens + code embedding (N, H), loss (), perplexity (), code (N,))."""
        z = F.normalize(self.proj_in(tokens).float(), dim=-1)
        codes = F.normalize(self.codes.weight.float(), dim=-1)
        sim = z @ codes.t()  # (N, K) cosine
        index = sim.argmax(-1)
        q = codes[index]
        w = valid.float()
        n = w.sum().clamp(min=1)
        per_token = (z.detach() - q).pow(2).sum(-1) + commitment * (z - q.detach()).pow(2).sum(-1)
        loss = (per_token * w).sum() / n
        if entropy_weight > 0:
            p = torch.softmax(sim / self.temperature, dim=-1)
            token_entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
            mean_p = (p * w[:, None]).sum(0) / n
            batch_entropy = -(mean_p * mean_p.clamp(min=1e-12).log()).sum()
            loss = loss + entropy_weight * ((token_entropy * w).sum() / n - batch_entropy)
        usage = torch.zeros(codes.shape[0], device=tokens.device).index_add(0, index, w) / n
        perplexity = torch.exp(-(usage * usage.clamp(min=1e-12).log()).sum())
        return tokens + self.proj_out(q.to(tokens.dtype)), loss, perplexity, index


def _sorted_ranks(keys: torch.Tensor, group_start: torch.Tensor) -> torch.Tensor:
    """Rank of each element in ascending `keys` order minus its group's first sorted position (flat (N,))."""
    order = torch.argsort(keys, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.shape[0], device=keys.device)
    return ranks - group_start


@register_backbone
class ScPaLMBackbone(Backbone):
    name = "scpalm"
    static_shapes = False  # the packed patch layout's length depends on the data (module docstring)
    defaults = {"final_layer_norm": True, "patch_size": 16, "codebook_size": 64, "codebook_dim": 32,
                "codebook_commitment": 0.25, "codebook_entropy_weight": 1.0, "codebook_weight": 1.0,
                "cell_loss_weight": 1.0, "contrastive_weight": 10.0, "contrastive_temperature": 0.1}
    presets = {
        # scGPT-base width; scPaLM's own sizes are not published in the workshop text
        "scpalm-small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
                             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, patch_size=16,
                             codebook_size=256, codebook_dim=32),
        "scpalm-base": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, patch_size=16,
                            codebook_size=1024, codebook_dim=64),
    }

    def validate(self, config) -> None:
        super().validate(config)
        for name in ("patch_size", "codebook_size", "codebook_dim"):
            if int(getattr(config, name)) < 1:
                raise ValueError(f"GRNFormerConfig: {name}={getattr(config, name)} must be >= 1 (backbone='scpalm')")
        if config.contrastive_temperature <= 0:
            raise ValueError("GRNFormerConfig: contrastive_temperature must be > 0 (backbone='scpalm')")

    def build_embeddings(self, model, config) -> None:
        super().build_embeddings(model, config)  # gene_encoder (normalised) + value_encoder, as scGPT
        model.patch_embedding = PatchEmbedding(config.hidden_size, config.layer_norm_eps)
        model.pathway_codebook = PathwayCodebook(config.hidden_size, config.codebook_size, config.codebook_dim)

    def build_head(self, lm, config) -> None:
        from .heads import ExprDecoder, MVCDecoder

        lm.gene_decoder = ExprDecoder(config.hidden_size)  # from the patch state + the gene identity
        lm.cell_decoder = MVCDecoder(config.hidden_size)  # from the <cls> state alone
        lm.contrast_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def encoder_lengths(self, config, slots: torch.Tensor) -> torch.Tensor:
        """<cls> + ceil(genes / patch_size) patches for a cell of ``slots`` slots (<cls> + genes)."""
        k = int(config.patch_size)
        return 1 + torch.div((slots - 1).clamp(min=0) + k - 1, k, rounding_mode="floor")

    # ------------------------------------------------------------------ patches
    def _patch_layout(self, model, input_ids, mask, packed):
        """Where every input slot goes. Returns (dest (N,) flat token row of each slot, sink = n_tokens for
        padding / dummy slots; is_gene (N,) bool; is_cls (N,) bool; cell (N,) int64 segment of each slot;
        n_tokens; layout) with layout = (B, Lt, token mask (B, Lt)) padded or (PackedSequences of the tokens, token
        starts (B,), n_cells) packed."""
        k = int(model.config.patch_size)
        vocab = model.config.vocab_size
        ids = input_ids.reshape(-1)
        n = ids.shape[0]
        if packed is None:
            bsz, seqlen = input_ids.shape
            slot = torch.arange(seqlen, device=ids.device).expand(bsz, -1)
            is_cls = (mask & (slot == 0)).reshape(-1)
            is_gene = (mask & (slot >= 1)).reshape(-1)
            cell = torch.arange(bsz, device=ids.device).repeat_interleave(seqlen)
            n_tok = 1 + -(-(seqlen - 1) // k)  # static: the longest possible cell
            n_genes = is_gene.reshape(bsz, seqlen).sum(1)
            group_start = cell * seqlen
            seg_start = cell * n_tok
        else:
            n_cells = packed["n_cells"]
            cu = packed["cu_seq_lens"].to(torch.int64)
            lengths = cu[1:] - cu[:-1]
            cell, is_gene = packed_token_cells(cu, n_cells, n, 1)
            slot = torch.arange(n, device=ids.device) - cu[cell]
            is_cls = (slot == 0) & (cell < n_cells)
            # a cell: <cls> + ceil(genes / k) patches; a dummy padding segment: one empty token
            seg_tokens = torch.where(torch.arange(lengths.shape[0], device=ids.device) < n_cells,
                                     1 + torch.div(lengths - 1 + k - 1, k, rounding_mode="floor"),
                                     torch.ones_like(lengths))
            tok_cu = torch.zeros_like(cu)
            tok_cu[1:] = torch.cumsum(seg_tokens, 0)
            total_tokens = int(tok_cu[-1])  # the one host sync: the patch layout's length depends on the data
            group_start = cu[cell]
            seg_start = tok_cu[cell]
        # canonical order: genes by token id within their cell (non-genes after them)
        keys = cell * (vocab + 1) + torch.where(is_gene, ids, torch.full_like(ids, vocab))
        rank = _sorted_ranks(keys, group_start)
        if packed is None:
            dest = torch.where(is_gene, seg_start + 1 + torch.div(rank, k, rounding_mode="floor"),
                               torch.where(is_cls, seg_start, bsz * n_tok))
            n_tokens = bsz * n_tok
            tok_slot = torch.arange(n_tok, device=ids.device)
            n_patches = -(-n_genes // k)
            real_cell = mask.any(1)
            token_mask = (tok_slot[None, :] <= n_patches[:, None]) & real_cell[:, None]
            return dest, is_gene, is_cls, cell, n_tokens, (bsz, n_tok, token_mask)
        sink = total_tokens
        dest = torch.where(is_gene, seg_start + 1 + torch.div(rank, k, rounding_mode="floor"),
                           torch.where(is_cls, seg_start, sink))
        max_tokens = 1 + -(-(int(packed["max_length"]) - 1) // k)
        seq = PackedSequences.build(tok_cu, max_tokens, total_tokens, with_padded_view=packed["padded_view"])
        return dest, is_gene, is_cls, cell, total_tokens, (seq, tok_cu[:n_cells], n_cells)

    def _patch_tokens(self, model, gene_states, dest, is_gene, is_cls, n_tokens):
        """(n_tokens, H): patch rows = PatchEmbedding of their genes, `<cls>` rows = the `<cls>` slot's state."""
        sink = n_tokens
        tokens = model.patch_embedding(gene_states, torch.where(is_gene, dest, sink), n_tokens)
        cls_dest = torch.where(is_cls, dest, sink)
        table = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[-1])])
        return table.index_copy(0, cls_dest, gene_states.to(table.dtype))[:n_tokens]

    def embed(self, model, input_ids, values, attention_mask, packed, inputs) -> Embedded:
        cfg = model.config
        gene_emb = model.gene_encoder(input_ids)
        x = gene_emb + model.value_encoder(values)
        node_features = (x if cfg.gnn_node_input == "gene+value" else gene_emb).reshape(-1, x.shape[-1])
        mask = attention_mask if packed is None else None
        dest, is_gene, is_cls, cell, n_tokens, layout = self._patch_layout(model, input_ids, mask, packed)
        flat = x.reshape(-1, x.shape[-1])
        tokens = self._patch_tokens(model, flat, dest, is_gene, is_cls, n_tokens)
        # patch rows (not <cls>, not empty / dummy) go through the pathway codebook
        has_gene = torch.zeros(n_tokens + 1, dtype=torch.bool, device=tokens.device)
        has_gene[torch.where(is_gene, dest, n_tokens)] = True
        has_gene = has_gene[:n_tokens]
        tokens, vq_loss, perplexity, _ = model.pathway_codebook(tokens, has_gene, cfg.codebook_commitment,
                                                                cfg.codebook_entropy_weight)
        n_cells = input_ids.shape[0] if packed is None else packed["n_cells"]
        extras = {"dest": dest, "is_gene": is_gene, "is_cls": is_cls, "n_tokens": n_tokens, "gene_emb": gene_emb,
                  "values": values, "slot_cells": cell.clamp(max=max(n_cells - 1, 0)), "vq_loss": vq_loss,
                  "perplexity": perplexity}
        if packed is None:
            bsz, n_tok, token_mask = layout
            # row-local token of each slot (token t of cell b is flat row b * Lt + t)
            extras["token_index"] = torch.where(dest < n_tokens, dest - cell * n_tok, -1).reshape(input_ids.shape)
            return Embedded(tokens=tokens.reshape(bsz, n_tok, -1), mask=token_mask, seq=None,
                            gene_tokens=has_gene.reshape(bsz, n_tok), node_features=node_features, n_cells=bsz,
                            extras=extras)
        seq, starts, n_cells = layout
        extras["token_index"] = torch.where(dest < n_tokens, dest, -1).reshape(input_ids.shape)
        return Embedded(tokens=tokens.unsqueeze(0), mask=None, seq=seq, gene_tokens=has_gene,
                        node_features=node_features, n_cells=n_cells, starts=starts, seq_ids=seq.seq_ids,
                        extras=extras)

    def fusion_keys(self, model, emb: Embedded, structure_states: torch.Tensor):
        """Each patch's key is the mean structure state of its genes; `<cls>` (no node) is not a key."""
        x = emb.extras
        n_tokens, hidden = x["n_tokens"], structure_states.shape[-1]
        dest = torch.where(x["is_gene"], x["dest"], n_tokens)
        sums = structure_states.new_zeros(n_tokens + 1, hidden).index_add(0, dest, structure_states)
        counts = structure_states.new_zeros(n_tokens + 1, 1).index_add(
            0, dest, torch.ones_like(structure_states[:, :1]))
        keys = (sums / counts.clamp(min=1))[:n_tokens]
        if emb.packed:
            kv, kv_seq = keys_without_lead(keys, emb, 1)
            return kv, None, kv_seq
        return keys.reshape(emb.n_cells, -1, hidden), emb.gene_tokens, None

    def outputs(self, model, emb: Embedded, hidden: torch.Tensor) -> dict:
        out = super().outputs(model, emb, hidden)
        out.update(token_index=emb.extras["token_index"], codebook_loss=emb.extras["vq_loss"],
                   codebook_perplexity=emb.extras["perplexity"])
        return out

    # ------------------------------------------------------------------ head
    def head(self, lm, enc, emb: Embedded, input_ids, inputs) -> dict:
        x = emb.extras
        hidden = enc.last_hidden_state.shape[-1]
        states = enc.last_hidden_state.reshape(-1, hidden)  # (n_tokens, H)
        gene_emb = x["gene_emb"].reshape(-1, hidden)  # (N, H)
        # each gene reads its patch's state plus its own identity (padding / dummy slots: any row, ignored)
        decoder_in = states[x["dest"].clamp(max=x["n_tokens"] - 1)] + gene_emb
        predictions = lm.gene_decoder(decoder_in).reshape(input_ids.shape)
        cell_predictions = lm.cell_decoder(enc.cell_embedding, gene_emb.unsqueeze(0), x["slot_cells"])
        return {"predictions": predictions, "gene_embeddings": decoder_in.reshape(*input_ids.shape, hidden),
                "cell_predictions": cell_predictions.reshape(input_ids.shape), "token_states": states, "emb": emb}

    def loss_terms(self, lm, head_out: dict, enc, labels, num_items_in_batch) -> dict:
        cfg = lm.config
        terms = {"mlm": masked_mse_loss(head_out["predictions"], labels, num_items_in_batch),
                 "cell": cfg.cell_loss_weight * masked_mse_loss(head_out["cell_predictions"], labels,
                                                                num_items_in_batch)}
        # the regularisers are means over this micro-batch; with a step-global normaliser they are weighted by the
        # micro-batch's share of the masked positions, so that accumulated micro-batches (and ranks) add up to one
        # mean over the step, as the MSE terms do
        share = 1.0
        if num_items_in_batch is not None:
            share = (labels != IGNORE_INDEX).sum().float() / num_items_in_batch
        terms["codebook"] = cfg.codebook_weight * enc.codebook_loss * share
        if cfg.contrastive_weight > 0:
            terms["contrastive"] = cfg.contrastive_weight * self._contrastive(lm, head_out, labels) * share
        return terms

    def _contrastive(self, lm, head_out: dict, labels) -> torch.Tensor:
        """InfoNCE between each masked patch's output state and its own unmasked patch embedding (module docstring,
        point 4); 0 when the micro-batch has fewer than two masked patches."""
        emb, model = head_out["emb"], lm.grnformer
        x = emb.extras
        n_tokens, dest = x["n_tokens"], x["dest"]
        flat_labels = labels.reshape(-1)
        masked_slot = (flat_labels != IGNORE_INDEX) & x["is_gene"]
        is_masked = torch.zeros(n_tokens + 1, dtype=torch.bool, device=dest.device)
        is_masked[torch.where(masked_slot, dest, n_tokens)] = True
        rows = torch.nonzero(is_masked[:n_tokens]).flatten()
        if rows.numel() < 2:
            return head_out["token_states"].sum() * 0.0
        with torch.no_grad():  # the targets: the same patches with their true values
            true_values = torch.where(labels != IGNORE_INDEX, labels.to(torch.float32), x["values"])
            clean = x["gene_emb"] + model.value_encoder(true_values)
            target = model.patch_embedding(clean.reshape(-1, clean.shape[-1]),
                                           torch.where(x["is_gene"], dest, n_tokens), n_tokens)[rows]
        anchor = F.normalize(lm.contrast_proj(head_out["token_states"][rows]).float(), dim=-1)
        logits = anchor @ F.normalize(target.float(), dim=-1).t() / lm.config.contrastive_temperature
        return F.cross_entropy(logits, torch.arange(rows.shape[0], device=logits.device))
