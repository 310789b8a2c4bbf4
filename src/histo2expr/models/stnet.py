"""ST-Net-style regression: image features to standardised expression with a mean squared error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._validation import flag, positive_int, probability
from .base import FitReport, SpotSet, TrainConfig, register_method
from .layers import EncoderSettings, ImageInput, RegressionHead, TorchMethod, dihedral_mean
from .training import LossOutput, SpotNetwork


@dataclass(frozen=True, kw_only=True)
class STNetSettings(EncoderSettings):
    """Settings of :class:`STNetMethod` (see its parameters)."""

    hidden: int | None = None
    dropout: float = 0.0
    tta: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden is not None:
            object.__setattr__(self, "hidden", positive_int(self.hidden, "hidden"))
        object.__setattr__(self, "dropout", probability(self.dropout, "dropout"))
        flag(self.tta, "tta")


class _STNetNetwork(SpotNetwork):
    """Image input (encoder or standardised frozen features) followed by the regression head; MSE."""

    def __init__(self, image_input: ImageInput, head: RegressionHead) -> None:
        super().__init__()
        self.image_input = image_input
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.image_input(batch))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The mean squared error of the predicted standardised expression."""
        return LossOutput(nn.functional.mse_loss(self(batch).float(), batch["targets"]))


@register_method
class STNetMethod(TorchMethod):
    """``method="stnet"``: ST-Net-style regression from the image to the genes, trained with MSE.

    - End-to-end regime: an encoder (:func:`~histo2expr.models.encoders.build_encoder`) and a
      linear head to the genes are trained together on the patches (augmented by the patch
      loader); the prediction of a spot is the average over the 8 flips / quarter-turn
      rotations of its patch (test-time augmentation, ``tta``), as ST-Net does.
    - Frozen regime: the head is trained on the cached features, standardised with the
      statistics of the training spots (scale floored at a tenth of the median feature scale,
      values clipped to ±10). Test-time augmentation does not apply
      to cached features; a caller wanting it can embed each of the 8 views
      (:func:`~histo2expr.patches.dihedral_views`), predict each and average.

    Early stopping uses the validation spots (training slides only); the weights of the best
    validation epoch are kept.

    Parameters
    ----------
    encoder
        End-to-end regime: an encoder name (``"efficientnet_lite0"``, the offline ImageNet
        EfficientNet-Lite0; ``"densenet121"`` as in ST-Net; any timm name) or a
        :class:`torch.nn.Module` returning ``(B, D)`` features (copied, never trained in
        place). Ignored in the frozen regime.
    weights
        Initial encoder weights (``"default"``, ``"imagenet"``, `None`, a path or a state dict),
        see :func:`~histo2expr.models.encoders.build_encoder`. Ignored in the frozen regime.
    hidden
        Width of one hidden layer of the head; `None` (default) for a linear head as in ST-Net.
    dropout
        Dropout before the last linear layer of the head.
    tta
        End-to-end regime: average predictions and embeddings over the 8 dihedral views.

    Notes
    -----
    :meth:`embed` returns what the head reads: the encoder features (end-to-end regime,
    averaged over the 8 views when ``tta``) or the standardised frozen features.
    """

    name = "stnet"
    settings_class = STNetSettings
    settings: STNetSettings

    def build(self, image_input: ImageInput, n_genes: int) -> _STNetNetwork:
        """The image input followed by the regression head."""
        head = RegressionHead(
            image_input.dim, n_genes, hidden=self.settings.hidden, dropout=self.settings.dropout
        )
        return _STNetNetwork(image_input, head)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Train the head (and the encoder, end to end) with MSE; early stopping on the validation MSE."""
        network = self.start_fit(train, validation, config)
        self.report = self.fit_network(network, train, validation, config)
        return self.report

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` predicted standardised expression (averaged over 8 views end to end with ``tta``)."""
        network, data = self.fitted(data)
        if data.regime == "end2end" and self.settings.tta:
            encoder, head = network.image_input.encoder, network.head
            return self.run(lambda batch: dihedral_mean(lambda x: head(encoder(x)), batch["image"]), data)
        return self.run(network, data)

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, d)`` what the head reads: encoder features (view-averaged with ``tta``) or standardised features."""
        network, data = self.fitted(data)
        if data.regime == "end2end" and self.settings.tta:
            encoder = network.image_input.encoder
            return self.run(lambda batch: dihedral_mean(encoder, batch["image"]), data)
        return self.run(network.image_input, data)
