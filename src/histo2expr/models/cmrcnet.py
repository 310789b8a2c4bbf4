"""CMRCNet: BLEEP's contrastive retrieval plus a cross-modal masked reconstruction of the image embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import flag, one_of, positive_int, probability
from .base import register_method
from .bleep import BLEEPMethod, BLEEPSettings, RetrievalNetwork
from .layers import ImageInput, ProjectionHead, pool_token_grid
from .losses import bleep_loss
from .training import LossOutput

#: Losses of the reconstruction (paper, Table 5).
RECONSTRUCTION_LOSSES = ("mse", "cosine")
#: What the reconstruction rebuilds (paper, Table 5): the image embedding or the expression embedding.
RECONSTRUCTION_TARGETS = ("image", "expression")
#: Seed of the fixed mask used in evaluation mode, so that validation losses are comparable across epochs.
_EVALUATION_MASK_SEED = 0


def mask_elements(
    values: torch.Tensor, rate: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero each element of ``values`` independently with probability ``rate`` (no rescaling, unlike dropout).

    Parameters
    ----------
    values
        Any tensor, e.g. ``(B, t, d)`` projected image tokens.
    rate
        Masking probability in [0, 1).
    generator
        Source of the random mask (torch's global generator when `None`).

    Returns
    -------
    ``values`` with the masked elements set to 0 (a new tensor).
    """
    keep = torch.rand(values.shape, generator=generator, device=values.device) >= rate
    return values * keep


