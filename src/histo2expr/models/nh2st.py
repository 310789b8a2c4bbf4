"""NH2ST: dual-scale (query + spatial neighbourhood) contrastive learning with a prediction translator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import flag, non_negative_number, one_of, positive_int, probability
from .base import FitReport, SpotSet, TrainConfig, register_method
from .batches import shuffled_batches
from .graphs import GraphConvolutions, spatial_knn
from .layers import EncoderSettings, ImageInput, TorchMethod, pool_token_grid
from .losses import info_nce
from .training import LossOutput, SpotNetwork

#: Graph types of the neighbour branch (paper, Table 2: hypergraph "HG." and plain graph "G.").
GRAPHS = ("hypergraph", "graph")
#: What the validation spots are scored by to choose the epoch: the translator's gene-wise PCC or MSE.
EARLY_STOPPING = ("pcc", "mse")


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

    def check_grid(self, image_input: ImageInput, patch_size: int) -> None:
        """Raise a clear error, before any training, when the feature map of ``patch_size`` px patches is smaller than the grid."""
        if self.grid is None or self.grid == 1:
            return
        encoder = image_input.encoder
        training = encoder.training
        encoder.eval()  # one blank patch through the encoder; its batch statistics stay as they are
        with torch.no_grad():
            blank = torch.zeros(1, 3, patch_size, patch_size, dtype=torch.uint8)
            side = math.isqrt(image_input.tokens({"image": blank}).shape[1])
        encoder.train(training)
        if side < self.grid:
            msg = (
                f"NH2ST flattens a {self.grid} x {self.grid} grid of the encoder's feature map, but "
                f"{patch_size} px patches give a {side} x {side} map; pass `token_grid={side}` (or 1) or larger "
                "patches (`patch_size`)."
            )
            raise ValueError(msg)

    def forward(self, image_input: ImageInput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, dim)`` h_p of a batch."""
        if self.grid is None:
            return self.linear(image_input(batch))
        return self.linear(pool_token_grid(image_input.tokens(batch), self.grid).flatten(1))


@dataclass(frozen=True, kw_only=True)
class NH2STSettings(EncoderSettings):
    """Settings of :class:`NH2STMethod` (see its parameters)."""

    embedding_dim: int = 256
    hidden: int = 256
    token_grid: int = 7
    neighbour_branch: bool = True
    cross_attention: bool = True
    contrastive: bool = True
    graph: str = "hypergraph"
    n_neighbours: int = 8
    n_layers: int = 2
    hyperedge_size: int = 3
    attention_tokens: int = 8
    temperature: float = 0.05
    query_weight: float = 1.0
    neighbour_weight: float = 0.5
    dropout: float = 0.1
    average_epochs: float | None = None
    early_stopping: str = "mse"
    ensemble: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        one_of(self.graph, GRAPHS, "graph")
        one_of(self.early_stopping, EARLY_STOPPING, "early_stopping")
        for name in (
            "embedding_dim",
            "hidden",
            "token_grid",
            "n_neighbours",
            "n_layers",
            "hyperedge_size",
            "attention_tokens",
        ):
            set_(self, name, positive_int(getattr(self, name), name))
        for name in ("neighbour_branch", "cross_attention", "contrastive"):
            flag(getattr(self, name), name)
        set_(self, "temperature", non_negative_number(self.temperature, "temperature", positive=True))
        for name in ("query_weight", "neighbour_weight"):
            set_(self, name, non_negative_number(getattr(self, name), name))
        set_(self, "dropout", probability(self.dropout, "dropout"))
        if self.embedding_dim % self.attention_tokens:
            msg = (
                f"`attention_tokens={self.attention_tokens}` must divide `embedding_dim={self.embedding_dim}` (each "
                "vector is split into that many tokens); choose e.g. 1, 4 or 8."
            )
            raise ValueError(msg)
        if not 2 <= self.hyperedge_size <= self.n_neighbours + 1:
            msg = (
                f"`hyperedge_size={self.hyperedge_size}` must be between 2 and n_neighbours + 1 = "
                f"{self.n_neighbours + 1}: a hyperedge joins a node with its most similar nodes among the spot and "
                "its neighbours."
            )
            raise ValueError(msg)

    @property
    def with_neighbours(self) -> bool:
        """Whether the neighbour branch trains (it needs the spot coordinates)."""
        return self.contrastive and self.neighbour_branch


