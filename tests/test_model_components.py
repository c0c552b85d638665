"""GRNFormer building blocks against independent references (torch.nn modules, PyG, formulas of scGPT/scFoundation)."""
import math

import flash_reference  # tests/ is on sys.path (pytest rootdir import)
import pytest
import torch
from torch import nn

from grnformer_ds.modeling import GRNFormerConfig
from grnformer_ds.modeling.attention import (
    GRNFormerAttention,
    eager_attention,
    flash_attention,
    pad_input,
    resolve_attn_implementation,
    sdpa_attention,
    unpad_input,
)
from grnformer_ds.modeling.embeddings import (
    AutoDiscretizationEncoder,
    CategoricalValueEncoder,
    ContinuousValueEncoder,
)
from grnformer_ds.modeling.fusion import GraphFusionAdapter
from grnformer_ds.modeling.gnn import StructureEncoder
from grnformer_ds.modeling.layers import GRNFormerLayer

torch.set_num_threads(1)


def _mask(bsz, seqlen, lengths):
    m = torch.zeros(bsz, seqlen, dtype=torch.bool)
    for b, n in enumerate(lengths):
        m[b, :n] = True
    return m


def _copy_mha(ours: GRNFormerAttention, ref: nn.MultiheadAttention):
    h = ours.q_proj.weight.shape[0]
    with torch.no_grad():
        ours.q_proj.weight.copy_(ref.in_proj_weight[:h])
        ours.q_proj.bias.copy_(ref.in_proj_bias[:h])
        ours.k_proj.weight.copy_(ref.in_proj_weight[h:2 * h])
        ours.k_proj.bias.copy_(ref.in_proj_bias[h:2 * h])
        ours.v_proj.weight.copy_(ref.in_proj_weight[2 * h:])
        ours.v_proj.bias.copy_(ref.in_proj_bias[2 * h:])
        ours.o_proj.weight.copy_(ref.out_proj.weight)
        ours.o_proj.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_layer_equals_torch_transformer_encoder_layer(norm_first, impl):
    """Our layer == torch.nn.TransformerEncoderLayer (what scGPT / scFoundation use) with the same weights."""
    torch.manual_seed(0)
    H, heads, ffn = 16, 4, 24
    ref = nn.TransformerEncoderLayer(H, heads, ffn, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    ours = GRNFormerLayer(H, heads, ffn, "relu", 0.0, 0.0, 1e-5, norm_first, impl).eval()
    _copy_mha(ours.self_attn, ref.self_attn)
    with torch.no_grad():
        ours.ffn.linear1.load_state_dict(ref.linear1.state_dict())
        ours.ffn.linear2.load_state_dict(ref.linear2.state_dict())
        ours.norm1.load_state_dict(ref.norm1.state_dict())
        ours.norm2.load_state_dict(ref.norm2.state_dict())
    x = torch.randn(3, 7, H)
    mask = _mask(3, 7, [7, 5, 2])
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=~mask)
        got = ours(x, attention_mask=mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_attention_kernels_agree_and_flash_varlen_matches():
    """eager == sdpa == flash path (varlen plumbing with a per-sequence reference kernel) on real positions."""
    torch.manual_seed(1)
    bsz, lq, lk, heads, d = 3, 6, 5, 2, 4
    q, k, v = torch.randn(bsz, lq, heads, d), torch.randn(bsz, lk, heads, d), torch.randn(bsz, lk, heads, d)
    q_mask, kv_mask = _mask(bsz, lq, [6, 4, 1]), _mask(bsz, lk, [5, 2, 3])
    scale = 1 / math.sqrt(d)
    out_eager, weights = eager_attention(q, k, v, kv_mask, 0.0, scale)
    out_sdpa = sdpa_attention(q, k, v, kv_mask, 0.0, scale)
    torch.testing.assert_close(out_sdpa, out_eager, atol=1e-5, rtol=1e-5)
    # weights: rows sum to one, zero on masked keys
    torch.testing.assert_close(weights.sum(-1), torch.ones(bsz, heads, lq))
    assert float(weights.masked_select(~kv_mask[:, None, None, :].expand_as(weights)).abs().max()) == 0.0

    calls = {}

    def reference_varlen(qp, kp, vp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                         softmax_scale, causal):
        calls.update(cu_q=cu_seqlens_q.tolist(), cu_k=cu_seqlens_k.tolist(), max_q=max_seqlen_q,
                     max_k=max_seqlen_k, causal=causal, dtype=cu_seqlens_q.dtype)
        return flash_reference.reference_varlen(qp, kp, vp, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                dropout_p, softmax_scale, causal)

    out_flash = flash_attention(q, k, v, q_mask, kv_mask, 0.0, scale, varlen_func=reference_varlen)
    assert calls == dict(cu_q=[0, 6, 10, 11], cu_k=[0, 5, 7, 10], max_q=6, max_k=5, causal=False,
                         dtype=torch.int32)
    torch.testing.assert_close(out_flash[q_mask], out_eager[q_mask], atol=1e-5, rtol=1e-5)
    assert float(out_flash[~q_mask].abs().max()) == 0.0


def test_unpad_pad_roundtrip():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    packed, idx, cu, max_len = unpad_input(x, mask)
    assert packed.shape == (5, 3) and max_len == 3 and cu.tolist() == [0, 2, 5]
    torch.testing.assert_close(packed, x[mask])
    back = pad_input(packed, idx, 2, 4)
    torch.testing.assert_close(back[mask], x[mask])
    assert float(back[~mask].abs().sum()) == 0.0


def test_resolve_attn_implementation_errors():
    assert resolve_attn_implementation(None) == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    with pytest.raises(ValueError, match="not supported"):
        resolve_attn_implementation("flex_attention")
    try:
        import flash_attn  # noqa: F401
        has_flash = torch.cuda.is_available()
    except ImportError:
        has_flash = False
    if not has_flash:
        with pytest.raises(ImportError, match=r"grnformer_ds\[flash\]|CUDA GPU"):
            resolve_attn_implementation("flash_attention_2")


def test_continuous_value_encoder_formula():
    """scGPT ContinuousValueEncoder: LN(Linear(ReLU(Linear(clamp(x, max)))))."""
    torch.manual_seed(0)
    enc = ContinuousValueEncoder(8, 0.0, max_value=10.0, eps=1e-5).eval()
    x = torch.tensor([[0.0, 3.0, 50.0, -1.0]])
    h = enc.linear2(torch.relu(enc.linear1(x.clamp(max=10.0).unsqueeze(-1))))
    expected = nn.functional.layer_norm(h, (8,), enc.norm.weight, enc.norm.bias, 1e-5)
    torch.testing.assert_close(enc(x), expected)
    torch.testing.assert_close(enc(x)[0, 2], enc(torch.tensor([[10.0]]))[0, 0])  # clamped


def test_categorical_value_encoder_maps_mask_and_pad_like_scgpt():
    enc = CategoricalValueEncoder(n_bins=5, hidden_size=4, mask_value=-1, pad_value=-2, eps=1e-5)
    ids_seen = []
    enc.embedding.register_forward_hook(lambda m, i, o: ids_seen.append(i[0].clone()))
    enc(torch.tensor([[0.0, 4.0, -1.0, -2.0]]))
    assert ids_seen[0].tolist() == [[0, 4, 6, 5]]  # mask -> n_bins + 1, pad -> n_bins


def test_autodiscretization_formula():
    """scFoundation: softmax(alpha*h + W2 h), h = LeakyReLU_0.1(W1 x); weighted bin sum; mask/pad embeddings."""
    torch.manual_seed(0)
    enc = AutoDiscretizationEncoder(6, num_bins=5, alpha=0.7, mask_value=-1.0, pad_value=-2.0)
    nn.init.normal_(enc.mask_embedding)
    nn.init.normal_(enc.pad_embedding)
    x = torch.tensor([[0.0, 1.5, -1.0, -2.0]])
    h = nn.functional.leaky_relu(x.unsqueeze(-1) * enc.mlp1.weight.T + enc.mlp1.bias, 0.1)
    w = torch.softmax(0.7 * h + h @ enc.mlp2.weight.T + enc.mlp2.bias, dim=-1)
    expected = w @ enc.bin_embeddings.weight
    got = enc(x)
    torch.testing.assert_close(got[0, :2], expected[0, :2])
    torch.testing.assert_close(got[0, 2], enc.mask_embedding.detach())
    torch.testing.assert_close(got[0, 3], enc.pad_embedding.detach())


def _struct_config(**kw):
    return GRNFormerConfig.from_preset("debug", vocab_size=20, **kw)


@pytest.mark.parametrize("gnn_type", ["sage", "gcn", "gin", "gat"])
def test_structure_encoder_sums_scales_with_pyg(gnn_type):
    """h_struct == GNN(x, celltype graph) + GNN(x, cell graph), each graph made undirected by PyG."""
    from torch_geometric.utils import to_undirected

    torch.manual_seed(0)
    cfg = _struct_config(gnn_type=gnn_type)
    enc = StructureEncoder(cfg).eval()
    x = torch.randn(10, cfg.hidden_size)
    g1 = torch.tensor([[0, 1, 2, 5], [1, 2, 3, 6]]), torch.rand(4)
    g2 = torch.tensor([[7, 8], [8, 9]]), torch.rand(2)
    gnn = enc.gnns["shared"]

    def ref(ei, w):
        ei_u, w_u = to_undirected(ei, w, num_nodes=10, reduce="mean")
        if gnn_type == "gcn":
            return gnn(x, ei_u, edge_weight=w_u)
        if gnn_type == "gat":
            return gnn(x, ei_u, edge_attr=w_u.unsqueeze(-1))
        return gnn(x, ei_u)

    with torch.no_grad():
        got = enc(x, {"celltype": g1, "cell": g2})
        torch.testing.assert_close(got, ref(*g1) + ref(*g2))
        # reverse edges matter: node 0 has only an outgoing edge 0->1
        directed = StructureEncoder(_struct_config(gnn_type=gnn_type, gnn_add_reverse_edges=False)).eval()
        directed.load_state_dict(enc.state_dict())
        assert not torch.allclose(directed(x, {"celltype": g1})[0], enc(x, {"celltype": g1})[0])
        # edge weights reach GCN and GAT, are ignored by SAGE and GIN
        other_w = (g1[0], g1[1] * 5 + 1)
        changed = not torch.allclose(enc(x, {"celltype": g1}), enc(x, {"celltype": other_w}))
        assert changed == (gnn_type in ("gcn", "gat"))


def test_structure_encoder_separate_weights_per_scale():
    torch.manual_seed(0)
    enc = StructureEncoder(_struct_config(gnn_share_weights=False)).eval()
    assert set(enc.gnns) == {"celltype", "cell"}
    x = torch.randn(6, 32)
    g = torch.tensor([[0, 1], [1, 2]]), None
    with torch.no_grad():
        a, b = enc(x, {"celltype": g}), enc(x, {"cell": g})
    assert not torch.allclose(a, b)  # different GNNs on the same graph
    torch.testing.assert_close(enc(x, {"celltype": g, "cell": g}), a + b)


def test_fusion_is_residual_cross_attention_with_beta():
    """h = h_expr + beta * MHA(q=h_expr, k=v=LN(h_struct)) with padded keys masked (torch MHA as reference)."""
    torch.manual_seed(0)
    cfg = _struct_config(fusion_beta_init=0.3)
    fusion = GraphFusionAdapter(cfg).eval()
    ref = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True).eval()
    _copy_mha(fusion.cross_attn, ref)
    h_expr, h_struct = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    mask = _mask(2, 5, [5, 3])
    with torch.no_grad():
        got, weights = fusion(h_expr, h_struct, mask, mask, output_attentions=True)
        kv = fusion.struct_norm(h_struct)
        att, ref_w = ref(h_expr, kv, kv, key_padding_mask=~mask, average_attn_weights=False)
    torch.testing.assert_close(got[mask], (h_expr + 0.3 * att)[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.transpose(1, 2)[mask], ref_w.transpose(1, 2)[mask], atol=1e-5, rtol=1e-5)
    assert fusion.beta.requires_grad and fusion.beta.item() == pytest.approx(0.3)


@pytest.mark.parametrize("gnn_type", ["sage", "gcn", "gin", "gat"])
@pytest.mark.parametrize("undirected", [True, False])
def test_csr_aggregation_equals_scatter_reference(gnn_type, undirected):
    """`gnn_aggregation="csr"` (a sparse adjacency product over the loader's destination-sorted graph) gives PyG's
    scatter path's output and gradients, self-loops (autoregulating TFs) included; and the loader's "csr" graph
    equals the "coo" graph made undirected by the encoder itself (GAT and GCN keep the scatter path)."""
    import numpy as np

    from grnformer_ds.data.graph_kernels import sorted_by_destination

    torch.manual_seed(0)
    n = 40
    pairs = sorted({(int(u), int(v)) for u, v in torch.randint(0, n, (90, 2)).tolist()} | {(3, 3), (7, 7)})
    ei = torch.tensor(pairs).T.contiguous()
    w = torch.rand(ei.shape[1])
    se, sw = sorted_by_destination(ei.numpy(), w.numpy(), np.array([0, n]), undirected)
    csr_graph = {"cell": (torch.from_numpy(se), torch.from_numpy(sw))}
    scatter = StructureEncoder(_struct_config(gnn_type=gnn_type, gnn_add_reverse_edges=undirected)).eval()
    csr = StructureEncoder(_struct_config(gnn_type=gnn_type, gnn_add_reverse_edges=undirected,
                                          gnn_aggregation="csr")).eval()
    csr.load_state_dict(scatter.state_dict())
    x = torch.randn(n, scatter.gnns["shared"].in_channels, requires_grad=True)
    want = scatter(x, {"cell": (ei, w)}, "coo")
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    got = csr(x, csr_graph, "csr")
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-4, atol=1e-4)
    assert csr._sparse_ok(x) == (gnn_type in ("sage", "gin"))
    assert not csr._sparse_ok(x.to(torch.bfloat16))  # CPU sparse products have no bfloat16 sum: scatter runs
