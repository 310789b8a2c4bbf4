"""Building blocks shared by the torch methods: heads, the image input of either regime, a method base class.

- :class:`ProjectionHead`: BLEEP's projection head (also CMRCNet's).
- :class:`RegressionHead`: a linear layer to the genes, optionally after one hidden layer.
- :class:`ImageInput`: where a method's image side starts — the features of a trainable
  :class:`~histo2expr.models.encoders.Encoder` (end-to-end regime), the cached frozen
  features standardised with statistics of the training spots (frozen regime), or the trainable
  top blocks of the encoder on cached activations of its lower blocks (adapted regime) — and how
  that is saved and rebuilt.
- :class:`TorchMethod`: the plumbing of a method built on an :class:`ImageInput` — fit
  preliminaries, the device and batches of inference, the state dict and its reload.
- :func:`dihedral_mean`: the average of a function over the eight flips / rotations of a
  batch of patches (test-time augmentation).
- :func:`pool_token_grid`: image tokens average-pooled to a smaller square grid.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import non_negative_number, positive_int
from .adapted import TopBlocks, adapted_encoder
from .base import (
    FitReport,
    Method,
    MethodSettings,
    SpotSet,
    TrainConfig,
    check_state_format,
    check_training_spots,
)
from .encoders import Encoder, build_encoder
from .inference import predict_batches
from .scaling import Standardizer
from .training import SpotNetwork, seed_everything, train_network


class ProjectionHead(nn.Module):
    """BLEEP's projection head: Linear, GELU, Linear, Dropout, residual, LayerNorm.

    ``h = W1 x``; ``out = LayerNorm(h + Dropout(W2 GELU(h)))`` — the residual adds the
    output of the first linear layer, as in BLEEP and CMRCNet (docs/methods/baselines.md).

    Parameters
    ----------
    in_dim
        Length of the input vectors.
    out_dim
        Length of the projected embeddings.
    dropout
        Dropout probability before the residual sum.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.activation = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        projected = self.projection(x)
        return self.norm(projected + self.dropout(self.fc(self.activation(projected))))


class RegressionHead(nn.Module):
    """Features to genes: Dropout and Linear, or Linear, GELU, Dropout and Linear with a hidden layer.

    Parameters
    ----------
    in_dim
        Length of the input features.
    out_dim
        Number of genes.
    hidden
        Width of one hidden layer; `None` for a linear head.
    dropout
        Dropout probability before the last linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden is not None:
            layers += [nn.Linear(in_dim, hidden), nn.GELU()]
            in_dim = hidden
        layers += [nn.Dropout(dropout), nn.Linear(in_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        return self.layers(x)


def dihedral_mean(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Average ``fn`` over the eight flips / quarter-turn rotations of ``(B, 3, H, W)`` images.

    Uses :func:`~histo2expr.patches.dihedral_views`; the first view is the images themselves.
    The average is taken in float32 (outputs of a mixed-precision forward are cast first).
    """
    from ..patches import dihedral_views

    outputs = [fn(view).float() for view in dihedral_views(images)]
    return torch.stack(outputs).mean(dim=0)


