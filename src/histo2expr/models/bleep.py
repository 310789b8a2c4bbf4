"""BLEEP-style contrastive retrieval: images and expression projected into one space, top-k mean at inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import positive_int
from .base import FitReport, SpotSet, TrainConfig, register_method
from .layers import ImageInput, ProjectionHead, TorchMethod
from .losses import bleep_loss
from .retrieval import aggregate, cosine_topk
from .training import train_module

#: Expression rows projected at a time when the gallery is built.
_GALLERY_CHUNK = 4096


class _BLEEPNetwork(nn.Module):
    """Image input with its projection head, and the expression projection head."""

    def __init__(
        self, image_input: ImageInput, image_head: ProjectionHead, gene_head: ProjectionHead
    ) -> None:
        super().__init__()
        self.image_input = image_input
        self.image_head = image_head
        self.gene_head = gene_head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected image embeddings of a batch."""
        return self.image_head(self.image_input(batch))


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

    Notes
    -----
    :meth:`embed` returns the projected image embedding, the query of the retrieval.
    """

    name = "bleep"

    def __init__(
        self,
        *,
        encoder: str | nn.Module = "efficientnet_lite0",
        weights: Any = "default",
        projection_dim: int = 256,
        dropout: float = 0.1,
        temperature: float = 1.0,
        top_k: int = 50,
    ) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            msg = f"`temperature` must be a positive number, got {temperature!r}."
            raise ValueError(msg)
        super().__init__(
            encoder=encoder,
            weights=weights,
            projection_dim=positive_int(projection_dim, "projection_dim"),
            dropout=dropout,
            temperature=float(temperature),
            top_k=positive_int(top_k, "top_k"),
        )
        #: ``(n_gallery, projection_dim)`` projected expression of the spots fitted on (CPU, float32).
        self.gallery_embeddings: torch.Tensor | None = None
        #: ``(n_gallery, n_genes)`` their standardised expression (CPU, float32).
        self.gallery_expression: torch.Tensor | None = None

    def build(self, image_input: ImageInput, n_genes: int) -> _BLEEPNetwork:
        """The image input with its projection head, and the expression projection head."""
        dim, dropout = self.params["projection_dim"], self.params["dropout"]
        return _BLEEPNetwork(
            image_input, ProjectionHead(image_input.dim, dim, dropout), ProjectionHead(n_genes, dim, dropout)
        )

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Train both projection heads (and the encoder, end to end); build the gallery of all fitted spots."""
        parts = [train] if validation is None or len(validation) == 0 else [train, validation]
        n_gallery = sum(len(p) for p in parts)
        if self.params["top_k"] > n_gallery:
            msg = (
                f"`top_k={self.params['top_k']}` exceeds the {n_gallery} training and validation spots "
                f"that form the retrieval gallery; lower `top_k` to at most {n_gallery}."
            )
            raise ValueError(msg)
        network = self.start_fit(train, validation, config)

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.batch_loss(network, batch)

        prepare = network.image_input.prepare
        ready_validation = None if validation is None else prepare(validation)
        self.report = train_module(network, loss_fn, prepare(train), ready_validation, config)
        self.gallery_expression = torch.from_numpy(
            np.concatenate([np.asarray(p.targets, dtype=np.float32) for p in parts])
        )
        with torch.no_grad():
            self.gallery_embeddings = torch.cat(
                [
                    network.gene_head(chunk.to(self.device)).float().cpu()
                    for chunk in self.gallery_expression.split(_GALLERY_CHUNK)
                ]
            )
        return self.report

    def batch_loss(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch: :func:`~histo2expr.models.losses.bleep_loss` of its two projections."""
        return bleep_loss(network(batch), network.gene_head(batch["targets"]), self.params["temperature"])

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, projection_dim)`` projected image embeddings (the retrieval queries)."""
        network, data = self.fitted(data)
        return self.run(network, data)

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` mean standardised expression of the ``top_k`` gallery spots nearest to each spot's image."""
        queries = self.embed(data)
        _, indices = cosine_topk(queries, self.gallery_embeddings, self.params["top_k"], device=self.device)
        return aggregate(self.gallery_expression.numpy(), indices, weighting="mean").astype(np.float32)

    def confidence(self, data: SpotSet, *, embedding: np.ndarray | None = None) -> np.ndarray:
        """``(n,)`` mean cosine similarity of each spot's image embedding to the ``top_k`` gallery spots it retrieves."""
        queries = self.embed(data) if embedding is None else embedding
        similarities, _ = cosine_topk(
            queries, self.gallery_embeddings, self.params["top_k"], device=self.device
        )
        return similarities.mean(axis=1)

    def extra_state(self) -> dict[str, Any]:
        """The gallery: projected expression and standardised expression of the spots fitted on."""
        return {
            "gallery_embeddings": self.gallery_embeddings.clone(),
            "gallery_expression": self.gallery_expression.clone(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the gallery."""
        self.gallery_embeddings = state["gallery_embeddings"].float().cpu()
        self.gallery_expression = state["gallery_expression"].float().cpu()
