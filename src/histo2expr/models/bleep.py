"""BLEEP-style contrastive retrieval: images and expression projected into one space, top-k mean at inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import non_negative_number, one_of, positive_int, probability
from .base import FitReport, SpotSet, TrainConfig, register_method
from .gallery import GALLERY_INDEXES, Gallery
from .layers import EncoderSettings, ImageInput, ProjectionHead, TorchMethod
from .losses import bleep_loss
from .training import LossOutput, SpotNetwork

#: Expression rows projected at a time when the gallery is built.
_GALLERY_CHUNK = 4096


@dataclass(frozen=True, kw_only=True)
class BLEEPSettings(EncoderSettings):
    """Settings of :class:`BLEEPMethod` (see its parameters)."""

    projection_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    top_k: int = 50
    gallery_index: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.gallery_index, GALLERY_INDEXES, "gallery_index")
        object.__setattr__(self, "projection_dim", positive_int(self.projection_dim, "projection_dim"))
        object.__setattr__(self, "dropout", probability(self.dropout, "dropout"))
        object.__setattr__(
            self, "temperature", non_negative_number(self.temperature, "temperature", positive=True)
        )
        object.__setattr__(self, "top_k", positive_int(self.top_k, "top_k"))


class _BLEEPNetwork(SpotNetwork):
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
    early stopping on the validation spots.

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
        self.report = self.fit_network(network, train, validation, config)
        with torch.no_grad():
            keys = torch.cat(
                [
                    network.gene_head(chunk.to(self.device)).float().cpu()
                    for chunk in torch.from_numpy(expression).split(_GALLERY_CHUNK)
                ]
            )
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