def reconstruction_error(rebuilt: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The reconstruction loss of a batch: mean squared error, or mean of ``1 - cos`` per spot (float32).

    Parameters
    ----------
    rebuilt, target
        ``(B, d)`` reconstruction ``F_r`` and its target.
    kind
        ``"mse"`` (mean over all elements) or ``"cosine"`` (``1 - cos(F_r, target)`` averaged over spots).
    """
    if rebuilt.shape != target.shape:
        msg = f"`rebuilt` and `target` must have the same shape, got {tuple(rebuilt.shape)} and {tuple(target.shape)}."
        raise ValueError(msg)
    rebuilt, target = rebuilt.float(), target.float()
    if kind == "mse":
        return F.mse_loss(rebuilt, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(rebuilt, target, dim=-1)).mean()
    msg = f"`kind` must be one of {list(RECONSTRUCTION_LOSSES)}, got {kind!r}."
    raise ValueError(msg)


def cmrcnet_loss(contrastive: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """CMRCNet's total loss ``log(1 + L_c) + log(1 + L_r)``, which balances two losses of different magnitude."""
    return torch.log1p(contrastive) + torch.log1p(reconstruction)


class GeneTokens(nn.Module):
    """The self-normalising gene encoder: Linear, SELU, AlphaDropout, reshaped to ``n_tokens`` tokens.

    Parameters
    ----------
    n_genes
        Length of the expression vectors.
    n_tokens, dim
        Output: ``n_tokens`` tokens of ``dim`` (paper: 8 x 256 = 2048 units).
    dropout
        AlphaDropout probability (paper: 0.25).
    """

    def __init__(self, n_genes: int, n_tokens: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.n_tokens, self.dim = n_tokens, dim
        self.layers = nn.Sequential(nn.Linear(n_genes, n_tokens * dim), nn.SELU(), nn.AlphaDropout(dropout))

    def forward(self, expression: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes) -> (B, n_tokens, dim)``."""
        return self.layers(expression).view(len(expression), self.n_tokens, self.dim)


class ResidualCrossAttention(nn.Module):
    """Cross-attention from image tokens to gene tokens with an image-side value added back.

    ``out = MHA(Q = LN(x), K = V = genes) + W_v x``: the attention output (gene values weighted
    by the image queries) plus a value projection of the image tokens themselves (**Decision**:
    of ``x`` before the LayerNorm), so the reconstruction does not rest on the gene side alone.

    Parameters
    ----------
    dim
        Token width.
    heads
        Attention heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.image_value = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """``(B, t, dim)`` image tokens and ``(B, m, dim)`` gene tokens -> ``(B, t, dim)``."""
        attended = self.attention(self.norm(image), genes, genes, need_weights=False)[0]
        return attended + self.image_value(image)


class FusionBlock(nn.Module):
    """A cross-modal fusion module: a pre-norm transformer block, then :class:`ResidualCrossAttention`.

    ``x = x + MSA(LN(x)); x = x + MLP(LN(x)); x = ResidualCrossAttention(x, genes)``.

    Parameters
    ----------
    dim
        Token width.
    heads
        Heads of the self-attention and of the cross-attention (paper: 8).
    mlp_ratio
        Hidden width of the MLP relative to ``dim`` (ViT: 4).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.cross = ResidualCrossAttention(dim, heads)

    def forward(self, image: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """``(B, t, dim)`` image tokens and ``(B, m, dim)`` gene tokens -> ``(B, t, dim)``."""
        normed = self.norm1(image)
        image = image + self.attention(normed, normed, normed, need_weights=False)[0]
        image = image + self.mlp(self.norm2(image))
        return self.cross(image, genes)


class CrossModalReconstruction(nn.Module):
    """Masked image tokens rebuilt under the guidance of the expression: ``F_r`` of a batch.

    1. Image tokens ``(B, t, token_dim)`` -> Linear -> ``(B, t, dim)``, each element zeroed with
       probability ``mask_rate`` (:func:`mask_elements`; a fixed mask in evaluation mode).
    2. Expression -> :class:`GeneTokens` ``(B, gene_tokens, dim)``.
    3. Cross-attention (``cross_heads``), queries from the masked image tokens, keys and values
       from the gene tokens: ``softmax(Q K^T / sqrt(d_k)) V``.
    4. ``fusion_blocks`` :class:`FusionBlock` modules, each with its own weights.
    5. Mean over the tokens, mapped by a linear layer to ``out_dim`` when ``dim != out_dim``
       -> ``F_r`` ``(B, out_dim)``.

    Parameters
    ----------
    token_dim, n_genes
        Input widths.
    dim
        Width of the tokens inside the module (paper: the projection dimension, 256).
    out_dim
        Width of ``F_r``: that of the reconstruction target (the projection dimension).
    mask_rate, gene_tokens, gene_dropout, cross_heads, fusion_heads, fusion_blocks, mlp_ratio
        See :class:`CMRCNetMethod`.
    """

    def __init__(
        self,
        token_dim: int,
        n_genes: int,
        dim: int,
        out_dim: int,
        *,
        mask_rate: float,
        gene_tokens: int,
        gene_dropout: float,
        cross_heads: int,
        fusion_heads: int,
        fusion_blocks: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.mask_rate = mask_rate
        self.token_projection = nn.Linear(token_dim, dim)
        self.gene_tokens = GeneTokens(n_genes, gene_tokens, dim, gene_dropout)
        self.cross = nn.MultiheadAttention(dim, cross_heads, batch_first=True)
        self.blocks = nn.ModuleList(FusionBlock(dim, fusion_heads, mlp_ratio) for _ in range(fusion_blocks))
        self.output = nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """``(B, t, token_dim)`` image tokens and ``(B, n_genes)`` expression -> ``(B, dim)`` reconstruction."""
        projected = self.token_projection(tokens)
        generator = None
        if not self.training:
            generator = torch.Generator(device=projected.device).manual_seed(_EVALUATION_MASK_SEED)
        masked = mask_elements(projected, self.mask_rate, generator=generator)
        genes = self.gene_tokens(expression).to(masked.dtype)
        fused = self.cross(masked, genes, genes, need_weights=False)[0]
        for block in self.blocks:
            fused = block(fused, genes)
        return self.output(fused.mean(dim=1))


@dataclass(frozen=True, kw_only=True)
class CMRCNetSettings(BLEEPSettings):
    """Settings of :class:`CMRCNetMethod` (see its parameters)."""

    token_grid: int | None = 3
    reconstruction: bool = True
    mask_rate: float = 0.5
    reconstruction_loss: str = "mse"
    reconstruction_target: str = "image"
    reconstruction_dim: int = 64
    gene_tokens: int = 8
    gene_dropout: float = 0.25
    cross_heads: int = 4
    fusion_heads: int = 8
    fusion_blocks: int = 2
    mlp_ratio: float = 4.0
    average_epochs: float | None = 3.0
    early_stopping: str = "pcc"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        if self.token_grid is not None:
            set_(self, "token_grid", positive_int(self.token_grid, "token_grid"))
        flag(self.reconstruction, "reconstruction")
        set_(self, "mask_rate", probability(self.mask_rate, "mask_rate"))
        one_of(self.reconstruction_loss, RECONSTRUCTION_LOSSES, "reconstruction_loss")
        one_of(self.reconstruction_target, RECONSTRUCTION_TARGETS, "reconstruction_target")
        set_(self, "gene_dropout", probability(self.gene_dropout, "gene_dropout"))
        for name in ("reconstruction_dim", "gene_tokens", "cross_heads", "fusion_heads", "fusion_blocks"):
            set_(self, name, positive_int(getattr(self, name), name))
        ratio = self.mlp_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not (math.isfinite(ratio) and ratio > 0)
        ):
            msg = f"`mlp_ratio` must be a positive number, got {ratio!r}."
            raise ValueError(msg)
        set_(self, "mlp_ratio", float(ratio))
        for heads in ("cross_heads", "fusion_heads"):
            if self.reconstruction_dim % getattr(self, heads):
                msg = (
                    f"`{heads}={getattr(self, heads)}` must divide `reconstruction_dim={self.reconstruction_dim}` "
                    "(each attention head gets an equal share of the width); change either."
                )
                raise ValueError(msg)


class _CMRCNetNetwork(RetrievalNetwork):
    """BLEEP's two projection heads on the mean image token, and the reconstruction module (or None)."""

    def __init__(
        self,
        image_input: ImageInput,
        image_head: ProjectionHead,
        gene_head: ProjectionHead,
        reconstruction: CrossModalReconstruction | None,
        settings: CMRCNetSettings,
    ) -> None:
        super().__init__()
        self.image_input = image_input
        self.image_head = image_head
        self.gene_head = gene_head
        self.reconstruction = reconstruction
        self.settings = settings

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image tokens of a batch; a square grid larger than ``token_grid`` is average-pooled to it."""
        tokens = self.image_input.tokens(batch)
        side, grid = math.isqrt(tokens.shape[1]), self.settings.token_grid
        if grid is not None and side * side == tokens.shape[1] and side > grid:
            tokens = pool_token_grid(tokens, grid)
        return tokens

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected image embeddings ``F'_img`` of a batch (the retrieval queries)."""
        return self.image_head(self.tokens(batch).mean(dim=1))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """``log(1 + L_c) + log(1 + L_r)`` of a batch (terms ``contrastive`` and ``reconstruction``); ``L_c`` alone without reconstruction."""
        tokens = self.tokens(batch)
        image = self.image_head(tokens.mean(dim=1))
        gene = self.gene_head(batch["targets"])
        contrastive = bleep_loss(image, gene, self.settings.temperature)
        if self.reconstruction is None:
            return LossOutput(contrastive)
        rebuilt = self.reconstruction(tokens, batch["targets"])
        target = image if self.settings.reconstruction_target == "image" else gene
        rebuilding = reconstruction_error(rebuilt, target, self.settings.reconstruction_loss)
        return LossOutput(
            cmrcnet_loss(contrastive, rebuilding), {"contrastive": contrastive, "reconstruction": rebuilding}
        )


@register_method
class CMRCNetMethod(BLEEPMethod):
    """``method="cmrcnet"``: contrastive learning plus cross-modal masked reconstruction, then retrieval (CMRCNet).

    **Image side.** The spot's image tokens — end to end the encoder's
    :meth:`Encoder.forward_tokens <histo2expr.models.Encoder.forward_tokens>` (a CNN's last feature map, a
    ViT's patch tokens), in the frozen regime the cached tokens of
    ``hx.tl.embed_patches(..., tokens=grid)`` standardised per feature over all training tokens
    (cached pooled features count as one token) — are averaged and projected by BLEEP's
    projection head (Linear, GELU, Linear, Dropout, residual, LayerNorm) to ``F'_img``
    (``projection_dim``). **Gene side.** The standardised expression goes through a projection
    head to ``F_gene``.

    **Loss.** ``L_c`` = :func:`~histo2expr.models.losses.bleep_loss` of ``F'_img`` and ``F_gene``
    (``temperature``). With ``reconstruction`` a ``CrossModalReconstruction`` module rebuilds
    ``F_r`` from the masked, projected image tokens and the expression (SNN gene tokens,
    ``cross_heads``-head cross-attention, ``fusion_blocks`` fusion blocks, mean over tokens);
    ``L_r`` = ``reconstruction_error`` (``reconstruction_loss``) of ``F_r`` against the
    ``reconstruction_target``, and the loss is ``cmrcnet_loss``,
    ``log(1 + L_c) + log(1 + L_r)``.

    **Inference** is BLEEP's (inherited from :class:`~histo2expr.models.BLEEPMethod`): the
    gallery is ``F_gene`` of all spots passed to ``fit`` (training slides only) with their
    standardised expression; each spot's ``F'_img`` retrieves the ``top_k`` most cosine-similar
    gallery spots and its prediction is the plain mean of their expression. The reconstruction
    module is used in training only.

    **Decisions** (the paper is silent or vague):

    - ``reconstruction_target="image"`` rebuilds ``F'_img`` (the paper's choice) and
      ``"expression"`` rebuilds ``F_gene``, the expression embedding (so both targets live in
      the same 256-d space); targets are not detached (gradients reach both projection heads).
    - The element-wise mask is drawn anew for every training batch; in evaluation mode (the
      validation loss of ``early_stopping="loss"``) it is a fixed draw, so epochs are compared on one mask.
    - ``reconstruction=False`` trains on ``L_c`` itself (not ``log(1 + L_c)``): with
      ``average_epochs=None, early_stopping="loss"`` it is exactly ``method="bleep"`` on the mean
      token — bit-identical to it given the same features and seed.
    - **Early stopping on the retrieval** (``early_stopping="pcc"``, not in the paper): the epoch
      kept is the one whose retrieval — what inference predicts — scores the highest mean gene-wise
      PCC on the inner validation spots, from a gallery of the fit spots (never the validation spots'
      own expression), rather than the one of the lowest training loss on them, which is only loosely
      tied to the prediction. On her2st it raised the leave-one-slide-out PCC(ACG) beyond the seed
      spread and made the patient-B fold far less sensitive to float-level changes of the inputs
      (``benchmarks/results/her2st_cmrcnet_stopping.md``); ``early_stopping="loss"`` is the paper's
      training loss.
    - **Weight averaging** (not in the paper): training keeps an exponential moving average of
      the weights with a time constant of ``average_epochs`` epochs (the option of the same name
      of :func:`~histo2expr.models.train_network`); validation, early stopping and the weights
      kept are those of the average. The retrieval of a single set of weights changed a lot from
      one epoch to the next (on her2st the held-out PCC of one fold fell from 0.12 to 0.03 and
      rose back within six epochs); the average, about the mean of the last few epochs' weights, made the
      results steadier across seeds and better on average (docs/methods/cmrcnet.md).
    - Frozen tokens: the backbone's last feature map average-pooled to a small grid (the paper
      fine-tunes a ViT-B/32 with 49 patch tokens and a class token, not available frozen).

    **Defaults that differ from the paper** (AdamW lr 1e-4, batch 64, 60 epochs, ViT-B/32 trained
    from scratch at 224 px): training follows :func:`~histo2expr.tl.fit_histo2expr` (AdamW lr
    1e-3, batch 64, at most 50 epochs with early stopping after 5 without improvement); the
    default encoder end to end is the ImageNet ``"efficientnet_lite0"`` (7 x 7 = 49 tokens at
    224 px; ``encoder="vit_base_patch32_224", weights=None`` is the paper's setting); in the
    frozen regime 3 x 3 token grids (``embed_patches(tokens=3)``) keep a leave-one-slide-out fold
    of about 1000 spots near 20 s on one CPU core. The model sizes are the paper's.

    Parameters
    ----------
    encoder, weights, projection_dim, dropout, temperature
        As for :class:`~histo2expr.models.BLEEPMethod` (paper: ViT-B, 256, BLEEP's dropout 0.1, 1.0).
    top_k
        Gallery spots averaged per prediction (paper: 50; 500 in its second setting).
    gallery_index
        As for :class:`~histo2expr.models.BLEEPMethod` (``"exact"``).
    reconstruction
        Train with the masked reconstruction; `False` is contrastive learning alone (BLEEP).
    mask_rate
        Probability that an element of the projected image tokens is masked (paper: 0.5;
        ablations 0.3 / 0.7).
    reconstruction_loss
        ``"mse"`` (paper) or ``"cosine"``.
    reconstruction_target
        ``"image"`` (paper) or ``"expression"``.
    gene_tokens
        Gene tokens of the SNN gene encoder; its linear layer has ``gene_tokens * projection_dim``
        units (paper: 8 x 256 = 2048).
    gene_dropout
        AlphaDropout of the SNN (paper: 0.25).
    cross_heads, fusion_heads
        Heads of the first cross-attention (paper: 4) and of the fusion blocks (paper: 8); both
        must divide ``projection_dim``.
    fusion_blocks
        Fusion blocks, each with its own weights (paper: 2).
    mlp_ratio
        Hidden width of the fusion blocks' MLP relative to ``projection_dim`` (ViT: 4).
    average_epochs
        Time constant, in epochs, of the moving average of the weights that is validated and
        kept (3); `None` trains without averaging, as the paper.
    early_stopping
        What chooses the epoch on the inner validation spots, as for
        :class:`~histo2expr.models.BLEEPMethod`: ``"pcc"`` (default), the mean gene-wise PCC of the
        retrieval that inference runs, from a gallery of the fit spots (training spots without the
        validation spots); ``"loss"``, the training loss ``log(1 + L_c) + log(1 + L_r)``.

    Notes
    -----
    ``embed`` returns ``F'_img``, the query of the retrieval.
    """

    name = "cmrcnet"
    token_input = True
    settings_class = CMRCNetSettings
    default_patience = 5  # not BLEEP's 3, which lost accuracy (benchmarks/results/her2st_patience.md)
    settings: CMRCNetSettings

    def build(self, image_input: ImageInput, n_genes: int) -> _CMRCNetNetwork:
        """Projection heads on the mean image token and on the expression, and the reconstruction module."""
        settings = self.settings
        dim, dropout = settings.projection_dim, settings.dropout
        image_head = ProjectionHead(image_input.token_dim, dim, dropout)
        gene_head = ProjectionHead(n_genes, dim, dropout)
        reconstruction = None
        if settings.reconstruction:
            reconstruction = CrossModalReconstruction(
                image_input.token_dim,
                n_genes,
                settings.reconstruction_dim,
                dim,
                mask_rate=settings.mask_rate,
                gene_tokens=settings.gene_tokens,
                gene_dropout=settings.gene_dropout,
                cross_heads=settings.cross_heads,
                fusion_heads=settings.fusion_heads,
                fusion_blocks=settings.fusion_blocks,
                mlp_ratio=settings.mlp_ratio,
            )
        return _CMRCNetNetwork(image_input, image_head, gene_head, reconstruction, settings)
