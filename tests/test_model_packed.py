"""The packed (THD) layout of the model against the padded one, its reference: for the same cells, equal loss,
predictions at real tokens, cell embeddings, fusion attention and gradients (fp32, CPU), both backbones, graphs off /
COO / CSR (destination-sorted, undirected in the loader); dummy padding segments change nothing; the varlen kernels
(flash-attn's and torch's signatures, with per-sequence reference kernels on CPU) equal SDPA; the loss normalised by a
step-global count makes two micro-batches equal one batch of both."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flash_reference import reference_varlen  # tests/ is on sys.path (pytest rootdir import)

from grnformer_ds.data.graph_kernels import sorted_by_destination
from grnformer_ds.data.packing import pack_padded_batch, segment_offsets
from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, make_dummy_batch
from grnformer_ds.modeling import attention as attention_mod

torch.set_num_threads(1)
VOCAB = 67
GRAPH_KEYS = ("celltype_edge_index", "celltype_edge_weight", "cell_edge_index", "cell_edge_weight", "batch", "ptr")
LEAD = {"scgpt": 0, "scfoundation": 2}  # slots pack_padded_batch reserves before a cell's tokens


def _cfg(backbone, **kw):
    kw.setdefault("use_mvc", backbone == "scgpt")
    return GRNFormerConfig.from_preset("debug", vocab_size=VOCAB, backbone=backbone, **kw)


def _batches(cfg, graphs: str, lengths=(12, 5, 9, 3, 12), seed=2):
    padded = make_dummy_batch(cfg, batch_size=len(lengths), seq_len=12, lengths=list(lengths), seed=seed,
                              edges_per_cell=16)
    if graphs == "none":
        padded = {k: v for k, v in padded.items() if k not in GRAPH_KEYS}
    packed = pack_padded_batch(padded, lead=LEAD[cfg.backbone], pad_id=cfg.pad_token_id, pad_value=cfg.pad_value)
    if graphs == "csr":
        cu = packed["cu_seq_lens_q"].numpy().astype(np.int64)
        for scale in ("celltype", "cell"):
            ei, w = sorted_by_destination(packed[f"{scale}_edge_index"].numpy(),
                                          packed[f"{scale}_edge_weight"].numpy(), cu, cfg.gnn_add_reverse_edges)
            packed[f"{scale}_edge_index"], packed[f"{scale}_edge_weight"] = torch.from_numpy(ei), torch.from_numpy(w)
        packed["graph_layout"] = "csr"
    return padded, packed


def _token_positions(padded, packed, lead):
    """Packed position of every real padded token, in padded row-major order."""
    mask = padded["attention_mask"]
    cu = packed["cu_seq_lens_q"].long()
    pos = (cu[:-1, None] + lead + torch.arange(mask.shape[1])[None, :]).reshape(-1)
    return pos[mask.reshape(-1)]


def _run(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _check_same(cfg, padded, packed, model, **kw):
    ref, ref_grads = _run(model, padded, **kw)
    got, got_grads = _run(model, packed, **kw)
    _close(got.loss, ref.loss)
    pos = _token_positions(padded, packed, LEAD[cfg.backbone])
    mask = padded["attention_mask"]
    _close(got.last_hidden_state[0, pos], ref.last_hidden_state[mask])
    _close(got.cell_embedding, ref.cell_embedding)
    if cfg.backbone == "scgpt":
        _close(got.predictions[0, pos], ref.predictions[mask])
        _close(got.mvc_predictions[0, pos], ref.mvc_predictions[mask])
    else:
        _close(got.predictions, ref.predictions)
        _close(got.gene_embeddings, ref.gene_embeddings)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        _close(got_grads[name], ref_grads[name], tol=1e-4)
    return got, ref


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
@pytest.mark.parametrize("graphs", ["none", "coo", "csr"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_padded(backbone, graphs, impl):
    cfg = _cfg(backbone, attn_implementation=impl)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, packed = _batches(cfg, graphs)
    got, _ = _check_same(cfg, padded, packed, model)
    assert (got.structure_states is None) == (graphs == "none")


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_dummy_padding_segments_change_nothing(backbone):
    """Padding the packed row to a fixed budget (dummy segments of at most the longest cell) gives the same loss,
    cell embeddings and gradients: dummy tokens are their own segments, unlabelled, without graph edges."""
    cfg = _cfg(backbone)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    _, packed = _batches(cfg, "csr")
    total = packed["input_ids"].shape[1]
    cu = segment_offsets(packed["cu_seq_lens_q"].diff().numpy(), pad_to=total + 23, max_segment=14)
    extra = total + 23 - total
    fill = {"input_ids": cfg.pad_token_id, "values": cfg.pad_value, "labels": -100.0}
    dummy = dict(packed)
    for key, value in fill.items():
        if packed[key].shape == packed["input_ids"].shape:
            dummy[key] = torch.cat([packed[key], torch.full((1, extra), value, dtype=packed[key].dtype)], dim=1)
    dummy.update(cu_seq_lens_q=torch.from_numpy(cu.astype(np.int32)),
                 cu_seq_lens_k=torch.from_numpy(cu.astype(np.int32)), max_length_q=14, max_length_k=14)
    assert len(cu) > len(packed["cu_seq_lens_q"]) + 1  # more than one dummy segment
    ref, ref_grads = _run(model, packed)
    got, got_grads = _run(model, dummy)
    _close(got.loss, ref.loss)
    _close(got.cell_embedding, ref.cell_embedding)
    _close(got.last_hidden_state[:, :total], ref.last_hidden_state)
    for name in ref_grads:
        _close(got_grads[name], ref_grads[name], tol=1e-4)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_fusion_attention_per_cell_equals_padded(backbone):
    """Packed fusion weights come per segment, (S, heads, M, M), over each cell's own tokens: the padded weights'
    real block (scFoundation: the padded keys' masked T / S columns are not keys in the packed layout)."""
    cfg = _cfg(backbone)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, packed = _batches(cfg, "coo")
    with torch.no_grad():
        ref = model(**padded, output_fusion_attentions=True).fusion_attentions
        got = model(**packed, output_fusion_attentions=True).fusion_attentions
    lengths = padded["attention_mask"].sum(1).tolist()
    assert got.shape[:2] == (len(lengths), cfg.fusion_heads)
    for b, n in enumerate(lengths):
        if backbone == "scgpt":
            _close(got[b, :, :n, :n], ref[b, :, :n, :n])
        else:
            _close(got[b, :, :n + 2, :n], ref[b, :, :n + 2, 2:n + 2])


def _torch_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """torch.nn.attention.varlen.varlen_attn's positional signature, computed per sequence on CPU."""
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, q.shape[-1] ** -0.5, False)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
@pytest.mark.parametrize("impl", ["flash_attention_2", "varlen"])
def test_varlen_kernels_on_packed_and_padded_batches_equal_sdpa(backbone, impl, monkeypatch):
    """The packed path hands the batch's cu_seq_lens / max_length straight to the kernel (no unpadding); the padded
    path unpads for it. With CPU reference kernels behind flash-attn's and torch's signatures both equal SDPA."""
    import torch.nn.attention.varlen as torch_varlen

    calls = []

    def flash_ref(*args, **kw):
        calls.append(kw["cu_seqlens_q"].dtype)
        return reference_varlen(*args, **kw)

    monkeypatch.setattr(attention_mod, "_flash_varlen_func", lambda: flash_ref)
    monkeypatch.setattr(torch_varlen, "varlen_attn", _torch_varlen_reference)
    cfg = _cfg(backbone)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, packed = _batches(cfg, "csr")
    with torch.no_grad():
        want_packed, want_padded = model(**packed), model(**padded)
    for module in model.modules():  # the configured kernel is only accepted on a CUDA machine
        if isinstance(module, attention_mod.GRNFormerAttention):
            module.attn_implementation = impl
    with torch.no_grad():
        got_packed, got_padded = model(**packed), model(**padded)
    for got, want in ((got_packed, want_packed), (got_padded, want_padded)):
        _close(got.loss, want.loss)
        _close(got.cell_embedding, want.cell_embedding)
    if impl == "flash_attention_2":
        assert calls and all(dt == torch.int32 for dt in calls)


