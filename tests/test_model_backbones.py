"""Backbones as registered plug-ins, and the scPaLM-style backbone.

Registry: the config, model, head and dummy inputs come from the registered spec (a toy fourth backbone defined
here, outside the package, runs and saves / reloads); unknown backbones and undeclared inputs fail in one line.
scPaLM: the patch layout (1 + ceil(genes / patch_size) tokens), invariance to the order of a cell's genes (with and
without graphs), packed = padded, forward / backward with and without graphs, every loss term reaching the
gradients, fusion keys = the mean structure state of each patch's genes, and fusion attention mapped back to genes.
"""
from __future__ import annotations

import copy

import pytest
import torch

from grnformer_ds.data.packing import pack_padded_batch
from grnformer_ds.modeling import (
    GRNFormerConfig,
    GRNFormerForMaskedLM,
    GRNFormerModel,
    backbone_names,
    make_dummy_batch,
    register_backbone,
)
from grnformer_ds.modeling.backbone_scgpt import ScGPTBackbone
from grnformer_ds.modeling.layout import gene_attention

torch.set_num_threads(1)
VOCAB = 67
GRAPH_KEYS = ("celltype_edge_index", "celltype_edge_weight", "cell_edge_index", "cell_edge_weight", "batch", "ptr")


@register_backbone
class ToyBackbone(ScGPTBackbone):
    """A fourth backbone from outside the package: scGPT's layout with mean pooling and a plain head."""

    name = "toy-test"
    defaults = {"cell_embedding_pooling": "mean", "toy_scale": 2.0}
    uses_mvc = False

    def build_head(self, lm, config):
        lm.toy_head = torch.nn.Linear(config.hidden_size, 1)

    def head(self, lm, enc, emb, input_ids, inputs):
        return {"predictions": config_scale(lm) * lm.toy_head(enc.last_hidden_state).squeeze(-1)}


def config_scale(lm):
    return lm.config.toy_scale


def _palm(**kw):
    kw.setdefault("patch_size", 4)
    return GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone="scpalm", **kw)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return GRNFormerForMaskedLM(cfg).eval()


def test_registry_lists_the_builtins_and_refuses_unknown_names():
    assert {"scgpt", "scfoundation", "scpalm"} <= set(backbone_names())
    with pytest.raises(ValueError, match=r"backbone='nope' is not one of \[.*'scpalm'.*--plugin"):
        GRNFormerConfig(backbone="nope")
    with pytest.raises(ValueError, match="module 'no_such_module_x'"):
        GRNFormerConfig(backbone="nope", backbone_module="no_such_module_x")


def test_each_backbone_fills_its_own_config_defaults():
    expect = {"scgpt": ("continuous", False, "cls"), "scfoundation": ("autobin", True, "all"),
              "scpalm": ("continuous", True, "cls")}
    for name, (enc, norm, pool) in expect.items():
        cfg = GRNFormerConfig(backbone=name, vocab_size=VOCAB)
        assert (cfg.value_encoding, cfg.final_layer_norm, cfg.cell_embedding_pooling) == (enc, norm, pool), name
    assert GRNFormerConfig(backbone="scpalm").patch_size == 16  # the backbone adds its own fields
    with pytest.raises(ValueError, match="cell_embedding_pooling='all' is not one of"):
        GRNFormerConfig(backbone="scgpt", cell_embedding_pooling="all")
    with pytest.raises(ValueError, match="use_mvc=True"):
        GRNFormerConfig(backbone="scpalm", use_mvc=True)
    small = GRNFormerConfig.from_preset("scpalm-small", vocab_size=VOCAB)
    assert (small.backbone, small.hidden_size, small.codebook_size) == ("scpalm", 256, 256)


def test_toy_backbone_from_outside_the_package_trains_saves_and_reloads(tmp_path):
    cfg = GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone="toy-test")
    assert cfg.backbone_module == __name__  # recorded so that a saved model finds its backbone again
    assert cfg.cell_embedding_pooling == "mean" and cfg.toy_scale == 2.0
    model = _model(cfg)
    assert not hasattr(model, "expr_decoder") and hasattr(model, "toy_head")
    batch = make_dummy_batch(cfg, seed=1)
    out = model(**batch)
    out.loss.backward()
    assert model.toy_head.weight.grad is not None
    mask = batch["attention_mask"].clone()
    mask[:, 0] = False  # mean pooling over the genes, not <cls>
    h = out.last_hidden_state
    ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.cell_embedding, ref)
    model.save_pretrained(tmp_path / "toy")
    again = GRNFormerForMaskedLM.from_pretrained(tmp_path / "toy").eval()
    assert again.config.backbone == "toy-test"
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).predictions, model(**batch).predictions)


def test_a_batch_key_no_backbone_declares_is_refused():
    cfg = GRNFormerConfig.from_preset("debug", vocab_size=VOCAB)
    batch = make_dummy_batch(cfg)
    with pytest.raises(ValueError, match="unexpected input patch_masks for backbone 'scgpt'"):
        _model(cfg)(**batch, patch_masks=torch.ones(1))
    # a training batch (with head-only keys) still runs through the base model
    GRNFormerModel(GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone="scfoundation"))(
        **make_dummy_batch(GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone="scfoundation")))