def neighbour_batches(epoch: int, *, neighbours: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffled batches of ``batch_size`` spots (a smaller last one dropped), each followed by its spots' neighbours.

    ``neighbours`` is ``(n, k)``: the rows of every spot's ``k`` spatial neighbours.
    """
    batches = shuffled_batches(epoch, n=len(neighbours), batch_size=batch_size, seed=seed, drop_last=True)
    return [np.concatenate([spots, neighbours[spots].ravel()]) for spots in batches]


class _NH2STNetwork(SpotNetwork):
    """All of NH2ST's trainable parts and its objective.

    - ``image_input`` + ``pathology``: the pathology encoder, h_p; ``gene_encoder``: h_g.
    - ``translator``: h_p -> expression (the only part used at inference besides the encoder).
    - ``query_attention``: the query branch's cross-attention (when ``cross_attention``).
    - ``image_graph`` / ``gene_graph`` and ``neighbour_attention``: the neighbour branch.
    """

    def __init__(self, image_input: ImageInput, n_genes: int, settings: NH2STSettings) -> None:
        super().__init__()
        self.settings = settings
        dim, hidden, dropout = settings.embedding_dim, settings.hidden, settings.dropout
        self.image_input = image_input
        self.pathology = PathologyProjection(image_input, dim, settings.token_grid)
        self.translator = _two_layers(dim, hidden, n_genes, dropout)
        self.validation_metric = "pcc" if settings.early_stopping == "pcc" else "loss"
        if not settings.contrastive:
            return
        self.gene_encoder = _two_layers(n_genes, hidden, dim, dropout)
        if settings.cross_attention:
            self.query_attention = CrossAttention(dim, settings.attention_tokens)
        if settings.neighbour_branch:
            graph = {"n_layers": settings.n_layers, "size": settings.hyperedge_size, "kind": settings.graph}
            self.image_graph = GraphConvolutions(dim, dropout=dropout, **graph)
            self.gene_graph = GraphConvolutions(dim, dropout=dropout, **graph)
            if settings.cross_attention:
                self.neighbour_attention = CrossAttention(dim, settings.attention_tokens)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, embedding_dim)`` h_p, the pathology features of a batch."""
        return self.pathology(self.image_input, batch)

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, n_genes)`` the translator's prediction, image -> encoder -> translator only."""
        return self.translator(self(batch))

    def _aligned(self, attention: str, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
        """InfoNCE of a pair of modalities at the fixed temperature, after cross-attention when enabled."""
        temperature = self.settings.temperature
        if self.settings.cross_attention:
            cross = getattr(self, attention)
            image, gene = cross(image, gene), cross(gene, image)
        return info_nce(image, gene, math.log(1 / temperature), max_scale=1 / temperature)

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """``L_MSE + query_weight * L_query + neighbour_weight * L_neighbour`` (terms ``mse``, ``query``, ``neighbour``).

        With the neighbour branch a batch is its own spots followed by ``n_neighbours``
        neighbours of each (:func:`neighbour_batches`).
        """
        settings, targets = self.settings, batch["targets"]
        if not settings.contrastive:
            return LossOutput(F.mse_loss(self.predict(batch).float(), targets))
        k = settings.n_neighbours
        size = len(targets) // (k + 1) if settings.with_neighbours else len(targets)  # the batch's own spots
        unique, rows = _unique_rows(batch)
        image_rows, gene_rows = self(unique), self.gene_encoder(unique["targets"])
        # index_select, not `[rows]`: its backward sums the repeated rows in a fixed order on any number
        # of threads, so that CPU fits stay bit-identical
        own = rows[:size]
        image, gene = image_rows.index_select(0, own), gene_rows.index_select(0, own)
        terms = {"mse": F.mse_loss(self.translator(image).float(), targets[:size])}
        terms["query"] = self._aligned("query_attention", image, gene)
        loss = terms["mse"] + settings.query_weight * terms["query"]
        if settings.with_neighbours:
            # graph b: spot b, then its neighbours
            nodes = torch.cat([own[:, None], rows[size:].view(size, k)], dim=1)
            pooled = [
                graph.node_mean(table, nodes)
                for graph, table in ((self.image_graph, image_rows), (self.gene_graph, gene_rows))
            ]
            terms["neighbour"] = self._aligned("neighbour_attention", *pooled)
            loss = loss + settings.neighbour_weight * terms["neighbour"]
        return LossOutput(loss, terms)

    def validation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MSE of the translator's prediction, what inference uses (``early_stopping="mse"``)."""
        return F.mse_loss(self.predict(batch).float(), batch["targets"])

    def validation_predictions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The translator's prediction, whose gene-wise PCC chooses the epoch (``early_stopping="pcc"``)."""
        return self.predict(batch)


def _unique_rows(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch with every spot once (first occurrence), and where each original row is in it."""
    positions = batch["position"]
    unique, inverse = torch.unique(positions, return_inverse=True)
    order = torch.arange(len(positions), device=positions.device)
    first = torch.full((len(unique),), len(positions), device=positions.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return {key: value.index_select(0, first) for key, value in batch.items()}, inverse


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
    only) are scored by the MSE of the translator's prediction — what inference uses — and the
    best epoch is kept (``early_stopping="mse"``). ``early_stopping="pcc"`` scores its mean
    gene-wise PCC instead, as the benchmark does, and ``average_epochs`` validates and keeps an
    exponential moving average of the weights (the training engine's ``EpochEMA``), whose
    validation curve is smooth. On
    her2st the two together halved the spread over seeds but lowered the mean and the patient-B
    section, and did not make the result less sensitive to float-level changes of the features
    (``benchmarks/results/her2st_nh2st_stability.md``), so both are options, off by default.

    **Ensemble** (default ``ensemble=3``): :func:`~histo2expr.tl.fit_histo2expr` fits three
    members, each with its own seed and its own inner validation slide, and predicts their mean
    (:class:`~histo2expr.models.Ensemble`). Which epoch a single fit keeps flips with its seed and
    with float-level changes of the features; on her2st the mean of three removed most of that
    spread and raised the mean PCC(ACG) from 0.212 to 0.230, for three times the training time
    (``benchmarks/results/her2st_ensemble.md``). ``ensemble=1`` is a single fit.

    **Training defaults.** The paper trains with Adam, lr 1e-4, batch 8, 20 epochs. Here the
    :class:`~histo2expr.models.TrainConfig` of the caller applies (``fit_histo2expr``:
    AdamW, lr 1e-3, batch 64, at most 50 epochs with early stopping), and the feature
    width is 256 instead of 512, so that one her2st fold (about 1000 training spots, 250
    genes, frozen features) fits in about 20 s on one CPU core per member: a batch of 64 spots carries up
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
    early_stopping
        What chooses the epoch on the validation spots: ``"mse"`` (default), the mean squared
        error of the translator's prediction; ``"pcc"``, its mean gene-wise PCC.
    average_epochs
        Time constant, in epochs, of an exponential moving average of the weights that is
        validated and kept (the training engine's option of the same name); `None` (default)
        validates and keeps the trained weights themselves.
    ensemble
        Members fitted and averaged (3; see above and :class:`~histo2expr.models.Ensemble`); 1 is a
        single fit, a third of the time.

    Notes
    -----
    :meth:`embed` returns h_p, the pathology features the translator reads.
    """

    name = "nh2st"
    settings_class = NH2STSettings
    settings: NH2STSettings

    @property
    def uses_coordinates(self) -> bool:
        """Whether training reads the coordinates (the neighbour branch)."""
        return self.settings.with_neighbours

    def build(self, image_input: ImageInput, n_genes: int) -> _NH2STNetwork:
        """All trainable parts of NH2ST (random weights)."""
        return _NH2STNetwork(image_input, n_genes, self.settings)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Train encoders, branches and translator on ``train``; early stopping on the validation MSE."""
        order = None
        if self.settings.with_neighbours:
            neighbours = spatial_knn(train.coords, train.groups, k=self.settings.n_neighbours)
            order = partial(
                neighbour_batches, neighbours=neighbours, batch_size=config.batch_size, seed=config.seed
            )
        network = self.start_fit(train, validation, config)
        if train.regime == "end2end":
            network.pathology.check_grid(network.image_input, train.patches.patch_size)
        self.report = self.fit_network(network, train, validation, config, train_batches=order)
        return self.report

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` predicted standardised expression: image -> encoder -> translator."""
        network, data = self.fitted(data)
        return self.run(network.predict, data)

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, embedding_dim)`` h_p, the pathology features the translator reads."""
        network, data = self.fitted(data)
        return self.run(network, data)