@dataclass(frozen=True, kw_only=True)
class EncoderSettings(MethodSettings):
    """Settings of a method built on an :class:`ImageInput`: its encoder in the end-to-end regime.

    Attributes
    ----------
    encoder
        End-to-end regime: an encoder name (``"efficientnet_lite0"``, the offline ImageNet
        EfficientNet-Lite0; any timm name) or a :class:`torch.nn.Module` returning ``(B, D)``
        features (copied, never trained in place). Adapted regime: the encoder whose lower blocks'
        activations :func:`~histo2expr.tl.fit_histo2expr` caches (a timm EfficientNet); its top
        blocks train. Ignored in the frozen regime.
    weights
        Initial encoder weights (``"default"``, ``"imagenet"``, `None`, a path or a state dict),
        see :func:`~histo2expr.models.build_encoder`. Ignored in the frozen regime.
    ensemble
        Members of the fitted model (1: a single network).
        :func:`~histo2expr.tl.fit_histo2expr` fits that many copies of the method on the same
        training slides, each with its own seed and its own inner validation slide(s) for early stopping,
        and predicts their mean (:class:`~histo2expr.models.Ensemble`); time and memory grow K-fold
        in every regime.
    """

    # Spelled with names every method module has: a dataclass's ``__init__`` is annotated in the
    # module of the subclass, where the documentation resolves these hints.
    encoder: str | torch.nn.Module = "efficientnet_lite0"
    weights: object = "default"
    ensemble: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "ensemble", positive_int(self.ensemble, "ensemble"))
        average_epochs = getattr(self, "average_epochs", None)  # a method's engine option (training_options)
        if average_epochs is not None:
            value = non_negative_number(average_epochs, "average_epochs", positive=True)
            object.__setattr__(self, "average_epochs", value)
        if not isinstance(self.encoder, str | nn.Module):
            msg = (
                "`encoder` must be an encoder name (e.g. 'efficientnet_lite0', 'resnet18') or a torch.nn.Module, "
                f"got {type(self.encoder).__name__}."
            )
            raise TypeError(msg)

    def plain(self) -> dict[str, Any]:
        """Plain values: an encoder module by its class name, weights given as a mapping as ``"state_dict"``.

        A rebuilt method loads its trained weights from the state dict, not from these.
        """
        weights = self.weights
        if weights is not None and not isinstance(weights, str):
            weights = "state_dict" if isinstance(weights, Mapping) else str(weights)
        encoder = self.encoder if isinstance(self.encoder, str) else type(self.encoder).__name__
        return {**super().plain(), "encoder": encoder, "weights": weights}


