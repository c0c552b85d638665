"""End to end on the real demo store (store builder + demo GRN builder): every batch of an epoch, both backbones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_graphs import assert_graphs_match


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from grnformer_ds.store import ensure_demo_store

    path = ensure_demo_store(tmp_path_factory.mktemp("demo") / "store")
    try:
        from grnformer_ds.grn.demo import ensure_demo_grn

        ensure_demo_grn(path)
    except ImportError as exc:  # the demo GRN needs the GRN extra's prior package
        pytest.skip(f"demo GRN unavailable: {exc}")
    return path


def test_demo_store_epoch_with_graphs(demo_store):
    from grnformer_ds.data import StreamingCellDataset
    from grnformer_ds.grn import read_grn_assets, read_shard_active_regulons, unpack_active
    from grnformer_ds.store import open_store

    st = open_store(demo_store)
    assets = read_grn_assets(demo_store)
    active = unpack_active(np.concatenate([read_shard_active_regulons(p) for p in st.shard_paths]),
                           assets.n_regulons)
    column_of_token = {int(t): j for j, t in enumerate(st.token_ids)}
    ds = StreamingCellDataset(demo_store, batch_size=32, seed=0, edge_perturbation=0.0)
    assert ds.graphs
    seen = []
    for k, b in enumerate(ds):
        seen += b["cell_index"].tolist()
        if k < 2:
            assert_graphs_match(b, assets, active, column_of_token)
    n_train = st.n_cells - round(0.05 * st.n_cells)
    assert len(seen) == len(set(seen)) == (n_train // 32) * 32 and max(seen) < n_train
    ev = StreamingCellDataset(demo_store, batch_size=32, seed=0, split="eval")
    assert sorted({c for b in ev for c in b["cell_index"].tolist()}) == list(range(n_train, st.n_cells))

    sf = next(iter(StreamingCellDataset(demo_store, batch_size=8, seed=0, backbone="scfoundation")))
    assert sf["decoder_values"].shape == (8, st.n_genes)
    assert torch.equal(sf["decoder_input_ids"][0], torch.from_numpy(st.token_ids))