def test_varlen_refuses_attention_dropout_in_training(monkeypatch):
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", _torch_varlen_reference)
    cfg = _cfg("scgpt", attention_probs_dropout_prob=0.1)
    model = GRNFormerForMaskedLM(cfg).train()
    for module in model.modules():
        if isinstance(module, attention_mod.GRNFormerAttention):
            module.attn_implementation = "varlen"
    _, packed = _batches(cfg, "csr")
    with pytest.raises(ValueError, match="no attention dropout"):
        model(**packed)
    model.eval()  # no dropout at evaluation: fine
    model(**packed)


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_step_global_loss_normalisation_equals_one_batch_of_both(backbone):
    """Two micro-batches, each divided by the masked positions of both (`num_items_in_batch`), sum to the loss and
    gradient of one packed batch holding both; a mean of the two micro-batch means does not."""
    cfg = _cfg(backbone)
    torch.manual_seed(0)
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, _ = _batches(cfg, "none", lengths=(12, 4, 9, 3, 12, 7))

    def part(rows):
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == 6 else v) for k, v in padded.items()}
        return pack_padded_batch(sub, lead=LEAD[backbone], pad_id=cfg.pad_token_id, pad_value=cfg.pad_value)

    a, b, both = part([0, 1]), part([2, 3, 4, 5]), part(list(range(6)))
    n_items = torch.tensor(float((both["labels"] != -100).sum()))
    assert (a["labels"] != -100).sum() != (b["labels"] != -100).sum()  # unequal micro-batches
    one, one_grads = _run(model, both)
    la, ga = _run(model, a, num_items_in_batch=n_items)
    lb, gb = _run(model, b, num_items_in_batch=n_items)
    _close(la.loss + lb.loss, one.loss)
    for name in one_grads:
        _close(ga[name] + gb[name], one_grads[name], tol=1e-4)
    ma, _ = _run(model, a)
    mb, _ = _run(model, b)
    assert not torch.allclose((ma.loss + mb.loss) / 2, one.loss, rtol=1e-3)


def test_packed_batch_with_an_attention_mask_is_refused():
    cfg = _cfg("scgpt")
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, packed = _batches(cfg, "none")
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"], dtype=torch.bool))
    bad = copy.copy(packed)
    del bad["max_length_q"]
    with pytest.raises(ValueError, match="max_length_q"):
        model(**bad)


def test_decoder_refuses_an_encoder_gene_missing_from_decoder_ids():
    """scFoundation: an encoder token whose id is not among decoder_input_ids is an error in both layouts."""
    cfg = _cfg("scfoundation")
    model = GRNFormerForMaskedLM(cfg).eval()
    padded, packed = _batches(cfg, "none")
    for batch in (padded, packed):
        bad = dict(batch)
        ids = batch["input_ids"].reshape(-1)
        gene = int(ids[(ids > 2) & (ids != VOCAB - 1)][0])  # an encoder gene token
        bad["decoder_input_ids"] = batch["decoder_input_ids"].clone()
        bad["decoder_input_ids"][bad["decoder_input_ids"] == gene] = VOCAB - 1  # its column now names another token
        with pytest.raises(ValueError, match="missing from decoder_input_ids"):
            model(**bad)
