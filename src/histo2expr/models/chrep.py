"""CHRep: structure-aware representation learning, then post-hoc calibration by retrieval and correction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import flag, non_negative_number, one_of, positive_int, probability
from .base import FitReport, SpotSet, TrainConfig, register_method
from .gallery import GALLERY_INDEXES, Gallery
from .inference import predict_batches
from .layers import EncoderSettings, ImageInput, ProjectionHead, RegressionHead, TorchMethod
from .losses import info_nce, regression_loss, topology_loss
from .training import VALIDATION_METRIC, LossOutput, SpotNetwork, TrainingPlan, train_network

#: Calibrations of the inference phase (paper, Table 2).
CALIBRATIONS = ("estimate", "correction", "estimate+correction", "estimate+correction+constraint")
#: Terms of the representation objective (paper, Table 3).
LOSSES = ("regression", "contrastive", "topology")
#: Initial logit scale of the contrastive loss (CLIP: a temperature of 0.07).
_INITIAL_LOG_SCALE = math.log(1 / 0.07)
#: Candidate neighbours per spot looked up once, as multiples of the neighbourhood size.
_CANDIDATES_PER_SIZE = 4


def normalise_coordinates(coords: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Coordinates of every slide mapped to [0, 1] along its longer side (aspect ratio kept).

    Each slide's minimum is subtracted and the result divided by the larger of its x and y
    ranges, so that positions are comparable across slides of any pixel size and distances
    within a slide keep their order (the kNN graph is unchanged).

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres in pixels.
    groups
        ``(n,)`` slide of every spot.

    Returns
    -------
    ``(n, 2)`` float32 normalised coordinates.
    """
    coords = np.asarray(coords, dtype=np.float64)
    groups = np.asarray(groups)
    if not np.isfinite(coords).all():
        msg = "Spot coordinates contain NaN or infinite values; CHRep needs the spot centres in obsm['spatial']."
        raise ValueError(msg)
    out = np.zeros(coords.shape, dtype=np.float32)
    for group in dict.fromkeys(groups.tolist()):
        rows = groups == group
        if rows.sum() < 2:
            continue
        low = coords[rows].min(axis=0)
        span = float((coords[rows].max(axis=0) - low).max())
        if span == 0:
            msg = (
                f"All {int(rows.sum())} spots of slide {group!r} have the same coordinates, but CHRep's "
                "coordinate branch and topology loss need the spot centres: store them in obsm['spatial'] "
                "(full-resolution pixels), or train with losses=('regression',)."
            )
            raise ValueError(msg)
        out[rows] = (coords[rows] - low) / span
    return out


