"""Spatial neighbours and small-graph convolutions in plain torch (NH2ST's neighbour branch).

- :func:`spatial_knn`: the ``k`` nearest spots of every spot on its own slide.
- :func:`similarity_hypergraph`: the incidence matrix of hyperedges joining each node with its
  most cosine-similar nodes, and :func:`hypergraph_propagation`, HGNN's normalised operator.
- :func:`similarity_graph_propagation`: the plain-graph counterpart (GCN's normalised adjacency).
- :class:`GraphConvolutions`: ``L`` layers ``X' = P (X Θ + b)`` on a batch of small graphs.

Every function works on a batch of graphs with the same number of nodes, ``(B, M, d)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def spatial_knn(coords: np.ndarray, groups: np.ndarray, *, k: int) -> np.ndarray:
    """The ``k`` nearest spots of every spot among the spots of its own group (slide), nearest first.

    A spot is never its own neighbour (also when another spot has the same coordinates);
    spots of different groups are never neighbours.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres.
    groups
        ``(n,)`` slide of every spot.
    k
        Neighbours per spot; every group needs more than ``k`` spots.

    Returns
    -------
    ``(n, k)`` int64 rows of ``coords``.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    groups = np.asarray(groups)
    if coords.ndim != 2 or len(coords) != len(groups):
        msg = (
            f"`coords` must be (spots, dims) with one group per spot, got {coords.shape} and {groups.shape}."
        )
        raise ValueError(msg)
    if not np.isfinite(coords).all():
        msg = "Spot coordinates contain NaN or infinite values; spatial neighbours need the spot centres (obsm['spatial'])."
        raise ValueError(msg)
    neighbours = np.empty((len(coords), k), dtype=np.int64)
    for group in dict.fromkeys(groups.tolist()):
        members = np.flatnonzero(groups == group)
        if len(members) <= k:
            msg = (
                f"Slide {group!r} has {len(members)} spots, too few for {k} spatial neighbours per spot; "
                f"lower the number of neighbours below {len(members)} or leave out that slide."
            )
            raise ValueError(msg)
        if np.ptp(coords[members], axis=0).max() == 0:
            msg = (
                f"All {len(members)} spots of slide {group!r} have the same coordinates, so their spatial "
                "neighbours would be arbitrary; pass the spot centres (obsm['spatial'], full-resolution pixels)."
            )
            raise ValueError(msg)
        _, found = cKDTree(coords[members]).query(coords[members], k=k + 1)
        found = np.asarray(found).reshape(len(members), k + 1)
        own = found == np.arange(len(members))[:, None]
        # the spot itself goes last (it is normally first; with duplicate coordinates it may be elsewhere)
        found = np.take_along_axis(found, np.argsort(own, axis=1, kind="stable"), axis=1)[:, :k]
        neighbours[members] = members[found]
    return neighbours


def _most_similar(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, M, size)``: each node followed by its ``size - 1`` most cosine-similar other nodes."""
    batch, m, _ = x.shape
    if not 1 <= size <= m:
        msg = f"A hyperedge / neighbourhood of {size} nodes needs 1 to {m} nodes per graph."
        raise ValueError(msg)
    unit = F.normalize(x.detach().float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    similarity = similarity.masked_fill(eye, -torch.inf)
    nearest = torch.topk(similarity, size - 1, dim=-1).indices
    own = torch.arange(m, device=x.device).expand(batch, m)[..., None]
    return torch.cat([own, nearest], dim=-1)


def similarity_hypergraph(x: torch.Tensor, size: int) -> torch.Tensor:
    """Incidence matrices of hypergraphs whose hyperedge ``j`` joins node ``j`` and its most similar nodes.

    Hyperedge ``e_j = {v_j} ∪ {the size - 1 nodes most cosine-similar to v_j}`` (NH2ST, eq. 3);
    there are as many hyperedges as nodes. The features only choose the members (no gradient).

    Parameters
    ----------
    x
        ``(B, M, d)`` node features of ``B`` graphs.
    size
        Nodes per hyperedge, 1 to ``M``.

    Returns
    -------
    ``(B, M, M)`` float32 incidence ``H[b, v, e] = 1`` when node ``v`` is in hyperedge ``e``.
    """
    members = _most_similar(x, size)  # (B, edges, size)
    incidence = torch.zeros(x.shape[0], x.shape[1], x.shape[1], device=x.device)
    return incidence.scatter_(1, members.transpose(1, 2), 1.0)


def hypergraph_propagation(incidence: torch.Tensor, edge_weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""HGNN's normalised operator :math:`P = D_v^{-1/2} H W D_e^{-1} H^\top D_v^{-1/2}`.

    With ``W`` the diagonal hyperedge weights (all 1 by default), node degrees
    :math:`D_v = \mathrm{diag}(H W \mathbf 1)` and hyperedge degrees :math:`D_e = \mathrm{diag}(H^\top \mathbf 1)`.
    A hypergraph convolution is then ``X' = P X Θ``. Isolated nodes and empty hyperedges
    contribute nothing (their inverse degree is taken as 0).

    Parameters
    ----------
    incidence
        ``(B, M, E)`` incidence matrices.
    edge_weights
        ``(B, E)`` or ``(E,)`` hyperedge weights; `None` for 1.

    Returns
    -------
    ``(B, M, M)`` float32 operators.
    """
    h = incidence.float()
    w = torch.ones(h.shape[0], h.shape[2], device=h.device) if edge_weights is None else edge_weights.float()
    w = w.expand(h.shape[0], h.shape[2])
    node_degree = (h * w[:, None, :]).sum(dim=2)
    edge_degree = h.sum(dim=1)
    dv = torch.where(node_degree > 0, node_degree.rsqrt(), torch.zeros_like(node_degree))
    de = torch.where(edge_degree > 0, 1 / edge_degree, torch.zeros_like(edge_degree))
    left = dv[:, :, None] * h * (w * de)[:, None, :]  # Dv^-1/2 H W De^-1
    return left @ (h.transpose(1, 2) * dv[:, None, :])  # ... H^T Dv^-1/2


