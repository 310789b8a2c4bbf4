"""BLEEP-style contrastive retrieval: images and expression projected into one space, top-k mean at inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import non_negative_number, one_of, positive_int, probability
from .base import FitReport, SpotSet, TrainConfig, register_method
from .gallery import GALLERY_INDEXES, Gallery
from .layers import EncoderSettings, ImageInput, ProjectionHead, TorchMethod
from .losses import bleep_loss
from .training import VALIDATION_METRIC, LossOutput, SpotNetwork, TrainingPlan, correlation_moments

#: Expression rows projected at a time when the gallery is built.
_GALLERY_CHUNK = 4096
#: What chooses the epoch on the inner validation spots: ``early_stopping`` of the retrieval methods.
EARLY_STOPPING = ("loss", "pcc")


@dataclass(frozen=True, kw_only=True)
class BLEEPSettings(EncoderSettings):
    """Settings of :class:`BLEEPMethod` (see its parameters)."""

    projection_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    top_k: int = 50
    gallery_index: str = "exact"
    early_stopping: str = "loss"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.gallery_index, GALLERY_INDEXES, "gallery_index")
        one_of(self.early_stopping, EARLY_STOPPING, "early_stopping")
        object.__setattr__(self, "projection_dim", positive_int(self.projection_dim, "projection_dim"))
        object.__setattr__(self, "dropout", probability(self.dropout, "dropout"))
        object.__setattr__(
            self, "temperature", non_negative_number(self.temperature, "temperature", positive=True)
        )
        object.__setattr__(self, "top_k", positive_int(self.top_k, "top_k"))


class RetrievalNetwork(SpotNetwork):
    """A network that predicts by retrieval: ``forward`` gives the image queries, ``gene_head`` the gallery keys.

    Subclasses set ``image_input``, ``image_head`` and ``gene_head`` and implement ``forward`` and ``loss``.
    """

    gene_head: nn.Module

    def gallery_keys(self, expression: np.ndarray, device: torch.device) -> torch.Tensor:
        """``(n, dim)`` float32 CPU keys of standardised expression rows, projected ``_GALLERY_CHUNK`` rows at a time."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.gene_head(chunk.to(device)).float().cpu()
                    for chunk in torch.from_numpy(np.asarray(expression, dtype=np.float32)).split(
                        _GALLERY_CHUNK
                    )
                ]
            )


