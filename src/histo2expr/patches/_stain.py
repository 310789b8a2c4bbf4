"""H&E stain vectors: optical density, Macenko's estimate and normalisation, HED colour jitter.

In transmitted light, a pixel's optical density ``OD = -log(I / I0)`` (per RGB channel) is the
sum of each stain's concentration times that stain's OD vector (Beer-Lambert). Macenko et al.
(ISBI 2009) estimate the two vectors of haematoxylin and eosin from the tissue pixels of an image;
re-synthesising the same concentrations with reference vectors normalises the stain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Light intensity of the glass (``I0``), as in Macenko's reference implementation.
BACKGROUND = 240.0


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """Optical density ``-log((I + 1) / I0)`` of uint8 RGB ``pixels`` (float64, same shape)."""
    return -np.log((pixels.astype(np.float64) + 1.0) / BACKGROUND)


def from_optical_density(density: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels of an optical density, the inverse of :func:`optical_density` (rounded, clipped)."""
    return np.clip(np.rint(BACKGROUND * np.exp(-density) - 1.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class StainVectors:
    """The haematoxylin and eosin of an image: their OD vectors and how dark they get.

    Attributes
    ----------
    matrix
        ``(3, 2)``: unit optical-density vectors (RGB) of haematoxylin (column 0) and eosin (column 1).
    max_concentrations
        ``(2,)``: the 99th percentile of each stain's concentration over the tissue pixels.
    """

    matrix: np.ndarray
    max_concentrations: np.ndarray

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for records."""
        return {"matrix": self.matrix.tolist(), "max_concentrations": self.max_concentrations.tolist()}


#: The reference stains of Macenko's reference implementation, the target of normalisation.
REFERENCE_STAINS = StainVectors(
    matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_concentrations=np.array([1.9705, 1.0308]),
)


def macenko_stains(
    pixels: np.ndarray, *, min_density: float = 0.15, angle_percentile: float = 1.0
) -> StainVectors:
    """Estimate the stain vectors of H&E pixels with Macenko's method.

    The optical densities of the tissue pixels (every channel above ``min_density``) are
    projected on the plane of their two main principal axes; the directions at the
    ``angle_percentile`` and ``100 - angle_percentile`` percentiles of the angle in that plane
    are the two stains, the one redder in OD (bluer in colour) being haematoxylin.

    Parameters
    ----------
    pixels
        uint8 RGB pixels, any shape ending in 3 (e.g. an image, or many patches).
    min_density
        Pixels with an optical density below this in any channel are background.
    angle_percentile
        Robust extremes of the angle, in percent.

    Returns
    -------
    The stain vectors and the 99th percentiles of the stain concentrations of all pixels.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
        msg = f"Stain estimation needs uint8 RGB pixels (..., 3), got dtype {pixels.dtype} and shape {pixels.shape}."
        raise ValueError(msg)
    density = optical_density(pixels.reshape(-1, 3))
    tissue = density[(density >= min_density).all(axis=1)]
    if len(tissue) < 100:
        msg = (
            f"Only {len(tissue)} of {len(density)} pixels look like stained tissue (optical density above "
            f"{min_density} in every channel); the stains cannot be estimated. Use an image with tissue."
        )
        raise ValueError(msg)
    _, axes = np.linalg.eigh(np.cov(tissue.T))
    plane = axes[:, 1:3]  # the two largest principal axes
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point them into positive densities
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [angle_percentile, 100 - angle_percentile])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    matrix = np.stack([first, second] if first[0] > second[0] else [second, first], axis=1)
    matrix = matrix / np.linalg.norm(matrix, axis=0)
    concentrations = np.linalg.lstsq(matrix, density.T, rcond=None)[0]
    return StainVectors(matrix=matrix, max_concentrations=np.percentile(concentrations, 99, axis=1))


def normalize_stains(
    image: np.ndarray, source: StainVectors, target: StainVectors = REFERENCE_STAINS
) -> np.ndarray:
    """Re-stain ``image`` from its ``source`` stains to the ``target`` stains (Macenko normalisation).

    Each pixel's stain concentrations (least squares on the ``source`` vectors) are rescaled so that
    their 99th percentiles match the target's, and re-synthesised with the ``target`` vectors.

    Parameters
    ----------
    image
        uint8 RGB image ``(..., 3)``.
    source
        The image's stains, e.g. :func:`macenko_stains` of its slide.
    target
        The stains to give it; default the reference of Macenko's implementation.

    Returns
    -------
    The normalised uint8 image, same shape.
    """
    density = optical_density(image.reshape(-1, 3))
    concentrations = np.linalg.lstsq(source.matrix, density.T, rcond=None)[0]
    scale = target.max_concentrations / source.max_concentrations
    restained = target.matrix @ (concentrations * scale[:, None])
    return from_optical_density(restained.T).reshape(image.shape)


def hed_jitter(image: np.ndarray, scales: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Scale and shift the haematoxylin and eosin of an image (HED colour augmentation, Tellez et al. 2018).

    The optical density is unmixed into haematoxylin, eosin and DAB (the residual of an H&E
    image) with the colour deconvolution of Ruifrok & Johnston (``skimage.color.hed_from_rgb``);
    haematoxylin and eosin ``s`` become ``s * scale + shift``, and the stains are mixed back
    (``skimage.color.rgb_from_hed``). Scales of 1 and shifts of 0 return the image unchanged
    (up to rounding).

    Parameters
    ----------
    image
        uint8 RGB image ``(..., 3)``.
    scales, shifts
        Two factors and two optical-density offsets: haematoxylin, eosin.

    Returns
    -------
    The jittered uint8 image, same shape.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    scales = np.append(np.asarray(scales, dtype=np.float64), 1.0)
    shifts = np.append(np.asarray(shifts, dtype=np.float64), 0.0)
    mixing = hed_from_rgb @ np.diag(scales) @ rgb_from_hed
    return from_optical_density(optical_density(image) @ mixing + shifts @ rgb_from_hed)