def pool_token_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Average-pool ``(B, N, C)`` tokens of a square ``s x s`` grid (row-major) to ``side x side`` tokens.

    The grid is pooled with :func:`torch.nn.functional.adaptive_avg_pool2d` (bins may overlap
    when ``s`` is not a multiple of ``side``), e.g. a 7 x 7 CNN feature map or 14 x 14 ViT patch
    tokens to 3 x 3 tokens.

    Parameters
    ----------
    tokens
        ``(B, N, C)`` tokens with ``N = s * s``, as :meth:`~histo2expr.models.Encoder.forward_tokens`
        returns them.
    side
        Side of the pooled grid, ``1 <= side <= s``.

    Returns
    -------
    ``(B, side * side, C)`` tokens.
    """
    grid = math.isqrt(tokens.shape[1])
    if tokens.ndim != 3 or grid * grid != tokens.shape[1]:
        msg = (
            f"Tokens of shape {tuple(tokens.shape)} are not a square grid of tokens; pooling them to a "
            "grid needs (batch, s * s, channels) tokens (a CNN feature map, or ViT patch tokens of a square image)."
        )
        raise ValueError(msg)
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= grid:
        msg = (
            f"The token grid side must be an integer between 1 and the encoder's own grid side {grid}, "
            f"got {side!r}; pick a smaller grid (or larger patches)."
        )
        raise ValueError(msg)
    maps = tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], grid, grid)
    return torch.nn.functional.adaptive_avg_pool2d(maps, side).flatten(2).transpose(1, 2)


def _view_mean(top: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """``top`` of ``(B, C, h, w)`` activations, or its mean over the views of ``(B, V, C, h, w)`` ones."""
    if activations.ndim == 4:
        return top(activations)
    batch, views = activations.shape[:2]
    return top(activations.flatten(0, 1)).unflatten(0, (batch, views)).mean(dim=1)


class ImageInput(nn.Module):
    """The image side of a torch method, in either regime: one feature vector (or a few tokens) per spot.

    - End-to-end: an :class:`~histo2expr.models.encoders.Encoder`, trained with the method,
      applied to ``batch["image"]`` (uint8 patches; the encoder normalises them).
    - Frozen: ``batch["features"]`` as it comes — the cached features are standardised
      beforehand by :meth:`prepare` with a :class:`~histo2expr.models.scaling.Standardizer`
      fitted on the training spots (scale floored at a tenth of the median feature scale and
      values clipped to ±10, so a near-constant feature cannot explode on another slide).
      Token features ``(n, t, d)`` are standardised per feature with statistics over all
      tokens of all training spots.

    :meth:`forward` gives one vector per spot; :meth:`tokens` gives the tokens of methods that
    take them (``Method.token_input``): the frozen tokens, or the encoder's
    :meth:`~histo2expr.models.encoders.Encoder.forward_tokens` end to end (the encoder's pooled
    features as a single token when its backbone has no ``forward_features``).

    - Adapted: the encoder's :class:`~histo2expr.models.TopBlocks`, trained with the
      method, on ``batch["activations"]`` (one cached view per spot in training; the mean of the
      features of the ``tta`` inference views otherwise), followed by the optional frozen
      ``batch["features"]``; the vector is standardised in the network with statistics of the
      training spots under the untrained top blocks, so training starts from the frozen regime's
      standardised features.

    Make one with :meth:`fit` (training) or :meth:`from_state` (loading).

    Parameters
    ----------
    regime
        ``"frozen"``, ``"end2end"`` or ``"adapted"``.
    dim
        Length of the feature vectors.
    encoder
        The encoder (end-to-end regime).
    scaler
        The fitted feature standardisation (frozen and adapted regimes).
    top
        The trainable top blocks (adapted regime).
    adapted
        Adapted regime: the encoder's description, ``trainable_blocks`` and the cached views
        (:class:`~histo2expr.models.AdaptedViews` as a dict), for the state.
    """

    def __init__(
        self,
        regime: str,
        dim: int,
        *,
        encoder: Encoder | None = None,
        scaler: Standardizer | None = None,
        top: TopBlocks | None = None,
        adapted: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.regime = regime
        self.dim = int(dim)
        self.encoder = encoder
        self.scaler = scaler
        self.top = top
        self.adapted = adapted
        if top is not None:
            self.register_buffer("mean", torch.as_tensor(scaler.mean_, dtype=torch.float32))
            self.register_buffer("scale", torch.as_tensor(scaler.scale_, dtype=torch.float32))

    @classmethod
    def fit(cls, train: SpotSet, *, encoder: str | nn.Module, weights: Any) -> ImageInput:
        """The image input for ``train``'s regime: a new encoder, or the scaling of the training features.

        Parameters
        ----------
        train
            The training spots.
        encoder, weights
            End-to-end regime: passed to :func:`~histo2expr.models.encoders.build_encoder`; a
            module is copied first, so the caller's module is never trained in place. Ignored
            in the frozen regime.
        """
        if train.regime == "frozen":
            dim = train.features.shape[-1]
            scaler = Standardizer().fit(train.features.reshape(-1, dim))
            return cls("frozen", dim, scaler=scaler)
        if train.regime == "adapted":
            return cls._fit_adapted(train)
        if isinstance(encoder, nn.Module):
            encoder = copy.deepcopy(encoder)
        built = build_encoder(encoder, weights=weights)
        return cls("end2end", built.feature_dim, encoder=built)

    def prepare(self, data: SpotSet) -> SpotSet:
        """``data`` ready for :meth:`forward`: frozen features standardised (a new SpotSet), patches as they are."""
        if data.regime != self.regime:
            fix = {
                "frozen": "pass cached features (frozen regime) of the same encoder",
                "end2end": "pass a patch source and indices (end-to-end regime)",
                "adapted": "pass cached activations and indices (adapted regime)",
            }[self.regime]
            msg = f"This method was fitted in the {self.regime!r} regime but got {data.regime!r} data; {fix}, or refit."
            raise ValueError(msg)
        if self.regime == "end2end":
            return data
        if self.regime == "adapted":
            self._check_adapted(data)
            return data
        if data.features.ndim not in (2, 3) or data.features.shape[-1] != self.dim:
            msg = (
                f"The method was fitted on {self.dim} features per spot (or token), got features of shape "
                f"{data.features.shape}; embed the spots with the encoder used for training."
            )
            raise ValueError(msg)
        return dataclasses.replace(data, features=self.scaler.transform(data.features))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, dim)`` features of a batch (``histo2expr.models.batches.SpotBatches``)."""
        if self.top is not None:
            return self._adapted_features(batch)
        if self.encoder is None:
            return batch["features"]
        return self.encoder(batch["image"])

    @property
    def token_dim(self) -> int:
        """Length of the vectors of :meth:`tokens`."""
        if self.encoder is None or not self._encoder_tokens:
            return self.dim
        return int(self.encoder.token_dim)

    @property
    def _encoder_tokens(self) -> bool:
        backbone = self.encoder.backbone
        return hasattr(backbone, "forward_features") and self.encoder.token_dim is not None

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, t, token_dim)`` image tokens of a batch: frozen tokens (2-D features are one token) or the encoder's.

        In the adapted regime the adapted features are one token.
        """
        if self.top is not None:
            return self(batch)[:, None, :]
        if self.encoder is None:
            features = batch["features"]
            return features if features.ndim == 3 else features[:, None, :]
        if self._encoder_tokens:
            return self.encoder.forward_tokens(batch["image"])
        return self.encoder(batch["image"])[:, None, :]

    @classmethod
    def _fit_adapted(cls, train: SpotSet) -> ImageInput:
        """The encoder's top blocks above ``train``'s cached activations, and the standardisation of their features."""
        cache = train.activations
        top = cache.top_blocks().eval()
        side = 0 if train.features is None else train.features.shape[1]
        adapted = {
            "encoder": cache.encoder,
            "trainable_blocks": cache.trainable_blocks,
            "views": cache.views.plain(),
        }
        with torch.no_grad():
            own = predict_batches(
                lambda batch: _view_mean(top, batch["activations"]), train, batch_size=64, device="cpu"
            )
        values = own if train.features is None else np.concatenate([own, train.features], axis=1)
        scaler = Standardizer().fit(values)
        return cls("adapted", top.feature_dim + side, scaler=scaler, top=top, adapted=adapted)

    def _check_adapted(self, data: SpotSet) -> None:
        """Raise when ``data``'s activations or frozen features do not fit this input."""
        cache = data.activations
        trained = self.adapted
        if (
            cache.encoder["weights_sha1"] != trained["encoder"]["weights_sha1"]
            or cache.trainable_blocks != trained["trainable_blocks"]
            or cache.views.tta != trained["views"]["tta"]
        ):
            msg = (
                f"These activations were cached with encoder {cache.encoder['name']!r}, trainable_blocks="
                f"{cache.trainable_blocks}, tta={cache.views.tta}; the method was trained on "
                f"{trained['encoder']['name']!r}, trainable_blocks={trained['trainable_blocks']}, "
                f"tta={trained['views']['tta']}. Cache them as for training."
            )
            raise ValueError(msg)
        side = 0 if data.features is None else data.features.shape[1]
        if side != self.dim - self.top.feature_dim:
            msg = (
                f"The method was trained with {self.dim - self.top.feature_dim} frozen features next to the "
                f"adapted ones, got {side}; pass the same frozen blocks as for training."
            )
            raise ValueError(msg)

    def _adapted_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Standardised ``[top(activations), features]`` of a batch (the mean over the views of an inference batch)."""
        features = _view_mean(self.top, batch["activations"])
        if "features" in batch:
            features = torch.cat([features, batch["features"]], dim=1)
        return ((features - self.mean) / self.scale).clamp(-self.scaler.clip, self.scaler.clip)

    def to_state(self) -> dict[str, Any]:
        """Plain values describing this input (weights are part of the owner's module state)."""
        if self.top is not None:
            return {
                "regime": self.regime,
                "dim": self.dim,
                "scaler": self.scaler.state_dict(),
                **self.adapted,
            }
        if self.encoder is None:
            return {"regime": self.regime, "dim": self.dim, "scaler": self.scaler.state_dict()}
        return {"regime": self.regime, "dim": self.dim, "encoder": self.encoder.describe()}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, encoder: nn.Module | None = None) -> ImageInput:
        """Rebuild the input of :meth:`to_state`, with an encoder of the same architecture (random weights).

        Parameters
        ----------
        state
            From :meth:`to_state`.
        encoder
            Only for an encoder that was a custom module: a module of the same architecture
            (it is copied; its weights are replaced by the saved ones).
        """
        if state["regime"] == "frozen":
            return cls("frozen", state["dim"], scaler=Standardizer.from_state_dict(state["scaler"]))
        if state["regime"] == "adapted":
            adapted = {k: state[k] for k in ("encoder", "trainable_blocks", "views")}
            top = TopBlocks(adapted_encoder(state["encoder"]), int(state["trainable_blocks"]))
            scaler = Standardizer.from_state_dict(state["scaler"])
            return cls("adapted", state["dim"], scaler=scaler, top=top, adapted=adapted)
        description = state["encoder"]
        stats = {"mean": description["mean"], "std": description["std"]}
        if description["timm_name"] is not None:
            built = build_encoder(description["name"], weights=None, **stats)
        elif encoder is None:
            msg = (
                f"This model was trained with a custom encoder module ({description['name']}), which a state "
                "dict cannot rebuild. Pass a module of the same architecture as `encoder=` to from_state_dict; "
                "its weights are replaced by the saved ones."
            )
            raise ValueError(msg)
        else:
            built = build_encoder(
                copy.deepcopy(encoder), weights=None, feature_dim=description["feature_dim"], **stats
            )
        return cls("end2end", state["dim"], encoder=built)


