"""NH2ST: dual-scale (query + spatial neighbourhood) contrastive learning with a prediction translator."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import non_negative_number, positive_int
from .base import FitReport, SpotSet, TrainConfig, register_method
from .graphs import GraphConvolutions, spatial_knn
from .layers import ImageInput, TorchMethod, pool_token_grid
from .losses import info_nce
from .training import train_module

#: Graph types of the neighbour branch (paper, Table 2: hypergraph "HG." and plain graph "G.").
GRAPHS = ("hypergraph", "graph")


class CrossAttention(nn.Module):
    r"""NH2ST's cross-attention ``φ_ca(x, guide) = softmax((W_q x)(W_k guide)^T / sqrt(d_k)) (W_v guide)``.

    **Decision**: each spot has a single feature vector per modality, and attention over a
    single key is the identity (softmax of one logit is 1), so the vectors are split into
    ``n_tokens`` tokens of ``dim / n_tokens`` channels after the projections and the tokens of
    ``x`` attend to those of ``guide`` — of the same spot only, never across the batch. With
    ``n_tokens=1`` this is the paper's equation taken literally, ``W_v guide``. The projections
    have no bias and there is no output projection, as in the equation.

    Parameters
    ----------
    dim
        Feature length, a multiple of ``n_tokens``.
    n_tokens
        Tokens per vector.
    """

    def __init__(self, dim: int, n_tokens: int) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """``(B, dim), (B, dim) -> (B, dim)``: ``x`` refined with guidance from ``guide``."""
        batch = len(x)

        def tokens(layer: nn.Linear, value: torch.Tensor) -> torch.Tensor:
            return layer(value).view(batch, self.n_tokens, -1)

        refined = F.scaled_dot_product_attention(
            tokens(self.query, x), tokens(self.key, guide), tokens(self.value, guide)
        )
        return refined.reshape(batch, -1)


def _two_layers(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class PathologyProjection(nn.Module):
    """The pathology encoder's last layer: image input to ``h_p`` of length ``dim``.

    - End to end: the encoder's last feature map (:meth:`ImageInput.tokens
      <histo2expr.models.layers.ImageInput.tokens>`) is average-pooled to a ``token_grid x
      token_grid`` grid (:func:`~histo2expr.models.layers.pool_token_grid`), flattened and
      projected by a linear layer. ResNet18's ``512 x 7 x 7`` map at 224 px with
      ``token_grid=7`` is the paper's encoder (the pooling is then the identity; it keeps the
      layer's size independent of the patch size); ``token_grid=1`` projects the pooled map.
    - Frozen: a linear layer on the cached, standardised features (the trainable adapter).
    """

    def __init__(self, image_input: ImageInput, dim: int, token_grid: int) -> None:
        super().__init__()
        encoder = image_input.encoder
        self.grid = None if encoder is None else token_grid
        has_map = encoder is not None and encoder.token_dim is not None
        if (
            self.grid is not None
            and self.grid > 1
            and not (has_map and hasattr(encoder.backbone, "forward_features"))
        ):
            msg = (
                f"Encoder {encoder.name!r} exposes no feature map (its backbone needs `forward_features` and "
                "`num_features`), so NH2ST cannot flatten one; pass `token_grid=1` to project its pooled features."
            )
            raise ValueError(msg)
        in_dim = image_input.dim if self.grid is None else image_input.token_dim * self.grid**2
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, image_input: ImageInput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, dim)`` h_p of a batch."""
        if self.grid is None:
            return self.linear(image_input(batch))
        return self.linear(pool_token_grid(image_input.tokens(batch), self.grid).flatten(1))


class _NH2STNetwork(nn.Module):
    """All of NH2ST's trainable parts.

    - ``image_input`` + ``pathology``: the pathology encoder, h_p; ``gene_encoder``: h_g.
    - ``translator``: h_p -> expression (the only part used at inference besides the encoder).
    - ``query_attention``: the query branch's cross-attention (when ``cross_attention``).
    - ``image_graph`` / ``gene_graph`` and ``neighbour_attention``: the neighbour branch.
    """

    def __init__(self, image_input: ImageInput, n_genes: int, params: dict[str, Any]) -> None:
        super().__init__()
        dim, hidden, dropout = params["embedding_dim"], params["hidden"], params["dropout"]
        self.image_input = image_input
        self.pathology = PathologyProjection(image_input, dim, params["token_grid"])
        self.translator = _two_layers(dim, hidden, n_genes, dropout)
        if not params["contrastive"]:
            return
        self.gene_encoder = _two_layers(n_genes, hidden, dim, dropout)
        if params["cross_attention"]:
            self.query_attention = CrossAttention(dim, params["attention_tokens"])
        if params["neighbour_branch"]:
            graph = {
                "n_layers": params["n_layers"],
                "size": params["hyperedge_size"],
                "kind": params["graph"],
            }
            self.image_graph = GraphConvolutions(dim, dropout=dropout, **graph)
            self.gene_graph = GraphConvolutions(dim, dropout=dropout, **graph)
            if params["cross_attention"]:
                self.neighbour_attention = CrossAttention(dim, params["attention_tokens"])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, embedding_dim)`` h_p, the pathology features of a batch."""
        return self.pathology(self.image_input, batch)

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_genes)`` the translator's prediction, image -> encoder -> translator only."""
        return self.translator(self(batch))


def _unique_rows(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch with every spot once (first occurrence), and where each original row is in it."""
    positions = batch["position"]
    unique, inverse = torch.unique(positions, return_inverse=True)
    order = torch.arange(len(positions), device=positions.device)
    first = torch.full((len(unique),), len(positions), device=positions.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return {key: value[first] for key, value in batch.items()}, inverse


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        msg = f"`{name}` must be True or False, got {value!r}."
        raise TypeError(msg)
    return value


@register_method
class NH2STMethod(TorchMethod):
    """``method="nh2st"``: NH2ST, dual-scale contrastive learning with a prediction translator.

    **Encoders.** The pathology encoder gives h_p (``embedding_dim``): end to end an image
    encoder whose last feature map is flattened and projected by a linear layer
    (``nh2st.PathologyProjection``; the paper's ResNet18 is ``encoder="resnet18"``, the
    default stays the offline ``"efficientnet_lite0"``, the one pretrained encoder available
    without a model hub); frozen, a trainable linear adapter on the cached, standardised
    features. The ST encoder gives h_g from the standardised expression with two fully
    connected layers (ReLU, ``hidden`` units).

    **Query branch.** z_p = CA(h_p, h_g), z_g = CA(h_g, h_p) with one cross-attention module
    used in both directions (``nh2st.CrossAttention``; the paper writes one φ_ca for both),
    and L_query = :func:`~histo2expr.models.info_nce` between z_p and z_g over the
    batch at the fixed ``temperature`` (**Decision**: the symmetric form, both directions
    averaged; the paper writes the pathology-to-gene direction).

    **Neighbour branch.** For every spot of a batch, its ``n_neighbours`` nearest spots of the
    same slide among the spots being fitted (``graphs.spatial_knn``; never spots of another
    slide, never validation or held-out spots) join it as a graph of ``n_neighbours + 1``
    nodes per modality, whose node features are h_p and h_g of those spots from the same
    encoders (gradients flow through them too). A training batch is ``batch_size`` shuffled
    spots followed by their neighbours, so frozen features or patches of the neighbours come
    through the usual batch loader, never by reading whole slides; each spot is encoded once
    per batch. Each modality's hypergraph has one hyperedge per node joining it with its
    ``hyperedge_size - 1`` most cosine-similar nodes (``graphs.similarity_hypergraph``);
    ``n_layers`` hypergraph convolutions ``X' = Dv^-1/2 H W De^-1 H^T Dv^-1/2 (X Θ + b)``
    (W = I, ReLU between layers; ``graphs.GraphConvolutions``), a separate stack per
    modality, mean pooling over the nodes, a second cross-attention module and InfoNCE give
    L_neighbour. ``graph="graph"`` replaces the hypergraph by the plain graph linking each node
    to the same most similar nodes (GCN normalisation), the paper's "G." ablation.

    **Translator and objective.** ŷ = translator(h_p), two fully connected layers (``hidden``
    units), trained with the MSE. ``L = query_weight * L_query + neighbour_weight *
    L_neighbour + L_MSE``. Inference uses image -> encoder -> translator only: a spot's
    prediction depends on its own image alone, never on its batch or its neighbours.

    **Early stopping** (**Decision**): after every epoch the validation spots (training slides
    only) are scored by the MSE of the translator's prediction — what inference uses — and
    the best epoch is kept.

    **Training defaults.** The paper trains with Adam, lr 1e-4, batch 8, 20 epochs. Here the
    :class:`~histo2expr.models.TrainConfig` of the caller applies (``fit_histo2expr``:
    AdamW, lr 1e-3, batch 64, at most 50 epochs with early stopping), and the feature
    width is 256 instead of 512, so that one her2st fold (about 1000 training spots, 250
    genes, frozen features) fits in about 20 s on one CPU core: a batch of 64 spots carries up
    to 64 * (``n_neighbours`` + 1) spots through the encoders. Pass ``batch_size=8, lr=1e-4,
    epochs=20`` and ``embedding_dim=512, hidden=512`` for the paper's setting. End to end every
    neighbour patch of a batch goes through the encoder too (each spot once per batch).

    Parameters
    ----------
    encoder
        End-to-end regime: an encoder name (``"efficientnet_lite0"`` by default; the paper's
        ``"resnet18"``; any timm name) or a :class:`torch.nn.Module` (copied). Ignored in the
        frozen regime.
    weights
        Initial encoder weights, see :func:`~histo2expr.models.build_encoder`. Ignored
        in the frozen regime.
    embedding_dim
        N, the length of h_p, h_g and the graph features (256; the paper's 512 doubles the time
        of a CPU fit, see above).
    hidden
        Hidden units of the ST encoder and of the translator (256; the paper's layers are 512 wide).
    token_grid
        End-to-end regime: the encoder's feature map is pooled to this grid before flattening
        (7: ResNet18's map at 224 px, unchanged); 1 projects the pooled map (the only choice
        for an encoder without a feature map).
    neighbour_branch
        Train with the neighbour branch (True); False is the paper's "query branch only".
    cross_attention
        Refine both branches' pairs with cross-attention (True); False aligns h_p with h_g
        (and the pooled graph features) directly.
    contrastive
        The two InfoNCE terms (True); False trains the encoder and translator with the MSE
        alone (the branches then have no loss and are not built).
    graph
        ``"hypergraph"`` (default) or ``"graph"``.
    n_neighbours
        K, spatial neighbours per spot (8); every training slide needs more spots.
    n_layers
        L, graph convolution layers (2).
    hyperedge_size
        Nodes per hyperedge, the node itself included, 2 to ``n_neighbours + 1`` (3, as in the
        authors' code).
    attention_tokens
        Tokens per vector in the cross-attention (8; 1 is the literal single-vector equation);
        must divide ``embedding_dim``.
    temperature
        τ of both InfoNCE terms (0.05, the paper's).
    query_weight, neighbour_weight
        λ1 and λ2 (1 and 0.5, the paper's).
    dropout
        Dropout of the hidden layers of the ST encoder and the translator and between graph
        layers (0.1).

    Notes
    -----
    :meth:`embed` returns h_p, the pathology features the translator reads.
    """

    name = "nh2st"

    def __init__(
        self,
        *,
        encoder: str | nn.Module = "efficientnet_lite0",
        weights: Any = "default",
        embedding_dim: int = 256,
        hidden: int = 256,
        token_grid: int = 7,
        neighbour_branch: bool = True,
        cross_attention: bool = True,
        contrastive: bool = True,
        graph: str = "hypergraph",
        n_neighbours: int = 8,
        n_layers: int = 2,
        hyperedge_size: int = 3,
        attention_tokens: int = 8,
        temperature: float = 0.05,
        query_weight: float = 1.0,
        neighbour_weight: float = 0.5,
        dropout: float = 0.1,
    ) -> None:
        if graph not in GRAPHS:
            msg = f"`graph` must be one of {list(GRAPHS)}, got {graph!r}."
            raise ValueError(msg)
        embedding_dim, n_neighbours = (
            positive_int(embedding_dim, "embedding_dim"),
            positive_int(n_neighbours, "n_neighbours"),
        )
        attention_tokens, hyperedge_size = (
            positive_int(attention_tokens, "attention_tokens"),
            positive_int(hyperedge_size, "hyperedge_size"),
        )
        if embedding_dim % attention_tokens:
            msg = (
                f"`attention_tokens={attention_tokens}` must divide `embedding_dim={embedding_dim}` (each vector "
                "is split into that many tokens); choose e.g. 1, 4 or 8."
            )
            raise ValueError(msg)
        if not 2 <= hyperedge_size <= n_neighbours + 1:
            msg = (
                f"`hyperedge_size={hyperedge_size}` must be between 2 and n_neighbours + 1 = {n_neighbours + 1}: a "
                "hyperedge joins a node with its most similar nodes among the spot and its neighbours."
            )
            raise ValueError(msg)
        super().__init__(
            encoder=encoder,
            weights=weights,
            embedding_dim=embedding_dim,
            hidden=positive_int(hidden, "hidden"),
            token_grid=positive_int(token_grid, "token_grid"),
            neighbour_branch=_check_flag(neighbour_branch, "neighbour_branch"),
            cross_attention=_check_flag(cross_attention, "cross_attention"),
            contrastive=_check_flag(contrastive, "contrastive"),
            graph=graph,
            n_neighbours=n_neighbours,
            n_layers=positive_int(n_layers, "n_layers"),
            hyperedge_size=hyperedge_size,
            attention_tokens=attention_tokens,
            temperature=non_negative_number(temperature, "temperature", positive=True),
            query_weight=non_negative_number(query_weight, "query_weight"),
            neighbour_weight=non_negative_number(neighbour_weight, "neighbour_weight"),
            dropout=dropout,
        )

    @property
    def uses_coordinates(self) -> bool:
        """True with the neighbour branch (its spatial neighbours), which ``neighbour_branch=False`` turns off."""
        return self.params["contrastive"] and self.params["neighbour_branch"]

    def build(self, image_input: ImageInput, n_genes: int) -> _NH2STNetwork:
        """All trainable parts of NH2ST (random weights)."""
        return _NH2STNetwork(image_input, n_genes, self.params)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Train encoders, branches and translator on ``train``; early stopping on the validation MSE."""
        if validation is not None and len(validation) == 0:
            validation = None
        params = self.params
        with_neighbours = params["contrastive"] and params["neighbour_branch"]
        k = params["n_neighbours"]
        neighbours = spatial_knn(train.coords, train.groups, k=k) if with_neighbours else None
        network = self.start_fit(train, validation, config)
        log_scale = math.log(1 / params["temperature"])
        query_weight, neighbour_weight = params["query_weight"], params["neighbour_weight"]

        def aligned(attention: str, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
            if params["cross_attention"]:
                cross = getattr(network, attention)
                image, gene = cross(image, gene), cross(gene, image)
            return info_nce(image, gene, log_scale, max_scale=1 / params["temperature"])

        def objective(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            targets = batch["targets"]
            if not params["contrastive"]:
                return F.mse_loss(network.predict(batch).float(), targets)
            size = len(targets) // (k + 1) if with_neighbours else len(targets)  # the batch's own spots
            unique, rows = _unique_rows(batch)
            # index_select, not `[rows]`: its backward sums the repeated rows in a fixed order on any number
            # of threads, so that CPU fits stay bit-identical
            image = network(unique).index_select(0, rows)
            gene = network.gene_encoder(unique["targets"]).index_select(0, rows)
            loss = F.mse_loss(network.translator(image[:size]).float(), targets[:size])
            loss = loss + query_weight * aligned("query_attention", image[:size], gene[:size])
            if with_neighbours:
                pooled = []
                for graph, features in ((network.image_graph, image), (network.gene_graph, gene)):
                    nodes = torch.cat([features[:size, None], features[size:].view(size, k, -1)], dim=1)
                    pooled.append(graph(nodes).mean(dim=1))
                loss = loss + neighbour_weight * aligned("neighbour_attention", *pooled)
            return loss

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if network.training:
                return objective(batch)
            return F.mse_loss(network.predict(batch).float(), batch["targets"])

        def order(epoch: int) -> list[np.ndarray]:
            """Shuffled batches of ``batch_size`` spots, each followed by the neighbours of its spots."""
            rows = np.random.default_rng([config.seed, epoch]).permutation(len(train))
            batches = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
            if len(batches) > 1 and len(batches[-1]) < config.batch_size:
                batches = batches[:-1]
            return [np.concatenate([spots, neighbours[spots].ravel()]) for spots in batches]

        prepare = network.image_input.prepare
        self.report = train_module(
            network,
            loss_fn,
            prepare(train),
            None if validation is None else prepare(validation),
            config,
            batch_order=order if with_neighbours else None,
        )
        return self.report

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` predicted standardised expression: image -> encoder -> translator."""
        network, data = self.fitted(data)
        return self.run(network.predict, data)

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, embedding_dim)`` h_p, the pathology features the translator reads."""
        network, data = self.fitted(data)
        return self.run(network, data)