def similarity_graph_propagation(x: torch.Tensor, size: int) -> torch.Tensor:
    r"""The plain-graph counterpart: GCN's :math:`\hat D^{-1/2} (A + I) \hat D^{-1/2}` on a similarity graph.

    Node ``j`` is linked to its ``size - 1`` most cosine-similar nodes (the members of its
    hyperedge in :func:`similarity_hypergraph`); the links are made symmetric and self-loops
    added, so only pairwise relations remain.

    Parameters
    ----------
    x
        ``(B, M, d)`` node features.
    size
        Nodes per neighbourhood (the node itself included).

    Returns
    -------
    ``(B, M, M)`` float32 operators.
    """
    incidence = similarity_hypergraph(x, size)  # column j: node j and its most similar nodes
    adjacency = ((incidence + incidence.transpose(1, 2)) > 0).float()  # symmetric, diagonal set
    degree = adjacency.sum(dim=2).rsqrt()
    return degree[:, :, None] * adjacency * degree[:, None, :]


class GraphConvolutions(nn.Module):
    """``L`` graph / hypergraph convolutions ``X' = P (X Θ + b)`` with ReLU and dropout between layers.

    The operator ``P`` of each graph is built once from the input node features (the
    hypergraph of :func:`similarity_hypergraph` with :func:`hypergraph_propagation`, or the
    plain graph of :func:`similarity_graph_propagation`) and shared by the layers; the bias is
    added before propagating, as in HGNN's reference layer.

    Parameters
    ----------
    dim
        Node feature length (input and output).
    n_layers
        ``L``.
    size
        Nodes per hyperedge (or per neighbourhood of the plain graph).
    kind
        ``"hypergraph"`` or ``"graph"``.
    dropout
        Dropout between layers.
    """

    def __init__(
        self, dim: int, n_layers: int, size: int, kind: str = "hypergraph", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in ("hypergraph", "graph"):
            msg = f"`kind` must be 'hypergraph' or 'graph', got {kind!r}."
            raise ValueError(msg)
        self.size, self.kind = size, kind
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def operator(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M, M)`` propagation operator of the graphs of ``(B, M, d)`` node features."""
        if self.kind == "graph":
            return similarity_graph_propagation(x, self.size)
        return hypergraph_propagation(similarity_hypergraph(x, self.size))

    def _last_input(self, propagation: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """The input of the last layer from the first layer's output (``n_layers > 1``): ReLU and dropout between layers."""
        x = self.dropout(torch.relu(propagation @ first))
        for layer in self.layers[1:-1]:
            x = self.dropout(torch.relu(propagation @ layer(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M, d) -> (B, M, d)``."""
        propagation = self.operator(x).to(x.dtype)
        if len(self.layers) > 1:
            x = self._last_input(propagation, self.layers[0](x))
        return propagation @ self.layers[-1](x)

    def node_mean(self, table: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        r"""``(n, d), (B, M) -> (B, d)``: the mean over the nodes of :meth:`forward` of graphs whose nodes are rows of ``table``.

        Node ``j`` of graph ``b`` is row ``nodes[b, j]`` of ``table``; a row may be a node of
        several graphs. The same value as ``forward(table[nodes]).mean(dim=1)`` up to float
        rounding, for less work: the first layer runs once per row of ``table``, and the last one
        on the node mean only, :math:`\frac 1M \mathbf 1^\top P (X Θ + \mathbf 1 b) = (w X) Θ +
        (w \mathbf 1) b` with :math:`w = \frac 1M \mathbf 1^\top P`.
        """
        index = nodes.reshape(-1)

        def gathered(rows: torch.Tensor) -> torch.Tensor:
            # index_select, not `[index]`: its backward sums the repeated rows in a fixed order on any number of threads
            return rows.index_select(0, index).view(*nodes.shape, -1)

        x = gathered(table)
        propagation = self.operator(x).to(x.dtype)
        if len(self.layers) > 1:
            x = self._last_input(propagation, gathered(self.layers[0](table)))
        weights = propagation.mean(dim=1, keepdim=True)  # (B, 1, M)
        last = self.layers[-1]
        return F.linear((weights @ x).squeeze(1), last.weight) + weights.sum(dim=2) * last.bias