def spatial_neighbourhoods(
    coords: np.ndarray, groups: np.ndarray, *, size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Partition the spots into spatially coherent neighbourhoods of ``size`` spots of one slide.

    Seeds are visited in a random order drawn from ``(seed, epoch)``; each seed not yet taken
    gathers itself and its nearest spots of the same slide that are not yet taken, up to
    ``size``. Every spot lies in exactly one neighbourhood per epoch; the last neighbourhoods
    of a slide may be smaller or more spread out (they take what is left).

    Parameters
    ----------
    coords
        ``(n, 2)`` coordinates (distances are compared within a slide only).
    groups
        ``(n,)`` slide of every spot.
    size
        Spots per neighbourhood.
    seed, epoch
        The order of the seeds.

    Returns
    -------
    Arrays of row positions, one per neighbourhood, in the order they were formed.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng([seed, epoch])
    groups = np.asarray(groups)
    neighbourhoods = []
    for group in dict.fromkeys(groups.tolist()):
        members = np.flatnonzero(groups == group)
        points = np.asarray(coords[members], dtype=np.float64)
        n = len(members)
        _, candidates = cKDTree(points).query(points, k=min(n, _CANDIDATES_PER_SIZE * size))
        candidates = np.asarray(candidates).reshape(n, -1)
        free = np.ones(n, dtype=bool)
        for start in rng.permutation(n):
            if not free[start]:
                continue
            near = candidates[start]
            near = np.concatenate([[start], near[free[near] & (near != start)]])[:size]
            if len(near) < size and free.sum() > len(near):  # the candidates are taken: search all free spots
                left = np.flatnonzero(free)
                distance = ((points[left] - points[start]) ** 2).sum(axis=1)
                distance[left == start] = -1
                near = left[np.argsort(distance, kind="stable")[:size]]
            free[near] = False
            neighbourhoods.append(members[near])
    return neighbourhoods


def neighbourhood_batches(
    coords: np.ndarray, groups: np.ndarray, *, size: int, batch_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Mini-batches of several spatially coherent neighbourhoods (:func:`spatial_neighbourhoods`).

    The neighbourhoods (of all slides) are shuffled with ``(seed, epoch)`` and packed in that
    order into batches of at most ``batch_size`` spots, whole neighbourhoods only (so a batch
    holds about ``batch_size / size`` seeds, possibly of different slides). A last batch of a
    single spot joins the one before it.
    """
    hoods = spatial_neighbourhoods(coords, groups, size=size, seed=seed, epoch=epoch)
    rng = np.random.default_rng([seed, epoch, 1])
    batches: list[list[np.ndarray]] = []
    filled = batch_size
    for position in rng.permutation(len(hoods)):
        hood = hoods[position]
        if filled + len(hood) > batch_size:
            batches.append([])
            filled = 0
        batches[-1].append(hood)
        filled += len(hood)
    out = [np.concatenate(parts) for parts in batches]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2:] = [np.concatenate(out[-2:])]
    return out


class FourierCoordinates(nn.Module):
    """Fourier features of normalised 2-D coordinates: ``[c, sin(2^l pi c), cos(2^l pi c)]``, l < L.

    Parameters
    ----------
    n_frequencies
        ``L``: frequencies ``pi, 2 pi, ..., 2^(L-1) pi`` per axis (wavelengths from twice the
        slide down to ``2^(2-L)`` of it); ``4 L + 2`` features.
    """

    def __init__(self, n_frequencies: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32))
        self.dim = 4 * n_frequencies + 2

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``(B, 2) -> (B, 4 L + 2)``."""
        angles = (coords[:, :, None] * self.frequencies).flatten(1)
        return torch.cat([coords, torch.sin(angles), torch.cos(angles)], dim=1)


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class ResidualAdapter(nn.Module):
    """The frozen regime's image encoder f: the backbone's features plus a learned MLP residual.

    ``h = (x * scale + mean) + MLP(x)`` where ``x`` are the frozen features standardised by the
    :class:`~histo2expr.models.layers.ImageInput` (floored scale, clipped to ±10). The skip
    path gives back the backbone's features in their own units (bounded by the clipping), and
    the MLP's last layer starts at zero, so training starts from the backbone's own geometry
    — whose cosine retrieval is already a strong estimate — and learns a correction of it.

    Parameters
    ----------
    mean, scale
        Per-feature statistics of the standardisation.
    hidden
        Hidden units of the MLP.
    dropout
        Dropout of the MLP's hidden layer.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        dim = len(self.mean)
        self.mlp = _mlp(dim, hidden, dim, dropout)
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, d)``."""
        return x * self.scale + self.mean + self.mlp(x)


def _check_losses(losses: Any) -> tuple[str, ...]:
    if isinstance(losses, str):
        losses = (losses,)
    try:
        chosen = tuple(dict.fromkeys(losses))
    except TypeError:
        chosen = ()
    unknown = [name for name in chosen if name not in LOSSES]
    if not chosen or unknown:
        msg = f"`losses` must be a non-empty collection of {list(LOSSES)}, got {losses!r}" + (
            f" (unknown: {unknown})." if unknown else "."
        )
        raise ValueError(msg)
    return tuple(name for name in LOSSES if name in chosen)


@dataclass(frozen=True, kw_only=True)
class CHRepSettings(EncoderSettings):
    """Settings of :class:`CHRepMethod` (see its parameters)."""

    losses: tuple[str, ...] = LOSSES
    calibration: str = "estimate+correction+constraint"
    regression_weight: float = 1.0
    alignment_weight: float = 1.0
    topology_weight: float = 1.0
    embedding_dim: int = 256
    adapter_hidden: int = 256
    projection_dim: int = 128
    dropout: float = 0.1
    n_frequencies: int = 6
    knn: int = 4
    hops: int = 2
    hop_decay: float = 0.5
    neighbourhood_size: int = 8
    top_k: int = 50
    estimate_temperature: float = 0.1
    correction_hidden: int = 64
    correction_penalty: float = 1.0
    exclude_own_slide: bool = True
    gallery_index: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        set_(self, "losses", _check_losses(self.losses))
        one_of(self.calibration, CALIBRATIONS, "calibration")
        one_of(self.gallery_index, GALLERY_INDEXES, "gallery_index")
        for name in ("regression_weight", "alignment_weight", "topology_weight", "correction_penalty"):
            set_(self, name, non_negative_number(getattr(self, name), name))
        set_(
            self,
            "estimate_temperature",
            non_negative_number(self.estimate_temperature, "estimate_temperature", positive=True),
        )
        for name in (
            "embedding_dim", "adapter_hidden", "projection_dim", "n_frequencies", "knn", "hops",
            "neighbourhood_size", "top_k", "correction_hidden",
        ):  # fmt: skip
            set_(self, name, positive_int(getattr(self, name), name))
        set_(self, "dropout", probability(self.dropout, "dropout"))
        decay = self.hop_decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
            msg = f"`hop_decay` must be in (0, 1], got {decay!r}."
            raise ValueError(msg)
        set_(self, "hop_decay", float(decay))
        if self.neighbourhood_size <= self.knn:
            msg = (
                f"`neighbourhood_size={self.neighbourhood_size}` must exceed `knn={self.knn}`: a spot's k nearest "
                "neighbours are looked for inside its neighbourhood of the batch. Raise neighbourhood_size or lower knn."
            )
            raise ValueError(msg)
        flag(self.exclude_own_slide, "exclude_own_slide")

    @property
    def spatial(self) -> bool:
        """Whether the representation objective reads the spot coordinates (contrastive or topology term)."""
        return bool({"contrastive", "topology"} & set(self.losses))


class _CHRepNetwork(SpotNetwork):
    """All of CHRep's trainable parts, and the representation objective.

    - ``image_input`` and ``adapter``: the image encoder f (the encoder end to end; a
      :class:`ResidualAdapter` on the standardised frozen or adapted features). Its output is h, also the calibration
      query q.
    - ``head``: the regression head g (dropped at inference).
    - ``position`` and ``fuse``: the coordinate branch p and the fusion m = fuse(h + p).
    - ``gene_encoder``: e(y) -> z; ``image_projection`` / ``gene_projection`` and ``log_scale``:
      the contrastive alignment of m and z.
    - ``correction``: the correction module of the inference phase, r = MLP(q), at zero until trained.

    Parts that the chosen ``losses`` do not train are frozen (``requires_grad=False``), so that
    data-parallel training finds a gradient for every trainable parameter.
    """

    def __init__(self, image_input: ImageInput, n_genes: int, settings: CHRepSettings) -> None:
        super().__init__()
        self.settings = settings
        self.image_input = image_input
        dropout, width = settings.dropout, settings.embedding_dim
        dim = image_input.dim
        if image_input.scaler is not None:  # frozen and adapted regimes: standardised features
            scaler = image_input.scaler
            self.adapter: nn.Module = ResidualAdapter(
                scaler.mean_, scaler.scale_, settings.adapter_hidden, dropout
            )
        else:
            self.adapter = nn.Identity()
        self.head = RegressionHead(dim, n_genes)
        fourier = FourierCoordinates(settings.n_frequencies)
        self.position = nn.Sequential(fourier, _mlp(fourier.dim, width, dim))
        self.fuse = _mlp(dim, width, dim)
        self.gene_encoder = _mlp(n_genes, width, width, dropout)
        self.image_projection = ProjectionHead(dim, settings.projection_dim, dropout)
        self.gene_projection = ProjectionHead(width, settings.projection_dim, dropout)
        self.log_scale = nn.Parameter(torch.tensor(_INITIAL_LOG_SCALE))
        self.correction = _mlp(dim, settings.correction_hidden, n_genes)
        with torch.no_grad():
            self.correction[-1].weight.zero_()
            self.correction[-1].bias.zero_()

    def train_representation_only(self) -> None:
        """Freeze what the representation objective does not train: the correction and unused branches."""
        losses = set(self.settings.losses)
        unused = [self.correction]
        if "regression" not in losses:
            unused.append(self.head)
        if "contrastive" not in losses:
            unused += [self.position, self.fuse, self.image_projection, self.gene_projection]
            if "topology" not in losses:
                unused.append(self.gene_encoder)
        for part in unused:
            part.requires_grad_(False)
        self.log_scale.requires_grad_("contrastive" in losses)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image representation h (= the query q) of a batch."""
        return self.adapter(self.image_input(batch))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """``regression_weight * L_reg + alignment_weight * L_align + topology_weight * L_topo`` of a batch.

        ``batch["coords"]`` are the coordinates normalised per slide (:func:`normalise_coordinates`).
        """
        settings, losses = self.settings, self.settings.losses
        h = self(batch)
        targets = batch["targets"]
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=h.device)
        if "regression" in losses:
            terms["regression"] = regression_loss(self.head(h), targets)
            total = total + settings.regression_weight * terms["regression"]
        if not settings.spatial:
            return LossOutput(total, terms)
        coords, slides = batch["coords"], batch["slide"]
        z = self.gene_encoder(targets)
        if "contrastive" in losses:
            m = self.fuse(h + self.position(coords))
            terms["contrastive"] = info_nce(self.image_projection(m), self.gene_projection(z), self.log_scale)
            total = total + settings.alignment_weight * terms["contrastive"]
        if "topology" in losses:
            terms["topology"] = topology_loss(
                z, coords, slides, knn=settings.knn, hops=settings.hops, decay=settings.hop_decay
            )
            total = total + settings.topology_weight * terms["topology"]
        return LossOutput(total, terms)


class _EstimatePlan(TrainingPlan):
    """CHRep's representation plan: early stopping on what inference uses, the Estimate module's ``L_reg``.

    Before every validation pass the fit spots are embedded with the current encoder (evaluation
    mode) and become the gallery; each validation batch is scored by ``L_reg`` of its estimate
    retrieved from that gallery (computed on the CPU, as inference does).
    """

    def __init__(self, network: _CHRepNetwork, fit_spots: SpotSet, config: TrainConfig) -> None:
        super().__init__(network, lr=config.lr, weight_decay=config.weight_decay)
        self.fit_spots = fit_spots
        self.batch_size = config.batch_size
        self.gallery: Gallery | None = None

    def on_validation_epoch_start(self) -> None:
        """Embed the fit spots with the current encoder: the gallery of this validation pass."""
        keys = predict_batches(self.network, self.fit_spots, batch_size=self.batch_size, device=self.device)
        settings = self.network.settings
        self.gallery = Gallery(
            keys,
            self.fit_spots.targets,
            top_k=settings.top_k,
            weighting="softmax",
            temperature=settings.estimate_temperature,
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """``L_reg`` of the batch's estimate."""
        queries = self.network(batch).float().cpu().numpy()
        estimate = torch.from_numpy(self.gallery.predict(queries, device=self.device))
        self.accumulate(
            VALIDATION_METRIC, regression_loss(estimate, batch["targets"].float().cpu()), len(queries)
        )


class _Correction(SpotNetwork):
    """CHRep's correction module as the engine trains it: features ``[q, estimate]`` (or ``q``) to expression.

    Training loss ``L_reg(y_est + r, y) + penalty * mean(r^2)`` (terms ``regression`` and
    ``magnitude``); validation metric ``L_reg(y_est + r, y)``.
    """

    def __init__(
        self, correction: nn.Module, dim: int, *, with_estimate: bool, penalty: float | None
    ) -> None:
        super().__init__()
        self.correction, self.dim = correction, dim
        self.with_estimate, self.penalty = with_estimate, penalty

    def residual_and_prediction(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        features = batch["features"]
        residual = self.correction(features[:, : self.dim])
        return residual, (features[:, self.dim :] + residual if self.with_estimate else residual)

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        residual, prediction = self.residual_and_prediction(batch)
        regression = regression_loss(prediction, batch["targets"])
        if self.penalty is None:
            return LossOutput(regression)
        magnitude = (residual.float() ** 2).mean()
        return LossOutput(
            regression + self.penalty * magnitude, {"regression": regression, "magnitude": magnitude}
        )

    def validation_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return regression_loss(self.residual_and_prediction(batch)[1], batch["targets"])


def _validation_rows(n: int, batch_size: int, seed: int) -> np.ndarray:
    """A fixed shuffle of the validation spots, so that the correlation term of each batch spans the slide.

    The last spot is left out when it would form a batch of its own (a correlation needs two spots).
    """
    rows = np.random.default_rng([seed, 2]).permutation(n)
    return rows[:-1] if n > 1 and n % batch_size == 1 else rows


@register_method
class CHRepMethod(TorchMethod):
    """``method="chrep"``: structure-aware representation learning, then post-hoc calibration (CHRep).

    **Training phase** (representation). The image encoder f gives h = f(x): end to end the
    encoder itself; in the frozen and adapted regimes a residual adapter (``chrep.ResidualAdapter``) on the cached features,
    h = features + MLP(standardised features), starting as the identity. The objective is
    ``L = regression_weight * L_reg + alignment_weight * L_align + topology_weight * L_topo``
    over the terms named in ``losses``:

    - ``"regression"``: a linear head g(h) = y_hat with
      :func:`~histo2expr.models.losses.regression_loss` (MSE + MAE + 1 - mean gene-wise PCC
      across the batch).
    - ``"contrastive"``: the coordinates, normalised per slide to [0, 1] along the longer side
      (``chrep.normalise_coordinates``), become Fourier features (``n_frequencies``) and an MLP
      gives p; m = MLP(h + p) is the coordinate-guided morphology representation; a gene
      encoder (MLP) gives z = e(y); m and z go through projection heads and
      :func:`~histo2expr.models.losses.info_nce` (symmetric, learnable logit scale starting at
      1 / 0.07, clamped at 100).
    - ``"topology"``: :func:`~histo2expr.models.losses.topology_loss` between z and the prior of
      the exactly-k-hop neighbourhoods of a kNN graph (``knn``) on the batch's coordinates,
      k = 1..``hops``, weights ``hop_decay^(k-1)``, same-slide pairs only. Without
      ``"contrastive"`` it only shapes z, which inference does not use (the paper's
      "topology + regression" ablation). With ``"regression"`` off the head is not trained
      (it is dropped at inference anyway).

    With ``"topology"`` the batches are spatially coherent (``chrep.neighbourhood_batches``):
    neighbourhoods of ``neighbourhood_size`` spots of one slide around random seeds, several
    per batch of ``batch_size`` spots, a new partition every epoch, drawn from (seed, epoch).
    Otherwise batches are shuffled as usual.

    **Early stopping** (**Decision**): the training objective is not what inference uses, so
    after every epoch the validation spots are scored by the quantity inference relies on —
    ``L_reg`` of their Estimate-module prediction retrieved from the fit spots with the current
    encoder (the fit spots' queries are recomputed for this, in evaluation mode) — and the
    best epoch is kept. If no epoch beats the untrained encoder (the backbone's own features
    in the frozen regime) on this score, the untrained weights are restored
    (``report.notes["representation_kept"]``).

    **Inference phase** (calibration), encoder frozen, regression head dropped. The query of a
    spot is q = h (no projection). The Estimate module retrieves the ``top_k`` gallery spots
    most cosine-similar to q and averages their standardised expression with weights
    ``softmax(similarity / estimate_temperature)``. The Correction module is an MLP
    (``correction_hidden`` units) on q giving a residual r; the prediction is ``y_est + r``.
    It is trained with the encoder frozen, and chosen on the validation spots:

    1. q of the fit and validation spots. Estimates of the fit spots are retrieved from the fit
       spots, a spot never retrieving itself and, with ``exclude_own_slide`` (default), no spot
       of its own slide either — as a held-out slide never finds itself in the gallery (when
       the fit spots are all of one slide this is impossible and only the spot itself is
       excluded; ``report.notes["correction"]["own_slide_excluded"]`` says which). Estimates of
       the validation spots are retrieved from the fit spots.
    2. The correction's last layer starts at zero (r = 0). Its loss on the fit spots is
       ``L_reg(y_est + r, y) + correction_penalty * mean(r^2)``; after every epoch the
       validation loss ``L_reg(y_est + r, y)`` is measured and the best epoch kept (the
       ``TrainConfig``'s ``epochs``, ``patience`` and ``lr``).
    3. If the best validation loss is not lower than that of the estimate alone (r = 0,
       "epoch 0"), the correction is set back to zero: it is only kept when it helps on a
       training slide it was not fitted on (``report.notes["correction"]["kept"]``). Without
       validation spots the last epoch is kept.
    4. The gallery for prediction is the q and standardised expression of *all* spots given to
       :meth:`fit` (fit and validation spots — never a spot of a held-out slide).

    Parameters
    ----------
    encoder
        End-to-end regime: an encoder name (``"efficientnet_lite0"`` by default, any timm name)
        or a :class:`torch.nn.Module` (copied). Ignored in the frozen regime.
    weights
        Initial encoder weights, see :func:`~histo2expr.models.encoders.build_encoder`. Ignored
        in the frozen regime.
    losses
        Representation terms, a non-empty subset of ``("regression", "contrastive",
        "topology")``; default all three (the paper's full objective).
    calibration
        ``"estimate+correction+constraint"`` (default, the paper's full calibration),
        ``"estimate+correction"`` (no magnitude penalty), ``"estimate"`` (retrieval only) or
        ``"correction"`` (the MLP predicts y from q directly with ``L_reg``, no penalty; it too
        falls back to zero — the training mean — unless it beats that on the validation spots).
    regression_weight, alignment_weight, topology_weight
        Weights of the three terms; 1 each, as the paper's objective sums them.
    embedding_dim
        Width of the gene encoder and of z, and of the hidden layers of the coordinate and
        fusion MLPs (256).
    adapter_hidden
        Frozen regime: hidden units of the residual adapter (256: a few hundred training spots
        per slide do not support more).
    projection_dim
        Length of the projected, normalised embeddings of the contrastive loss (128).
    dropout
        Dropout of the adapter, gene encoder and projection heads (0.1, BLEEP's).
    n_frequencies
        Fourier frequencies per axis of the coordinate branch (6: wavelengths from twice the
        slide down to 1/16 of it, a few spots on a typical slide).
    knn
        Neighbours per spot of the topology prior's kNN graph (4: the direct neighbours on a
        square ST grid; on a hexagonal Visium grid 4 of the 6, the symmetric graph adds most of
        the others).
    hops, hop_decay
        ``K`` hops, weights ``beta_k = hop_decay^(k-1)`` (2 and 0.5: a neighbourhood of 8 spots
        is about two hops across).
    neighbourhood_size
        Spots per spatially coherent neighbourhood; more than ``knn``, at most the batch size
        (8: on her2st, neighbourhoods of 16 made batches too uniform for the contrastive and
        correlation terms, PCC(ACG) 0.194 against 0.203 with 8).
    top_k
        Gallery spots retrieved by the Estimate module (50, as BLEEP).
    estimate_temperature
        ``tau_e`` of the softmax over the top-k cosine similarities (0.1: on her2st's frozen
        features 0.1 beat the plain mean and 0.05; 0.02 was much worse).
    correction_hidden
        Hidden units of the correction MLP (64: small, it corrects structured residuals).
    correction_penalty
        ``lambda_r`` of the magnitude constraint (1; only with ``"...+constraint"``).
    exclude_own_slide
        While the correction trains, a fit spot never retrieves spots of its own slide (True).
    gallery_index
        Index of the gallery the fitted model predicts with: ``"exact"`` (default) or ``"ivf"``,
        the approximate index of :class:`~histo2expr.models.Gallery` for galleries of millions of
        spots (needs faiss). Fitting (validation and the correction's estimates) is always exact.

    Notes
    -----
    :meth:`embed` returns q = h, the image representation after the training phase (the
    retrieval query), e.g. for ``sc.pp.neighbors(adata, use_rep=...)``. ``report.notes`` holds
    the validation losses of the untrained encoder and of the correction and what was kept.
    """

    name = "chrep"
    settings_class = CHRepSettings
    default_patience = 3  # benchmarks/results/her2st_patience.md
    settings: CHRepSettings

    def __init__(self, settings: CHRepSettings | None = None, /, **params: Any) -> None:
        super().__init__(settings, **params)
        #: The gallery of the Estimate module, q and standardised expression of the spots fitted on (`None` before fitting).
        self.gallery: Gallery | None = None

    @property
    def uses_coordinates(self) -> bool:
        """Whether the representation objective reads the coordinates (``"contrastive"`` or ``"topology"``)."""
        return self.settings.spatial

    def build(self, image_input: ImageInput, n_genes: int) -> _CHRepNetwork:
        """All trainable parts of CHRep (random weights, correction at zero)."""
        return _CHRepNetwork(image_input, n_genes, self.settings)

    # --- training phase ------------------------------------------------------------------------------

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Learn the representation, then the calibration; the gallery is every spot given here."""
        if validation is not None and len(validation) == 0:
            validation = None
        config = config.for_method(self)  # both phases early-stop with the method's patience
        self._check_fit(train, validation, config)
        network = self.start_fit(train, validation, config)
        network.train_representation_only()
        self.report = self._train_representation(network, train, validation, config)
        network.requires_grad_(False)
        network.eval()
        queries = self.embed(train)
        val_queries = None if validation is None else self.embed(validation)
        if self.settings.calibration != "estimate":
            self.report.notes["correction"] = self._train_correction(
                network, (train, queries), None if validation is None else (validation, val_queries), config
            )
        parts = [(train, queries)] + ([] if validation is None else [(validation, val_queries)])
        self.gallery = Gallery(
            np.concatenate([q for _, q in parts]),
            np.concatenate([np.asarray(s.targets, dtype=np.float32) for s, _ in parts]),
            top_k=self.settings.top_k,
            weighting="softmax",
            temperature=self.settings.estimate_temperature,
            index=self.settings.gallery_index,
        )
        return self.report

    def _check_fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> None:
        size, top_k = self.settings.neighbourhood_size, self.settings.top_k
        if "topology" in self.settings.losses and size > config.batch_size:
            msg = (
                f"`neighbourhood_size={size}` exceeds the batch size {config.batch_size}: a batch holds "
                "whole neighbourhoods. Raise batch_size or lower neighbourhood_size."
            )
            raise ValueError(msg)
        n_gallery = len(train) + (0 if validation is None else len(validation))
        if top_k > n_gallery:
            msg = (
                f"`top_k={top_k}` exceeds the {n_gallery} training and validation spots that form the "
                f"retrieval gallery; lower `top_k` to at most {n_gallery}."
            )
            raise ValueError(msg)
        if (validation is not None or self.settings.calibration != "estimate") and top_k >= len(train):
            msg = (
                f"`top_k={top_k}` must be smaller than the {len(train)} fit spots: validation spots and, while "
                "the correction trains, fit spots (never themselves) retrieve from them. Lower `top_k`."
            )
            raise ValueError(msg)
        if self.settings.spatial:
            normalise_coordinates(train.coords, train.groups)  # only the fit spots' coordinates are used

    def _train_representation(
        self, network: _CHRepNetwork, train: SpotSet, validation: SpotSet | None, config: TrainConfig
    ) -> FitReport:
        """Train f and the training-phase branches; keep the encoder whose estimate is best on validation."""
        settings = self.settings
        ready_train = network.image_input.prepare(train)
        if settings.spatial:
            ready_train = dataclasses.replace(
                ready_train, coords=normalise_coordinates(train.coords, train.groups)
            )
        order = None
        if "topology" in settings.losses:
            order = partial(
                neighbourhood_batches,
                train.coords,
                train.groups,
                size=settings.neighbourhood_size,
                batch_size=config.batch_size,
                seed=config.seed,
            )
        ready_validation = None
        if validation is not None:
            rows = _validation_rows(len(validation), config.batch_size, config.seed)
            ready_validation = network.image_input.prepare(validation.subset(rows))
        report, device = train_network(
            network,
            ready_train,
            ready_validation,
            config,
            plan=_EstimatePlan(network, ready_train, config),
            train_batches=order,
            validate_untrained=True,
        )
        self.adopt_device(device)
        if validation is not None:
            report.notes["representation_kept"] = report.best_epoch is not None
        return report

    # --- inference phase -----------------------------------------------------------------------------

    def _estimates(
        self, queries: np.ndarray, gallery: np.ndarray, values: np.ndarray, **exclude: Any
    ) -> np.ndarray:
        """The Estimate module's prediction of ``queries`` from a gallery of ``(gallery, values)``."""
        estimate = Gallery(
            gallery,
            values,
            top_k=self.settings.top_k,
            weighting="softmax",
            temperature=self.settings.estimate_temperature,
        )
        return estimate.predict(queries, device=self.device, **exclude)

    def _train_correction(
        self,
        network: _CHRepNetwork,
        fit: tuple[SpotSet, np.ndarray],
        validation: tuple[SpotSet, np.ndarray] | None,
        config: TrainConfig,
    ) -> dict[str, Any]:
        """Train the correction on the fit spots, choose it on the validation spots (see the class docstring)."""
        settings = self.settings
        with_estimate = settings.calibration != "correction"
        constrained = settings.calibration == "estimate+correction+constraint"
        spots, queries = fit
        targets = np.asarray(spots.targets, dtype=np.float32)
        own_slide = (
            with_estimate and settings.exclude_own_slide and len(set(np.asarray(spots.groups).tolist())) > 1
        )
        notes: dict[str, Any] = {"own_slide_excluded": own_slide}

        def inputs(q: np.ndarray, estimate: np.ndarray | None, s: SpotSet) -> SpotSet:
            features = q if estimate is None else np.concatenate([q, estimate], axis=1)
            return SpotSet(coords=s.coords, groups=s.groups, features=features, targets=s.targets)

        fit_estimate = val_estimate = None
        if with_estimate:
            exclude: dict[str, Any] = {"exclude_self": True}
            if own_slide:
                exclude.update(query_groups=spots.groups, gallery_groups=spots.groups)
                eligible = len(spots) - max(np.unique(np.asarray(spots.groups), return_counts=True)[1])
                if eligible < settings.top_k:
                    msg = (
                        f"`top_k={settings.top_k}` exceeds the {eligible} fit spots outside the largest "
                        "slide, which is all a spot of that slide may retrieve while the correction trains; "
                        "lower `top_k` or pass exclude_own_slide=False."
                    )
                    raise ValueError(msg)
            fit_estimate = self._estimates(queries, queries, targets, **exclude)
            if validation is not None:
                val_estimate = self._estimates(validation[1], queries, targets)
        train_set = inputs(queries, fit_estimate, spots)
        val_set = None if validation is None else inputs(validation[1], val_estimate, validation[0])
        if val_set is not None:
            val_set = val_set.subset(_validation_rows(len(val_set), config.batch_size, config.seed))
        correction = _Correction(
            network.correction,
            queries.shape[1],
            with_estimate=with_estimate,
            penalty=settings.correction_penalty if constrained else None,
        )
        network.correction.requires_grad_(True)
        report, _ = train_network(correction, train_set, val_set, config, validate_untrained=True)
        network.correction.requires_grad_(False)
        network.correction.to(self.device).eval()
        notes.update(train_loss=report.train_loss, validation_loss=report.validation_loss)
        notes["best_epoch"] = report.best_epoch
        notes["kept"] = val_set is None or report.best_epoch is not None
        if val_set is not None:
            notes["zero_correction_loss"] = report.notes["untrained_validation_loss"]
        return notes

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, d)`` q = h, the frozen image representation (the retrieval query)."""
        network, data = self.fitted(data)
        return self.run(network, data)

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` calibrated standardised expression: estimate from the gallery plus correction."""
        queries = self.embed(data)
        calibration = self.settings.calibration
        prediction = np.zeros((len(queries), self.n_genes), dtype=np.float32)
        if calibration != "correction":
            prediction += self.gallery.predict(queries, device=self.device)
        if calibration != "estimate":
            correction = self.network.correction
            with torch.no_grad():
                prediction += np.concatenate(
                    [
                        correction(chunk.to(self.device)).float().cpu().numpy()
                        for chunk in torch.from_numpy(queries).split(4096)
                    ]
                )
        return prediction

    def confidence(self, data: SpotSet, *, embedding: np.ndarray | None = None) -> np.ndarray:
        """``(n,)`` mean cosine similarity of each spot's query q to the ``top_k`` gallery queries it retrieves."""
        queries = self.embed(data) if embedding is None else embedding
        return self.gallery.confidence(queries, device=self.device)

    def extra_state(self) -> dict[str, Any]:
        """The gallery: q and standardised expression of the spots fitted on."""
        return {"gallery": self.gallery.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the gallery."""
        self.gallery = Gallery.from_state_dict(state["gallery"])