class TorchMethod(Method):
    """Base of the torch methods whose network (a :class:`~histo2expr.models.training.SpotNetwork`) has an ``image_input``.

    Subclasses declare :attr:`settings_class` (an :class:`EncoderSettings`), implement
    :meth:`build` (the network, with random weights, for an image input and a number of
    genes) and :meth:`fit` (starting with :meth:`start_fit`, training with :meth:`fit_network`),
    and extend :meth:`extra_state` / :meth:`load_extra_state` for what inference needs beyond
    the weights (e.g. a retrieval :class:`~histo2expr.models.gallery.Gallery`).

    Attributes
    ----------
    network
        The fitted network (`None` before fitting).
    n_genes
        Number of genes predicted.
    batch_size, num_workers
        The batches of :meth:`predict` / :meth:`embed`: those of the fit's
        :class:`~histo2expr.models.base.TrainConfig`; 64 and 0 after loading a state.
    """

    settings: EncoderSettings
    settings_class = EncoderSettings

    def __init__(self, settings: EncoderSettings | None = None, /, **params: Any) -> None:
        super().__init__(settings, **params)
        self.network: SpotNetwork | None = None
        self.n_genes: int | None = None
        self.batch_size = 64
        self.num_workers = 0

    @abstractmethod
    def build(self, image_input: ImageInput, n_genes: int) -> SpotNetwork:
        """The network on ``image_input`` for ``n_genes`` genes (random weights)."""

    def start_fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> SpotNetwork:
        """Check the spots, take the batches of ``config``, seed, build the network (:attr:`network`)."""
        self.check_regime(train)
        self.n_genes = check_training_spots(train, validation)
        self.batch_size, self.num_workers = config.batch_size, config.num_workers
        seed_everything(config.seed)
        image_input = ImageInput.fit(train, encoder=self.settings.encoder, weights=self.settings.weights)
        self.network = self.build(image_input, self.n_genes)
        return self.network

    def fit_network(
        self,
        network: SpotNetwork,
        train_spots: SpotSet,
        validation: SpotSet | None,
        config: TrainConfig,
        **options: Any,
    ) -> FitReport:
        """Train ``network`` on the spots, prepared for its image input, with :func:`~histo2expr.models.training.train_network`.

        ``options`` are those of :func:`~histo2expr.models.training.train_network`, added to
        :meth:`training_options`. Inference then runs on the device the network trained on.
        """
        prepare = self.network.image_input.prepare
        ready_validation = None if validation is None or len(validation) == 0 else prepare(validation)
        options = {**self.training_options(), **options}
        report, device = train_network(
            network, prepare(train_spots), ready_validation, config.for_method(self), **options
        )
        self.adopt_device(device)
        return report

    def training_options(self) -> dict[str, Any]:
        """Options of :func:`~histo2expr.models.training.train_network` that the settings turn on.

        By default the settings' ``average_epochs`` (the moving average of the weights), when the
        settings have that field and it is not `None`; a method with other engine options overrides this.
        """
        average_epochs = getattr(self.settings, "average_epochs", None)
        return {} if average_epochs is None else {"average_epochs": average_epochs}

    def adopt_device(self, device: torch.device) -> None:
        """Infer on ``device`` (where the network trained, already checked); the network moves there."""
        self.device = device
        self.network.to(device)

    def to(self, device: str | torch.device) -> TorchMethod:
        """Run inference on ``device`` (the network moves there); returns the method."""
        super().to(device)
        if self.network is not None:
            self.network.to(self.device)
        return self

    def fitted(self, data: SpotSet) -> tuple[SpotNetwork, SpotSet]:
        """The network in evaluation mode and ``data`` prepared for it, or a clear error before fitting."""
        if self.network is None:
            msg = f"This {self.name!r} method is not fitted yet; call fit() first (or load a fitted state)."
            raise RuntimeError(msg)
        self.check_regime(data)
        self.network.eval()
        return self.network, self.network.image_input.prepare(data)

    def run(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], data: SpotSet) -> np.ndarray:
        """``forward`` over prepared ``data`` in batches on :attr:`device` (one float32 row per spot)."""
        return predict_batches(
            forward, data, batch_size=self.batch_size, device=self.device, num_workers=self.num_workers
        )

    def extra_state(self) -> dict[str, Any]:
        """What inference needs beyond the weights (plain values and CPU tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        """Settings (as plain values), the image input, all weights (CPU), the fit report and :meth:`extra_state`."""
        if self.network is None:
            msg = f"This {self.name!r} method is not fitted yet; there is no state to save. Call fit() first."
            raise RuntimeError(msg)
        return {
            "settings": self.settings.plain(),
            "n_genes": self.n_genes,
            "image_input": self.network.image_input.to_state(),
            "network": cpu_state(self.network),
            "batch_size": self.batch_size,
            "report": None if self.report is None else dataclasses.asdict(self.report),
            **self.extra_state(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, encoder: nn.Module | None = None) -> TorchMethod:
        """Rebuild on the CPU from :meth:`state_dict`.

        Parameters
        ----------
        state
            From :meth:`state_dict` (e.g. after ``torch.load(path, weights_only=True)``).
        encoder
            Only when the encoder was a custom module, which a state dict cannot rebuild: a
            module of the same architecture (copied; its weights are replaced by the saved ones).
        """
        check_state_format(state, cls.name)
        # a state saved before the `ensemble` setting is one network, whatever the default is now
        method = cls(cls.settings_class(**{"ensemble": 1, **state["settings"]}))
        image_input = ImageInput.from_state(state["image_input"], encoder=encoder)
        method.n_genes = int(state["n_genes"])
        method.network = method.build(image_input, method.n_genes)
        method.network.load_state_dict(state["network"])
        method.network.eval()
        method.batch_size = int(state["batch_size"])
        method.report = None if state["report"] is None else FitReport(**state["report"])
        method.load_extra_state(state)
        return method


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict on the CPU (independent of later training)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}
