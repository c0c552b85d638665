"""Structure encoder: a torch-geometric GNN over each cell's GRNs at both scales.

Nodes are token slots: node n = b * L + l (DESIGN.md section 3), so the output reshapes to (B, L, H) aligned with
the tokens. Each scale ("celltype" GRN, "cell"-specific GRN) is encoded by a GNN (one shared GNN or one per scale)
and the scales' node embeddings are SUMMED into h_struct (paper). The convs are PyG's `BasicGNN` models
(GraphSAGE by default, the paper's ablation winner; GCN, GIN, GAT), so layers, width, dropout and edge-weight
handling are PyG's well-kept code rather than ours.

Kept in its own module so that a ZeRO-3 trainer can build it outside `deepspeed.zero.Init` (PyG initialises its
parameters in place in its constructors) and attach it with `GRNFormerModel.build_structure_encoder()`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE
from torch_geometric.utils import to_undirected


def _build_gnn(config) -> nn.Module:
    hidden = config.gnn_hidden_size or config.hidden_size
    common = dict(
        in_channels=config.hidden_size,
        hidden_channels=hidden,
        num_layers=config.gnn_num_layers,
        out_channels=config.hidden_size,
        dropout=config.gnn_dropout,
        act="relu",
    )
    if config.gnn_type == "sage":
        return GraphSAGE(**common)
    if config.gnn_type == "gcn":
        return GCN(**common)
    if config.gnn_type == "gin":
        return GIN(**common)
    return GAT(**common, heads=config.gat_heads, edge_dim=1 if config.gnn_use_edge_weight else None)


class StructureEncoder(nn.Module):
    """Encode the per-cell GRNs into token-aligned structure states.

    forward(node_features (N, H), graphs {scale: (edge_index (2, E) int64, edge_weight (E,) float or None)})
    -> (N, H) = sum over the given scales of GNN_scale(node_features, graph).
    """

    def __init__(self, config):
        super().__init__()
        self.scales = list(config.graph_scales)
        self.shared = config.gnn_share_weights
        self.add_reverse_edges = config.gnn_add_reverse_edges
        self.use_edge_weight = config.gnn_use_edge_weight
        self.gnn_type = config.gnn_type
        names = ["shared"] if self.shared else self.scales
        self.gnns = nn.ModuleDict({name: _build_gnn(config) for name in names})

    def _encode(self, gnn: nn.Module, x: torch.Tensor, edge_index: torch.Tensor, edge_weight) -> torch.Tensor:
        if not self.use_edge_weight:
            edge_weight = None
        if self.add_reverse_edges:
            # mean merges an edge present in both directions instead of doubling its weight
            if edge_weight is None:
                edge_index = to_undirected(edge_index, num_nodes=x.shape[0])
            else:
                edge_index, edge_weight = to_undirected(edge_index, edge_weight, num_nodes=x.shape[0], reduce="mean")
        if edge_weight is not None:
            edge_weight = edge_weight.to(x.dtype)
        if self.gnn_type == "gat":
            attr = None if edge_weight is None else edge_weight.unsqueeze(-1)
            return gnn(x, edge_index, edge_attr=attr)
        if self.gnn_type == "gcn":
            return gnn(x, edge_index, edge_weight=edge_weight)
        return gnn(x, edge_index)  # SAGE / GIN take no edge weights

    def forward(self, node_features: torch.Tensor, graphs: dict) -> torch.Tensor:
        out = None
        for scale in self.scales:
            edge_index, edge_weight = graphs.get(scale, (None, None))
            if edge_index is None:
                continue
            gnn = self.gnns["shared" if self.shared else scale]
            h = self._encode(gnn, node_features, edge_index, edge_weight)
            out = h if out is None else out + h
        if out is None:
            raise ValueError(f"StructureEncoder: none of the graph scales {self.scales} was given")
        return out
