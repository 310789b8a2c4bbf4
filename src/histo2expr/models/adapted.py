"""The adapted-encoder regime: the encoder's lower blocks run once, its top blocks train with the method.

- :class:`LowerBlocks` and :class:`TopBlocks`: an :class:`~histo2expr.models.Encoder` cut into
  its frozen lower part (normalisation, stem and all stages but the last ``trainable_blocks``) and
  its trainable top.
- :class:`AdaptedViews`: which augmented views of every patch are cached (the dihedral views, then
  stain-jittered copies) and which of them inference averages.
- :class:`ActivationCache`: the lower part's activations of every spot and view, float16 in a memory
  map in the histo2expr cache folder (bounded by ``hx.settings.cache_max_bytes``), keyed by the
  encoder, its weights, the split, the views and the patches. Training draws one cached view per spot
  and epoch; inference averages the top blocks' features over the first ``tta`` views.

Only the images enter the cache, so the activations of held-out slides may be computed with the
others: nothing of them reaches a fit unless their spots are passed to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._validation import positive_int
from .encoders import Encoder, build_encoder

if TYPE_CHECKING:
    from pathlib import Path

    from ..patches import PatchSource

#: Format of the cached activations (part of the cache key).
_CACHE_VERSION = 1


def _stages(encoder: Encoder) -> nn.Sequential:
    """The stages of an EfficientNet-like timm backbone, or a clear error for another architecture."""
    backbone = encoder.backbone
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")
    if not all(hasattr(backbone, name) for name in needed) or not isinstance(backbone.blocks, nn.Sequential):
        msg = (
            f"The adapted regime cuts an EfficientNet-like backbone (timm's EfficientNet: conv_stem, blocks, "
            f"conv_head); encoder {encoder.name!r} ({type(backbone).__name__}) is not one. Use "
            "'efficientnet_lite0' (or lite1 / lite2, any timm EfficientNet), or the frozen or end-to-end regime."
        )
        raise ValueError(msg)
    return backbone.blocks


def check_trainable_blocks(encoder: Encoder, trainable_blocks: int) -> int:
    """``trainable_blocks`` checked against the number of stages of ``encoder``."""
    n = len(_stages(encoder))
    value = positive_int(trainable_blocks, "trainable_blocks")
    if value >= n:
        msg = (
            f"`trainable_blocks={trainable_blocks}` must be smaller than the {n} stages of encoder "
            f"{encoder.name!r}: the lower stages are what is cached. Train fewer blocks, or train end to end."
        )
        raise ValueError(msg)
    return value


class LowerBlocks(nn.Module):
    """The frozen lower part of an encoder: raw patches -> activations before its top ``trainable_blocks`` stages."""

    def __init__(self, encoder: Encoder, trainable_blocks: int) -> None:
        super().__init__()
        n = len(_stages(encoder)) - check_trainable_blocks(encoder, trainable_blocks)
        backbone = encoder.backbone
        self.normalize = encoder.normalize
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[:n])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` raw patches -> ``(B, C, h, w)`` activations."""
        return self.stem(self.normalize(images))


class TopBlocks(nn.Module):
    """The trainable top of an encoder: its last ``trainable_blocks`` stages, head convolution and pooling.

    BatchNorm layers keep the encoder's running statistics (they stay in evaluation mode while
    the rest trains; their scale and shift train): cached activations of a few hundred spots per
    batch would give noisy statistics, and each spot's features then depend on that spot alone.
    The pretrained weights train at a tenth of the method's learning rate (:attr:`lr_scale`, read by
    :class:`~histo2expr.models.TrainingPlan`), the heads at the full rate.

    Attributes
    ----------
    feature_dim
        Length of the pooled features.
    lr_scale
        Learning rate of these weights relative to the method's.
    """

    lr_scale = 0.1

    def __init__(self, encoder: Encoder, trainable_blocks: int) -> None:
        super().__init__()
        n = len(_stages(encoder)) - check_trainable_blocks(encoder, trainable_blocks)
        backbone = copy.deepcopy(encoder.backbone)
        self.blocks = nn.Sequential(*backbone.blocks[n:])
        self.head = nn.Sequential(backbone.conv_head, backbone.bn2)
        self.pool = backbone.global_pool
        self.feature_dim = int(encoder.feature_dim)

    def train(self, mode: bool = True) -> TopBlocks:
        """Train mode for everything but the BatchNorm layers (see the class docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` cached activations -> ``(B, feature_dim)`` features."""
        return self.pool(self.head(self.blocks(activations)))


