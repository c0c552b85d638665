"""GRNFormer end to end on tiny configs: every backbone x GNN x fusion position, loss semantics, no-graph equality,
attention-implementation parity, padding / per-cell graph isolation, pooling references."""
import pytest
import torch
from flash_reference import reference_varlen  # tests/ is on sys.path (pytest rootdir import)

from grnformer_ds.modeling import (
    GRNFormerConfig,
    GRNFormerForMaskedLM,
    GRNFormerModel,
    make_dummy_batch,
    masked_mse_loss,
)
from grnformer_ds.modeling import attention as attention_mod

torch.set_num_threads(1)
VOCAB = 67  # 3 specials + 64 genes


def _cfg(backbone="scgpt", **kw):
    return GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone=backbone, **kw)


def _model(cfg, seed=0, cls=GRNFormerForMaskedLM):
    torch.manual_seed(seed)
    return cls(cfg).eval()


GRAPH_KEYS = ("celltype_edge_index", "celltype_edge_weight", "cell_edge_index", "cell_edge_weight", "batch", "ptr")


def _no_graphs(batch):
    return {k: v for k, v in batch.items() if k not in GRAPH_KEYS}


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
@pytest.mark.parametrize("gnn_type", ["sage", "gcn", "gin", "gat"])
@pytest.mark.parametrize("position", ["replace", "after"])
def test_forward_backward_matrix(backbone, gnn_type, position):
    cfg = _cfg(backbone, gnn_type=gnn_type, fusion_position=position)
    model = _model(cfg).train()
    batch = make_dummy_batch(cfg, seed=1)
    out = model(**batch)
    assert len(model.grnformer.layers) == cfg.num_hidden_layers - (position == "replace")
    expected = masked_mse_loss(out.predictions, batch["labels"])
    keep = batch["labels"] != -100
    torch.testing.assert_close(out.loss, ((out.predictions - batch["labels"])[keep] ** 2).mean())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("grnformer.structure_encoder.", "grnformer.fusion.", "grnformer.layers.0."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    assert grads["grnformer.fusion.beta"].abs().item() > 0
    L = batch["input_ids"].shape[1]
    assert out.last_hidden_state.shape == (4, L, cfg.hidden_size)
    assert out.structure_states.shape == (4, L, cfg.hidden_size)
    if backbone == "scgpt":
        assert out.predictions.shape == batch["labels"].shape == (4, L)
        assert out.cell_embedding.shape == (4, cfg.hidden_size)
    else:
        assert out.predictions.shape == batch["labels"].shape == (4, 64)
        assert out.cell_embedding.shape == (4, 4 * cfg.hidden_size)
        assert out.gene_embeddings.shape == (4, 64, cfg.decoder_hidden_size)


def test_masked_loss_only_counts_masked_positions():
    preds = torch.randn(3, 5, requires_grad=True)
    labels = torch.full((3, 5), -100.0)
    labels[0, 1], labels[2, 4] = 1.5, -0.5
    loss = masked_mse_loss(preds, labels)
    torch.testing.assert_close(loss, ((preds[0, 1] - 1.5) ** 2 + (preds[2, 4] + 0.5) ** 2) / 2)
    loss.backward()
    grad_mask = torch.zeros(3, 5, dtype=torch.bool)
    grad_mask[0, 1] = grad_mask[2, 4] = True
    assert float(preds.grad[~grad_mask].abs().max()) == 0.0 and float(preds.grad[grad_mask].abs().min()) > 0
    assert masked_mse_loss(preds, torch.full((3, 5), -100.0)).item() == 0.0


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_model_loss_ignores_padding_and_unmasked_positions(backbone):
    cfg = _cfg(backbone)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=2)
    with torch.no_grad():
        base = model(**batch).loss
        # garbage in padded slots (values and ids) must not move the loss
        mod = dict(batch)
        pad = ~batch["attention_mask"]
        mod["values"] = batch["values"].masked_fill(pad, 123.0)
        mod["input_ids"] = batch["input_ids"].masked_fill(pad, 5)
        torch.testing.assert_close(model(**mod).loss, base, atol=1e-6, rtol=1e-6)
        # the label at one masked position moves the loss by exactly its squared-error change / n_masked
        out = model(**batch)
        keep = batch["labels"] != -100
        b, j = keep.nonzero()[0].tolist()
        mod = dict(batch)
        mod["labels"] = batch["labels"].clone()
        mod["labels"][b, j] += 1.0
        p, y = out.predictions[b, j], batch["labels"][b, j]
        delta = ((p - (y + 1)) ** 2 - (p - y) ** 2) / keep.sum()
        torch.testing.assert_close(model(**mod).loss - base, delta, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
@pytest.mark.parametrize("position", ["replace", "after"])
def test_no_graph_equals_plain_backbone(backbone, position):
    """Without graphs GRNFormer is exactly the plain backbone (with replace: the backbone minus its last layer)."""
    cfg = _cfg(backbone, fusion_position=position)
    model = _model(cfg)
    n_layers = cfg.num_hidden_layers - (position == "replace")
    plain = _model(_cfg(backbone, use_graph=False, num_hidden_layers=n_layers), seed=5)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(k.startswith(("grnformer.fusion.", "grnformer.structure_encoder.")) for k in unexpected)
    batch = make_dummy_batch(cfg, seed=3)
    with torch.no_grad():
        a = model(**_no_graphs(batch))
        b = plain(**batch)  # the plain backbone ignores graph keys
        c = model(**batch)
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.loss, b.loss)
    assert torch.equal(a.cell_embedding, b.cell_embedding)
    assert a.structure_states is None and c.structure_states is not None
    assert not torch.allclose(a.predictions, c.predictions)  # the graphs do change the output


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_graph_of_one_cell_only_changes_that_cell(backbone):
    cfg = _cfg(backbone)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=4)
    L = batch["input_ids"].shape[1]
    ei = batch["celltype_edge_index"]
    keep = (ei[0] // L) != 0  # drop cell 0's cell-type edges
    mod = dict(batch, celltype_edge_index=ei[:, keep], celltype_edge_weight=batch["celltype_edge_weight"][keep])
    with torch.no_grad():
        a, b = model(**batch), model(**mod)
    assert not torch.allclose(a.predictions[0], b.predictions[0])
    torch.testing.assert_close(a.predictions[1:], b.predictions[1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_padding_does_not_change_a_cell(backbone):
    """A cell's outputs are the same alone and padded inside a batch (masks on self-, cross-attention, GNN)."""
    cfg = _cfg(backbone)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=5)
    last = batch["input_ids"].shape[0] - 1  # the short cell
    n = int(batch["attention_mask"][last].sum())
    L = batch["input_ids"].shape[1]
    single = {k: batch[k][last:, :n] for k in ("input_ids", "values", "attention_mask")}
    for k in ("total_counts", "decoder_values", "decoder_input_ids", "labels"):
        if k in batch:
            single[k] = batch[k][last:]
    if backbone == "scgpt":
        single["labels"] = batch["labels"][last:, :n]
    for scale in ("celltype", "cell"):
        ei, w = batch[f"{scale}_edge_index"], batch[f"{scale}_edge_weight"]
        sel = (ei[0] // L) == last
        single[f"{scale}_edge_index"] = ei[:, sel] % L  # node l of the lone cell (b = 0, L' = n)
        single[f"{scale}_edge_weight"] = w[sel]
    with torch.no_grad():
        full, alone = model(**batch), model(**single)
    torch.testing.assert_close(alone.last_hidden_state[0], full.last_hidden_state[last, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.cell_embedding[0], full.cell_embedding[last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.loss, masked_mse_loss(full.predictions[last:], batch["labels"][last:]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_eager_sdpa_and_flash_path_parity(backbone, monkeypatch):
    cfg = _cfg(backbone)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=6)
    mask = batch["attention_mask"]
    with torch.no_grad():
        ref = model(**batch, output_fusion_attentions=True)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(**batch)

        # the flash path end to end, with flash-attn's varlen kernel replaced by a per-sequence reference
        monkeypatch.setattr(attention_mod, "_flash_varlen_func", lambda: reference_varlen)
        for module in model.modules():
            if isinstance(module, attention_mod.GRNFormerAttention):
                module.attn_implementation = "flash_attention_2"
        flash = model(**batch)
    for other in (eager, flash):
        torch.testing.assert_close(other.last_hidden_state[mask], ref.last_hidden_state[mask], atol=1e-5, rtol=1e-5)
        pred_mask = mask if backbone == "scgpt" else torch.ones_like(other.predictions, dtype=torch.bool)
        torch.testing.assert_close(other.predictions[pred_mask], ref.predictions[pred_mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.loss, ref.loss, atol=1e-5, rtol=1e-5)
    w = ref.fusion_attentions  # computed with the eager kernel even under sdpa
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    offset = 2 if backbone == "scfoundation" else 0
    key_mask = torch.nn.functional.pad(mask, (offset, 0), value=False)
    assert float(w.masked_select(~key_mask[:, None, None, :].expand_as(w)).abs().max()) == 0.0


def test_flash_attention_request_fails_clearly_without_flash_attn():
    try:
        import flash_attn  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("flash-attn and CUDA present")
    except ImportError:
        pass
    cfg = _cfg(attn_implementation="flash_attention_2")
    with pytest.raises(ImportError, match=r"grnformer_ds\[flash\]|CUDA GPU"):
        GRNFormerForMaskedLM(cfg)


def test_gradient_checkpointing_gives_same_gradients():
    cfg = _cfg()
    batch = make_dummy_batch(cfg, seed=7)
    grads = []
    for ckpt in (False, True):
        model = _model(cfg).train()
        if ckpt:
            model.activation_checkpointing_enable()
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_scgpt_cell_embedding_is_cls_and_mvc_head():
    cfg = _cfg(use_mvc=True)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=8)
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.cell_embedding, out.last_hidden_state[:, 0])
    mvc = model.mvc_decoder
    genes = model.grnformer.gene_encoder(batch["input_ids"])
    ref = (mvc.W(torch.sigmoid(mvc.gene2query(genes))) * out.cell_embedding[:, None, :]).sum(-1)
    torch.testing.assert_close(out.mvc_predictions, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.mlm_loss + masked_mse_loss(ref, batch["labels"]), atol=1e-4, rtol=1e-5)


def test_scfoundation_pooling_and_decoder_inputs():
    cfg = _cfg("scfoundation")
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=9)
    seen = {}
    model.decoder.embed.register_forward_hook(lambda m, i, o: seen.update(dec_in=i[0]))
    with torch.no_grad():
        enc = model.grnformer(**{k: v for k, v in batch.items()
                                 if k not in ("labels", "decoder_values", "decoder_input_ids")})
        model(**batch)  # fills seen["dec_in"] through the hook
    mask = batch["attention_mask"]
    h, tc = enc.last_hidden_state, enc.total_count_states
    m = mask.unsqueeze(-1)
    mean = (h * m).sum(1) / m.sum(1)
    mx = h.masked_fill(~m, float("-inf")).max(1).values
    torch.testing.assert_close(enc.cell_embedding, torch.cat([tc[:, 1], tc[:, 0], mx, mean], -1))
    # decoder input: encoder state at each encoder gene's column, value embedding elsewhere, + gene identity; then
    # T and S (encoder state + their identity embedding), as scFoundation's decoder sequence
    dec_in = seen["dec_in"]
    gm = model.grnformer
    gene_id_emb = gm.gene_encoder(batch["decoder_input_ids"])
    value_emb = gm.value_encoder(batch["decoder_values"])
    expected = value_emb.clone()
    for b in range(mask.shape[0]):
        for l in range(int(mask[b].sum())):
            expected[b, int(batch["input_ids"][b, l]) - 3] = h[b, l]
    ts = tc + gm.total_count_embeddings.weight
    torch.testing.assert_close(dec_in, torch.cat([expected + gene_id_emb, ts], 1), atol=1e-6, rtol=1e-6)


def test_structure_encoder_can_be_built_after_construction():
    cfg = _cfg()
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg, build_structure_encoder=False).eval()
    batch = make_dummy_batch(cfg, seed=10)
    assert model.grnformer.structure_encoder is None
    with pytest.raises(RuntimeError, match="build_structure_encoder"):
        model(**batch)
    with torch.no_grad():
        plain = model(**_no_graphs(batch))
    enc = model.build_structure_encoder()
    assert enc is model.build_structure_encoder()  # idempotent
    with torch.no_grad():
        out = model(**batch)
    assert out.structure_states is not None and not torch.allclose(out.predictions, plain.predictions)
    assert any(k.startswith("grnformer.structure_encoder.") for k in model.state_dict())


def test_config_presets_validation_and_serialisation(tmp_path):
    for name, (h, n, heads, ffn) in {"scgpt-base": (512, 12, 8, 512), "base": (768, 12, 12, 3072)}.items():
        c = GRNFormerConfig.from_preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (h, n, heads, ffn)
    with pytest.raises(ValueError, match="gnn_type"):
        _cfg(gnn_type="gatv3")
    with pytest.raises(ValueError, match="unknown preset"):
        GRNFormerConfig.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        _cfg(num_attention_heads=5)
    c = _cfg(attn_implementation="eager", gnn_type="gcn")
    c.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert '"gnn_type": "gcn"' in text and "attn_implementation" not in text  # HF keeps it out of config.json
    again = GRNFormerConfig.from_pretrained(tmp_path)
    assert again.gnn_type == "gcn" and again.fusion_position == "replace" and again.model_type == "grnformer"


def test_base_model_alone():
    cfg = _cfg()
    model = _model(cfg, cls=GRNFormerModel)
    batch = make_dummy_batch(cfg, seed=11)
    batch.pop("labels")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        tup = model(**batch, return_dict=False)
    assert len(out.hidden_states) == cfg.num_encoder_layers + 2  # embeddings, layers, fusion
    torch.testing.assert_close(tup[0], out.last_hidden_state)


def test_init_weights_follow_hf_conventions():
    cfg = _cfg(fusion_beta_init=0.25, initializer_range=0.05)
    model = GRNFormerForMaskedLM(cfg)
    emb = model.grnformer.gene_encoder.embedding.weight.detach()
    assert float(emb[cfg.pad_token_id].abs().max()) == 0.0  # padding row
    assert abs(float(emb[1:].std()) - 0.05) < 0.01
    assert model.grnformer.fusion.beta.item() == pytest.approx(0.25)
    assert float(model.grnformer.layers[0].self_attn.q_proj.bias.abs().max()) == 0.0
    assert model.base_model_prefix == "grnformer" and model.base_model is model.grnformer
    assert {"GRNFormerLayer", "GraphFusionAdapter", "StructureEncoder"} <= set(model._no_split_modules)


@pytest.mark.parametrize("gnn_type", ["sage", "gcn", "gin", "gat"])
def test_cells_without_edges_are_finite(gnn_type):
    """A batch whose GRNs have no edges at all (possible for the cell-specific scale) still trains."""
    cfg = _cfg(gnn_type=gnn_type)
    model = _model(cfg).train()
    batch = make_dummy_batch(cfg, seed=12)
    for scale in ("celltype", "cell"):
        batch[f"{scale}_edge_index"] = torch.zeros(2, 0, dtype=torch.long)
        batch[f"{scale}_edge_weight"] = torch.zeros(0)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.predictions).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backbone,options", [
    ("scgpt", dict(value_encoding="categorical")),
    ("scgpt", dict(cell_embedding_pooling="mean", use_graph=False)),
    ("scfoundation", dict(cell_embedding_pooling="max", gnn_share_weights=False, graph_scales=["cell"])),
])
def test_other_options_run(backbone, options):
    cfg = _cfg(backbone, **options)
    model = _model(cfg)
    batch = make_dummy_batch(cfg, seed=13)
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"]
    h = out.last_hidden_state
    if options.get("cell_embedding_pooling") == "mean":  # scGPT-style pooling skips <cls>
        m = mask[:, 1:, None]
        torch.testing.assert_close(out.cell_embedding, (h[:, 1:] * m).sum(1) / m.sum(1))
    if options.get("cell_embedding_pooling") == "max":
        torch.testing.assert_close(out.cell_embedding, h.masked_fill(~mask[..., None], float("-inf")).max(1).values)
    if options.get("graph_scales") == ["cell"]:
        assert set(model.grnformer.structure_encoder.gnns) == {"cell"}
    assert torch.isfinite(out.loss)