# ---------------------------------------------------------------------------------------------------- scPaLM
def test_scpalm_patches_pack_genes_into_fewer_tokens():
    cfg = _palm(patch_size=4)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seq_len=16, lengths=[16, 9, 5, 16], graphs=False)
    with torch.no_grad():
        out = model(**batch)
    # <cls> + ceil((slots - 1) / 4) patches: 16 slots -> 5 tokens, 9 -> 3, 5 -> 2
    assert out.last_hidden_state.shape[1] == 5
    ti = out.token_index
    for b, n in enumerate([16, 9, 5, 16]):
        assert ti[b, 0] == 0 and (ti[b, n:] == -1).all()
        genes = ti[b, 1:n]
        assert sorted(torch.bincount(genes).tolist()[1:]) == sorted([min(4, n - 1 - 4 * p)
                                                                    for p in range(-(-(n - 1) // 4))])
        # patches follow token-id order: ids of patch p are all below those of patch p + 1
        ids = batch["input_ids"][b, 1:n]
        for p in range(1, int(genes.max())):
            assert ids[genes == p].max() < ids[genes == p + 1].min()


def _permute_genes(batch, perm_of_cell):
    """The same cells with their gene slots in another order (graphs re-indexed to follow their genes)."""
    out = copy.deepcopy(batch)
    bsz, seqlen = batch["input_ids"].shape
    new_slot = torch.arange(bsz * seqlen)
    for b, perm in enumerate(perm_of_cell):
        for key in ("input_ids", "values", "labels"):
            out[key][b, 1:1 + len(perm)] = batch[key][b, 1 + perm]
        new_slot[b * seqlen + 1 + perm] = b * seqlen + 1 + torch.arange(len(perm))
    for scale in ("celltype", "cell"):
        if f"{scale}_edge_index" in out:
            out[f"{scale}_edge_index"] = new_slot[batch[f"{scale}_edge_index"]]
    return out, new_slot


@pytest.mark.parametrize("graphs", [False, True])
def test_scpalm_is_invariant_to_the_order_of_a_cells_genes(graphs):
    cfg = _palm(patch_size=3)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seq_len=14, lengths=[14, 10, 7, 14], graphs=graphs, seed=4)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(n - 1, generator=g) for n in (14, 10, 7, 14)]
    shuffled, new_slot = _permute_genes(batch, perms)
    with torch.no_grad():
        a, b = model(**batch), model(**shuffled)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a.cell_embedding, b.cell_embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.codebook_perplexity, b.codebook_perplexity)
    # each gene's prediction follows the gene
    moved = torch.empty_like(a.predictions.reshape(-1))
    moved[new_slot] = a.predictions.reshape(-1)
    mask = batch["attention_mask"].reshape(-1)
    torch.testing.assert_close(moved[mask], b.predictions.reshape(-1)[mask], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("graphs", [False, True])
def test_scpalm_packed_equals_padded_and_every_term_trains(graphs):
    cfg = _palm(patch_size=4)
    batch = make_dummy_batch(cfg, seq_len=13, lengths=[13, 6, 9, 4], graphs=graphs, seed=5, edges_per_cell=16)
    packed = pack_padded_batch(batch, lead=0, pad_id=cfg.pad_token_id, pad_value=cfg.pad_value)
    model = _model(cfg)
    model.train()  # dropout is 0 in the debug preset: train mode is deterministic here
    outs, grads = [], []
    for b in (batch, packed):
        model.zero_grad(set_to_none=True)
        out = model(**b)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    pad, pk = outs
    assert set(pad.loss_terms) == {"mlm", "cell", "codebook", "contrastive"}
    torch.testing.assert_close(pad.loss, pk.loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pad.cell_embedding, pk.cell_embedding, rtol=1e-5, atol=1e-5)
    mask = batch["attention_mask"]
    torch.testing.assert_close(pad.predictions[mask], pk.predictions[0][packed["input_ids"][0] != 0],
                               rtol=1e-5, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4, msg=name)
    for part in ("patch_embedding", "pathway_codebook.codes", "contrast_proj", "cell_decoder", "gene_decoder"):
        assert any(n.startswith(part) or f".{part}" in n for n in grads[0]), part
    if graphs:
        assert any("structure_encoder" in n for n in grads[0]) and "grnformer.fusion.beta" in grads[0]


def test_scpalm_fusion_keys_are_patch_means_and_attention_maps_back_to_genes():
    cfg = _palm(patch_size=3)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, batch_size=3, seq_len=10, lengths=[10, 7, 10], seed=6)
    seen = {}
    model.grnformer.fusion.struct_norm.register_forward_hook(lambda m, i, o: seen.update(keys=i[0]))
    with torch.no_grad():
        out = model(**batch, output_fusion_attentions=True)
    h, ti = out.structure_states, out.token_index  # (B, L, H) per gene, (B, L) gene -> token
    for b in range(3):
        for t in range(1, int(ti[b].max()) + 1):
            torch.testing.assert_close(seen["keys"][b, t], h[b][ti[b] == t].mean(0))
    w = out.fusion_attentions  # (B, heads, Lt, Lt): over patch tokens, <cls> key masked
    assert torch.all(w[..., 0] == 0)
    genes = gene_attention(w, ti)
    assert genes.shape == (*w.shape[:3], batch["input_ids"].shape[1])
    torch.testing.assert_close(genes.sum(-1), w.sum(-1))  # a patch's weight is shared by its genes
    b, t = 0, 2
    torch.testing.assert_close(genes[b, :, :, ti[b] == t], (w[b, :, :, t] / (ti[b] == t).sum())[..., None].expand(
        -1, -1, int((ti[b] == t).sum())))