@dataclass(frozen=True)
class AdaptedViews:
    """The augmented views of every patch whose lower-block activations are cached.

    View ``v < dihedral`` is the ``v``-th symmetry of the square
    (:func:`~histo2expr.patches.dihedral`; view 0 is the patch itself); the ``stain_copies``
    views after them are HED stain jitters (:func:`~histo2expr.patches.hed_jitter`, strength
    ``stain`` as in :class:`~histo2expr.patches.Augment`) of a random symmetry, drawn from
    ``(seed, copy, spot)``.

    Attributes
    ----------
    dihedral
        1, 4 (the quarter turns) or 8 (with their mirror images).
    stain_copies
        Stain-jittered views after the dihedral ones.
    stain
        Strength of the stain jitter, in [0, 1).
    tta
        Inference averages the top blocks' features over the first ``tta`` views (at most
        ``dihedral``): 1, 4 or 8, as ``embed_patches(tta=...)``.
    seed
        Seed of the stain jitter.
    """

    dihedral: int = 8
    stain_copies: int = 0
    stain: float = 0.2
    tta: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dihedral", "tta"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (1, 4, 8):
                msg = f"`{name}` must be 1, 4 or 8 dihedral views, got {value!r}."
                raise ValueError(msg)
        if self.tta > self.dihedral:
            msg = f"`tta={self.tta}` averages views that are not cached: it must be at most `views={self.dihedral}`."
            raise ValueError(msg)
        if (
            isinstance(self.stain_copies, bool)
            or not isinstance(self.stain_copies, int)
            or self.stain_copies < 0
        ):
            msg = f"`stain_copies` must be a non-negative integer, got {self.stain_copies!r}."
            raise ValueError(msg)
        if not 0 < self.stain < 1:
            msg = f"`stain={self.stain}` must be in (0, 1): the HED jitter strength (0.2 covers her2st-like shifts)."
            raise ValueError(msg)

    @classmethod
    def for_training(cls, views: int, stain_copies: int, seed: int) -> AdaptedViews:
        """The views of ``fit_histo2expr(views=..., stain_copies=...)``: inference averages 4 of them, or fewer."""
        return cls(dihedral=views, stain_copies=stain_copies, tta=min(4, views), seed=seed)

    def plain(self) -> dict[str, Any]:
        """The views as plain values (for a state dict)."""
        return asdict(self)

    def cached_identity(self) -> dict[str, Any]:
        """What the cached activations depend on, for the cache key.

        ``tta`` only reads them, and ``stain`` and ``seed`` only shape the stain copies.
        """
        identity: dict[str, Any] = {"dihedral": self.dihedral, "stain_copies": self.stain_copies}
        if self.stain_copies:
            identity |= {"stain": self.stain, "seed": self.seed}
        return identity

    @property
    def n_views(self) -> int:
        """Views cached per patch."""
        return self.dihedral + self.stain_copies

    def inference(self) -> AdaptedViews:
        """The views inference needs: the first ``tta`` (a prefix of these views)."""
        return AdaptedViews(dihedral=self.tta, stain_copies=0, stain=self.stain, tta=self.tta, seed=self.seed)

    def render(self, images: torch.Tensor, indices: np.ndarray) -> list[torch.Tensor]:
        """Every view of a ``(B, 3, H, W)`` uint8 batch of the spots at ``indices``."""
        from ..patches import Augment, augment_rng, dihedral

        views = [dihedral(images, k) for k in range(self.dihedral)]
        if self.stain_copies:
            jitter = Augment(stain=self.stain, brightness=0, contrast=0, saturation=0, hue=0)
            patches = images.permute(0, 2, 3, 1).numpy()
            for copy_index in range(self.stain_copies):
                jittered = [
                    jitter(patch, augment_rng(self.seed, copy_index, int(index)))
                    for patch, index in zip(patches, indices, strict=True)
                ]
                views.append(torch.from_numpy(np.stack(jittered).transpose(0, 3, 1, 2).copy()))
        return views


