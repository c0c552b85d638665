"""torch.compile on the packed layout (CPU, inductor): the whole forward is one graph (no graph break, both
backbones, graphs on), and the training path's regional compilation (`training.compile.compile_blocks`) does not
recompile after the first micro-batch at a fixed token budget, with the eager losses."""
from __future__ import annotations

import pytest
import torch
from test_data_stream import make_store  # tests/ is on sys.path (pytest rootdir import)

from grnformer_ds.data import StreamingCellDataset
from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s")


def _dataset(store, backbone):
    return StreamingCellDataset(store, max_tokens=240, pad_to_max_tokens=True, seed=0, block_size=16,
                                buffer_blocks=3, backbone=backbone, max_seq_len=30, graph_layout="csr")


def _model(backbone):
    torch.manual_seed(0)
    return GRNFormerForMaskedLM(GRNFormerConfig.from_preset("debug", vocab_size=43, backbone=backbone)).train()


@pytest.mark.parametrize("backbone", ["scgpt", "scfoundation"])
def test_packed_forward_has_no_graph_break(store, backbone):
    batch = _dataset(store, backbone).batch(0)
    explained = torch._dynamo.explain(_model(backbone))(**batch)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.e2e  # inductor builds and runs C++ kernels (the compiler in subprocesses)
def test_compiled_blocks_do_not_recompile_after_warm_up(store):
    from grnformer_ds.training.compile import compile_blocks

    torch._dynamo.reset()
    ds = _dataset(store, "scgpt")
    eager, compiled = _model("scgpt"), _model("scgpt")
    assert compile_blocks(compiled) == 3  # one encoder layer (the fusion replaces the second), fusion, GNN
    batches = [ds.batch(s) for s in range(5)]
    assert len({b["cell_index"].shape[0] for b in batches}) > 1  # cells vary, tokens stay 240
    assert len({b["cell_edge_index"].shape[1] for b in batches}) > 1
    for i, batch in enumerate(batches):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(**batch)
            got.loss.backward()
        want = eager(**batch)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)