class RetrievalValidation(TrainingPlan):
    """Early stopping on what a retrieval method predicts (``early_stopping="pcc"``).

    Before every validation pass the expression of the *fit* spots (the training spots without the
    validation spots) is projected with the current weights (the averaged ones under ``average_epochs``)
    into a :class:`~histo2expr.models.Gallery`; each validation spot's image query retrieves its
    ``top_k`` nearest keys, and the validation metric is one minus the mean gene-wise PCC of those
    predictions with the validation spots' expression (the engine's ``validation_metric="pcc"``). No
    validation spot's expression enters the gallery.

    Parameters
    ----------
    network
        The retrieval network trained.
    fit_targets
        ``(n, n_genes)`` standardised expression of the fit spots: the validation gallery's values.
    top_k
        Gallery spots averaged per prediction (at most the number of fit spots).
    config
        AdamW's ``lr`` and ``weight_decay``.
    """

    def __init__(
        self, network: RetrievalNetwork, fit_targets: np.ndarray, top_k: int, config: TrainConfig
    ) -> None:
        super().__init__(network, lr=config.lr, weight_decay=config.weight_decay)
        network.validation_metric = "pcc"
        self.fit_targets = np.asarray(fit_targets, dtype=np.float32)
        self.top_k = min(top_k, len(self.fit_targets))
        self.gallery: Gallery | None = None

    def on_validation_epoch_start(self) -> None:
        """The fit spots' expression projected with the current weights: the gallery of this validation pass."""
        self.gallery = Gallery(
            self.network.gallery_keys(self.fit_targets, self.device), self.fit_targets, top_k=self.top_k
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """The correlation moments of the batch's retrieved predictions with its expression."""
        queries = self.network(batch).float().cpu()
        predicted = torch.from_numpy(self.gallery.predict(queries, device=self.device))
        moments = correlation_moments(predicted, batch["targets"].cpu())
        self.add_sum(VALIDATION_METRIC, moments, len(queries))


class _BLEEPNetwork(RetrievalNetwork):
    """Image input with its projection head, and the expression projection head; BLEEP's loss."""

    def __init__(
        self,
        image_input: ImageInput,
        image_head: ProjectionHead,
        gene_head: ProjectionHead,
        temperature: float,
    ) -> None:
        super().__init__()
        self.image_input = image_input
        self.image_head = image_head
        self.gene_head = gene_head
        self.temperature = temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected image embeddings of a batch."""
        return self.image_head(self.image_input(batch))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """:func:`~histo2expr.models.losses.bleep_loss` of the two projections of the batch."""
        return LossOutput(bleep_loss(self(batch), self.gene_head(batch["targets"]), self.temperature))


@register_method
class BLEEPMethod(TorchMethod):
    """``method="bleep"``: BLEEP-style contrastive learning of images and expression, then retrieval.

    Training: the image features (encoder features end to end, or the frozen features
    standardised with statistics of the training spots) and the standardised expression of
    each spot go through two projection heads (Linear, GELU, Linear, Dropout, residual,
    LayerNorm) to ``projection_dim``, trained with :func:`~histo2expr.models.losses.bleep_loss`;
    early stopping on the validation spots (``early_stopping``).

    Inference: the gallery is the projected expression of *all* spots passed to :meth:`fit`
    (training and validation spots — training slides only) with their standardised
    expression; a spot's image embedding retrieves the ``top_k`` most cosine-similar gallery
    embeddings (:func:`~histo2expr.models.retrieval.cosine_topk`) and its prediction is the
    plain mean of their expression (:func:`~histo2expr.models.retrieval.aggregate`).

    Parameters
    ----------
    encoder
        End-to-end regime: an encoder name (``"efficientnet_lite0"`` by default; BLEEP used
        ``"resnet50"``) or a :class:`torch.nn.Module` (copied). Ignored in the frozen regime.
    weights
        Initial encoder weights, see :func:`~histo2expr.models.encoders.build_encoder`.
        Ignored in the frozen regime.
    projection_dim
        Dimension of the shared embedding space (BLEEP: 256).
    dropout
        Dropout of the projection heads (BLEEP: 0.1).
    temperature
        ``τ`` of the loss (BLEEP: 1.0).
    top_k
        Gallery spots averaged per prediction (BLEEP: 50); at most the number of spots fitted on.
    gallery_index
        ``"exact"`` (default) or ``"ivf"``: the approximate index of
        :class:`~histo2expr.models.Gallery`, for galleries of millions of spots (needs faiss).
    early_stopping
        What chooses the epoch on the inner validation spots: ``"loss"`` (default), the training loss;
        ``"pcc"``, the mean gene-wise PCC of what inference predicts — the validation spots' retrieval
        from a gallery of the fit spots (the training spots without the validation spots), rebuilt with
        the current weights before every validation pass (``models.bleep.RetrievalValidation``).

    Notes
    -----
    :meth:`embed` returns the projected image embedding, the query of the retrieval.
    """

    name = "bleep"
    settings_class = BLEEPSettings
    default_patience = 3  # benchmarks/results/her2st_patience.md
    settings: BLEEPSettings

    def __init__(self, settings: BLEEPSettings | None = None, /, **params: Any) -> None:
        super().__init__(settings, **params)
        #: The retrieval gallery (`None` before fitting).
        self.gallery: Gallery | None = None

    def build(self, image_input: ImageInput, n_genes: int) -> _BLEEPNetwork:
        """The image input with its projection head, and the expression projection head."""
        dim, dropout = self.settings.projection_dim, self.settings.dropout
        return _BLEEPNetwork(
            image_input,
            ProjectionHead(image_input.dim, dim, dropout),
            ProjectionHead(n_genes, dim, dropout),
            self.settings.temperature,
        )

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Train both projection heads (and the encoder, end to end); build the gallery of all fitted spots."""
        parts = [train] if validation is None or len(validation) == 0 else [train, validation]
        expression = np.concatenate([np.asarray(p.targets, dtype=np.float32) for p in parts])
        if self.settings.top_k > len(expression):
            msg = (
                f"`top_k={self.settings.top_k}` exceeds the {len(expression)} training and validation spots "
                f"that form the retrieval gallery; lower `top_k` to at most {len(expression)}."
            )
            raise ValueError(msg)
        network = self.start_fit(train, validation, config)
        options = {}
        if self.settings.early_stopping == "pcc":
            options["plan"] = RetrievalValidation(network, train.targets, self.settings.top_k, config)
        self.report = self.fit_network(network, train, validation, config, **options)
        keys = network.gallery_keys(expression, self.device)
        self.gallery = Gallery(keys, expression, top_k=self.settings.top_k, index=self.settings.gallery_index)
        return self.report

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, projection_dim)`` projected image embeddings (the retrieval queries)."""
        network, data = self.fitted(data)
        return self.run(network, data)

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` mean standardised expression of the ``top_k`` gallery spots nearest to each spot's image."""
        queries = self.embed(data)
        return self.gallery.predict(queries, device=self.device)

    def confidence(self, data: SpotSet, *, embedding: np.ndarray | None = None) -> np.ndarray:
        """``(n,)`` mean cosine similarity of each spot's image embedding to the ``top_k`` gallery spots it retrieves."""
        queries = self.embed(data) if embedding is None else embedding
        return self.gallery.confidence(queries, device=self.device)

    def extra_state(self) -> dict[str, Any]:
        """The gallery: projected expression and standardised expression of the spots fitted on."""
        return {"gallery": self.gallery.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the gallery."""
        self.gallery = Gallery.from_state_dict(state["gallery"])