class ActivationCache:
    """Lower-block activations ``(n_spots, n_views, C, h, w)`` float16, memory-mapped from the cache folder.

    Make one with :meth:`build`. It pickles without its memory map (DataLoader workers reopen it).

    Attributes
    ----------
    path
        The ``.npy`` file.
    views
        The cached :class:`AdaptedViews`.
    encoder
        ``Encoder.describe()`` of the encoder whose lower part ran.
    trainable_blocks
        Stages of the encoder above the cached activations.
    top_state
        The encoder's weights of those stages (:class:`TopBlocks`), where training starts.
    shape
        ``(n_spots, n_views, C, h, w)``.
    seconds
        Time taken to compute the activations (0 when they were read from the cache).
    """

    def __init__(
        self,
        path: Path,
        views: AdaptedViews,
        *,
        encoder: dict[str, Any],
        trainable_blocks: int,
        top_state: dict[str, torch.Tensor],
        seconds: float = 0.0,
    ) -> None:
        self.path, self.views, self.seconds = path, views, seconds
        self.encoder, self.trainable_blocks, self.top_state = encoder, trainable_blocks, top_state
        self._array: np.ndarray | None = None
        self.shape = tuple(self.array.shape)

    @property
    def array(self) -> np.ndarray:
        """The memory map (opened read-only on first use)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Size of the cached activations in bytes."""
        return int(np.prod(self.shape)) * 2

    def top_blocks(self) -> TopBlocks:
        """A fresh copy of the encoder's top blocks above these activations, with the encoder's weights."""
        top = TopBlocks(adapted_encoder(self.encoder), self.trainable_blocks)
        top.load_state_dict(self.top_state)
        return top

    def training_views(self, indices: np.ndarray, *, epoch: int, seed: int) -> torch.Tensor:
        """``(B, C, h, w)`` float32: one cached view per spot, drawn from ``(seed, epoch, spot)``."""
        n_views = self.shape[1]
        chosen = [int(np.random.default_rng([seed, epoch, int(i)]).integers(n_views)) for i in indices]
        order = np.argsort(indices, kind="stable")  # memory maps read faster in order
        rows = np.empty((len(indices), *self.shape[2:]), dtype=np.float16)
        for position in order:
            rows[position] = self.array[int(indices[position]), chosen[position]]
        return torch.from_numpy(rows).float()

    def inference_views(self, indices: np.ndarray) -> torch.Tensor:
        """``(B, tta, C, h, w)`` float32: the views inference averages."""
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices), self.views.tta, *self.shape[2:]), dtype=np.float16)
        rows[order] = self.array[np.asarray(indices)[order], : self.views.tta]
        return torch.from_numpy(rows).float()

    @classmethod
    def build(
        cls,
        source: PatchSource,
        encoder: Encoder,
        *,
        trainable_blocks: int,
        views: AdaptedViews,
        batch_size: int = 64,
        progress: bool = True,
    ) -> ActivationCache:
        """The activations of every patch of ``source`` and view, computed once and then read from the cache.

        Parameters
        ----------
        source
            Where the patches are cut (every spot of the data, held-out slides included: only their
            images are read).
        encoder
            The encoder whose lower part runs (in evaluation mode, on the CPU, in float32).
        trainable_blocks
            Stages left to train (see :class:`TopBlocks`).
        views
            The cached views.
        batch_size
            Patches per forward pass.
        progress
            Show a progress bar.
        """
        from .._cache import atomic_path, cache_dir, make_room, mark_used
        from .._progress import progress_bar
        from ..patches import patch_loader

        lower = LowerBlocks(encoder, trainable_blocks).eval()
        folder = cache_dir("activations")
        key = _cache_key(source, encoder, trainable_blocks, views)
        path = folder / f"{key}.npy"
        made = {
            "encoder": encoder.describe(),
            "trainable_blocks": trainable_blocks,
            "top_state": TopBlocks(encoder, trainable_blocks).state_dict(),
        }
        if path.exists():
            mark_used(path)
            return cls(path, views, **made)
        with torch.inference_mode():
            probe = lower(torch.zeros(1, 3, source.patch_size, source.patch_size, dtype=torch.uint8))
        shape = (len(source), views.n_views, *probe.shape[1:])
        make_room(folder, int(np.prod(shape)) * 2, what="The adapted regime's cached activations")
        tic = time.perf_counter()
        with atomic_path(path) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            loader = patch_loader(source, batch_size=batch_size)
            with (
                torch.inference_mode(),
                progress_bar(total=len(source), desc="lower blocks", disable=not progress) as bar,
            ):
                for batch in loader:
                    indices = batch["index"].numpy()
                    for v, view in enumerate(views.render(batch["image"], indices)):
                        array[indices, v] = lower(view.contiguous()).numpy().astype(np.float16)
                    bar.update(len(indices))
            array.flush()
            del array
        return cls(path, views, seconds=time.perf_counter() - tic, **made)


def _cache_key(source: PatchSource, encoder: Encoder, trainable_blocks: int, views: AdaptedViews) -> str:
    """Hash of what the activations depend on: encoder and weights, split, views, patch geometry and images.

    The images enter through the spot centres (in slide pixels) and the first patch of every slide.
    """
    digest = hashlib.sha1()
    record = {
        "version": _CACHE_VERSION,
        "encoder": encoder.describe(),
        "trainable_blocks": trainable_blocks,
        "views": views.cached_identity(),
        "patches": source.describe(),
    }
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    codes = source.slide_codes
    digest.update(np.ascontiguousarray(codes).tobytes())
    digest.update(np.ascontiguousarray(source.centres, dtype=np.float64).tobytes())
    for code in np.unique(codes):
        digest.update(np.ascontiguousarray(source[int(np.flatnonzero(codes == code)[0])]).tobytes())
    return digest.hexdigest()


def adapted_encoder(description: dict[str, Any]) -> Encoder:
    """An encoder of the architecture of an ``Encoder.describe()`` record (random weights, seeded; loaded afterwards)."""
    stats = {"mean": description["mean"], "std": description["std"]}
    if description.get("timm_name") is None:
        msg = f"The adapted regime needs a named encoder; {description['name']!r} was a custom module."
        raise ValueError(msg)
    return build_encoder(description["name"], weights=None, seed=0, **stats)
