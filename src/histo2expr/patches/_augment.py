"""Training augmentations of H&E patches and the eight symmetries of the square.

Everything random is drawn from an explicit :class:`numpy.random.Generator`, so the
augmentation of a patch is a pure function of the generator's seed; :func:`augment_rng`
derives that seed from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._stain import hed_jitter

if TYPE_CHECKING:
    import torch

#: RGB -> YIQ (luma, two chroma axes); hue and saturation act on the chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def dihedral(
    x: np.ndarray | torch.Tensor, k: int, *, axes: tuple[int, int] = (-2, -1)
) -> np.ndarray | torch.Tensor:
    """Apply the ``k``-th of the eight symmetries of the square to the image axes of ``x``.

    Parameters
    ----------
    x
        Numpy array or torch tensor; ``axes`` are its (height, width) axes.
    k
        0 to 7: rotate by ``k % 4`` quarter turns (counter-clockwise), then mirror left-right when
        ``k >= 4``. ``k = 0`` is the identity.
    axes
        The (height, width) axes: ``(-2, -1)`` for ``(..., C, H, W)`` tensors, ``(0, 1)`` for one
        ``(H, W, C)`` patch, ``(1, 2)`` for an ``(N, H, W, C)`` batch.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < 8:
        msg = f"`k` must be an integer from 0 to 7 (one of the 8 symmetries of the square), got {k!r}."
        raise ValueError(msg)
    if isinstance(x, np.ndarray):
        out = np.rot90(x, k % 4, axes=axes)
        return np.flip(out, axis=axes[1]) if k >= 4 else out
    out = x.rot90(k % 4, dims=axes)
    return out.flip(dims=(axes[1],)) if k >= 4 else out


def dihedral_views(
    batch: np.ndarray | torch.Tensor, *, axes: tuple[int, int] = (-2, -1)
) -> list[np.ndarray | torch.Tensor]:
    """The eight flipped / rotated views of ``batch``, for test-time augmentation.

    Parameters
    ----------
    batch
        Numpy array or torch tensor, e.g. an ``(N, 3, H, W)`` batch of patches.
    axes
        The (height, width) axes of ``batch`` (see :func:`dihedral`).

    Returns
    -------
    ``[dihedral(batch, k, axes=axes) for k in range(8)]``; the first view is ``batch`` itself.
    Averaging a model's predictions over the views makes them invariant to the orientation of
    the slide, e.g. ``torch.stack([model(v) for v in dihedral_views(x)]).mean(0)``.
    """
    return [dihedral(batch, k, axes=axes) for k in range(8)]


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that augments spot ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class Augment:
    """Random flips, 90° rotations, stain jitter and light colour jitter of an ``(H, W, 3)`` uint8 patch.

    Parameters
    ----------
    dihedral
        Apply one of the 8 flips / quarter-turn rotations, uniformly at random.
    stain
        HED stain jitter (Tellez et al. 2018): the haematoxylin and the eosin of the patch
        (:func:`~histo2expr.patches.hed_jitter`) are each scaled by a factor drawn from
        ``[1 - stain, 1 + stain]`` and shifted by an optical density drawn from
        ``[-stain / 10, stain / 10]`` (0 disables). Stain amounts differ by 10-20 % between
        sections (Macenko estimates on the six her2st sections), which ``stain=0.2`` covers.
    brightness, contrast, saturation
        Each is scaled by a factor drawn uniformly from ``[1 - value, 1 + value]`` (0 disables).
    hue
        Hue is rotated by an angle drawn uniformly from ``[-hue, hue]`` turns (0 disables).

    Notes
    -----
    The stain jitter comes first. The other colour changes are linear in RGB: brightness
    multiplies, saturation and hue scale and rotate the chroma plane of YIQ, and contrast moves
    every pixel away from the patch's mean luma; the result is rounded and clipped to 0-255. The
    draws happen in a fixed order (the stain draws after the others, and only with ``stain > 0``,
    so that the other augmentations of a seed do not depend on it), so one generator state gives
    one result.
    """

    dihedral: bool = True
    stain: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02

    def __post_init__(self) -> None:
        for name in ("stain", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                msg = f"`{name}={value}` must be in [0, 1): a factor drawn from [1 - {name}, 1 + {name}]."
                raise ValueError(msg)
        if not 0 <= self.hue <= 0.5:
            msg = f"`hue={self.hue}` must be in [0, 0.5] turns of the colour wheel (H&E needs little, e.g. 0.02)."
            raise ValueError(msg)

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of the ``(H, W, 3)`` uint8 ``patch``."""
        if self.dihedral:
            patch = dihedral(patch, int(rng.integers(8)), axes=(0, 1))
        factors = rng.uniform(-1, 1, size=4) * [self.brightness, self.contrast, self.saturation, self.hue]
        if self.stain > 0:
            scales, shifts = (
                1 + self.stain * rng.uniform(-1, 1, size=2),
                self.stain / 10 * rng.uniform(-1, 1, size=2),
            )
            patch = hed_jitter(patch, scales, shifts)
        if not factors.any():
            return np.ascontiguousarray(patch)
        brightness, contrast, saturation = 1 + factors[:3]
        angle = 2 * np.pi * factors[3]
        cos, sin = np.cos(angle), np.sin(angle)
        chroma = saturation * np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
        chroma[0, 0] = 1.0
        colour = brightness * (_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ)
        pixels = patch.astype(np.float32) @ colour.T.astype(np.float32)
        mean_luma = float((pixels @ _RGB_TO_YIQ[0].astype(np.float32)).mean())
        pixels = (pixels - mean_luma) * contrast + mean_luma
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
