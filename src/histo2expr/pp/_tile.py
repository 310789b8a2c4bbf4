"""Pseudo-spots on the tissue of an H&E-only slide: the input of virtual spatial transcriptomics."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._keys import Key
from .._validation import one_of

#: Spot diameter (µm) when neither the argument nor ``geometry`` gives one: a Visium spot.
DEFAULT_SPOT_DIAMETER_UM = 55.0
#: Otsu thresholds of saturation below this (0-1) are raised to it: blank glass has no second class.
MIN_SATURATION = 0.05
#: Points sampled per axis over a spot's square to measure the tissue fraction of its disk.
_SAMPLES_PER_AXIS = 8
#: Spots whose tissue fraction is measured at a time.
_FRACTION_CHUNK = 16384
#: Relative difference of pixel sizes tolerated between the training patches and the slide.
_MPP_TOLERANCE = 0.02


def _otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: values above it form the brighter class."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weights = np.cumsum(histogram) / histogram.sum()
    means = np.cumsum(histogram * np.arange(256)) / histogram.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (means[-1] * weights - means) ** 2 / (weights * (1.0 - weights))
    return int(np.argmax(np.nan_to_num(between)))


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an RGB uint8 image, as uint8 0-255 (0 where black)."""
    rgb = image.astype(np.int16)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0).astype(np.uint8)


def otsu_tissue_mask(image: np.ndarray, *, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue of a low-resolution RGB image: saturation above a threshold, closed, holes filled.

    Parameters
    ----------
    image
        ``(h, w, 3)`` uint8 image (e.g. the ``hires`` image).
    threshold
        Saturation threshold in [0, 1]; default Otsu's threshold, at least ``MIN_SATURATION`` (0.05).

    Returns
    -------
    The boolean ``(h, w)`` mask and the threshold used.
    """
    from scipy import ndimage

    values = saturation(image)
    if threshold is None:
        threshold = max((_otsu(values) + 0.5) / 255.0, MIN_SATURATION)
    mask = values > threshold * 255.0
    mask = ndimage.binary_closing(mask, iterations=1, border_value=0) | mask
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_opening(mask, iterations=1), float(threshold)


def _positive(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.number)
        or not (np.isfinite(value) and value > 0)
    ):
        msg = f"`{name}` must be a positive number of micrometres, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _lattice(
    size: tuple[int, int], radius: float, spacing: float, layout: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and centres (x, y) of a lattice of spots lying wholly inside an image, centred."""
    height, width = size
    row_pitch = spacing * np.sqrt(3) / 2 if layout == "hex" else spacing
    shift = spacing / 2 if layout == "hex" else 0.0
    n_rows = int(np.floor((height - 2 * radius) / row_pitch)) + 1 if height >= 2 * radius else 0
    n_cols = int(np.floor((width - 2 * radius - shift) / spacing)) + 1 if width >= 2 * radius + shift else 0
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    rows, cols = rows.ravel(), cols.ravel()
    x = radius + cols * spacing + shift * (rows % 2)
    y = radius + rows * row_pitch
    if len(x):  # centre the lattice: equal margins on both sides
        x += (width - x.max() - x.min()) / 2
        y += (height - y.max() - y.min()) / 2
    return rows, cols, np.column_stack([x, y])


def _tissue_fraction(mask: np.ndarray, scale: float, centres: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each spot's disk on the mask (``scale``: mask pixels per full-resolution pixel)."""
    steps = (np.arange(_SAMPLES_PER_AXIS) + 0.5) / _SAMPLES_PER_AXIS * 2 - 1
    gx, gy = np.meshgrid(steps, steps)
    inside = gx**2 + gy**2 <= 1
    dx, dy = gx[inside] * radius, gy[inside] * radius
    height, width = mask.shape
    out = np.empty(len(centres), dtype=np.float32)
    for start in range(0, len(centres), _FRACTION_CHUNK):
        block = centres[start : start + _FRACTION_CHUNK]
        x = np.clip(np.floor((block[:, :1] + dx) * scale).astype(np.int64), 0, width - 1)
        y = np.clip(np.floor((block[:, 1:] + dy) * scale).astype(np.int64), 0, height - 1)
        out[start : start + len(block)] = mask[y, x].mean(axis=1)
    return out


def _slide_entry(
    data: AnnData | str | Path, slide: str | None, mpp: float | None, level: int | None
) -> tuple[str, dict]:
    """The slide id and its ``uns["spatial"]`` entry, read from ``data`` (an AnnData or a slide file)."""
    from ..io import read_wsi

    if isinstance(data, str | Path):
        data = read_wsi(data, mpp=mpp, level=level, slide=slide)
        slide = None
    elif not isinstance(data, AnnData):
        msg = f"`data` must be an AnnData (e.g. from `hx.io.read_wsi`) or a slide file path, got {type(data).__name__}."
        raise TypeError(msg)
    elif mpp is not None or level is not None:
        msg = (
            "`mpp` and `level` apply when `data` is a file path; an AnnData records them in "
            "`uns['spatial'][slide]`. Pass them to `hx.io.read_wsi` instead."
        )
        raise ValueError(msg)
    spatial = data.uns.get("spatial", {})
    if slide is None:
        if len(spatial) != 1:
            msg = (
                f"`data.uns['spatial']` has {len(spatial)} slides ({sorted(spatial)}); pass `slide=` with the one "
                "to tile (tile several slides one by one and concatenate with anndata.concat)."
            )
            raise ValueError(msg)
        slide = next(iter(spatial))
    if slide not in spatial:
        msg = f"Slide {slide!r} is not in `data.uns['spatial']`; its slides are {sorted(spatial)}."
        raise KeyError(msg)
    entry = spatial[slide]
    if "source_image_path" not in entry.get("metadata", {}):
        msg = (
            f"Slide {slide!r} has no full-resolution image (`uns['spatial'][{slide!r}]['metadata']"
            "['source_image_path']`); read the slide with `hx.io.read_wsi(path)` first."
        )
        raise KeyError(msg)
    if "microns_per_pixel" not in entry.get("scalefactors", {}):
        msg = (
            f"Slide {slide!r} has no `scalefactors['microns_per_pixel']`, so spots cannot be sized in µm; "
            "read it with `hx.io.read_wsi(path, mpp=...)`."
        )
        raise KeyError(msg)
    return str(slide), entry


def _check_geometry(geometry: Any) -> Mapping[str, Any]:
    """``geometry`` as a mapping (``{}`` for None), refusing anything else with the fix."""
    if geometry is None:
        return {}
    if not isinstance(geometry, Mapping):
        msg = (
            f"`geometry` must be a mapping of the training patch geometry such as a fitted model's "
            f"`model.patches` (spot_diameter_um, spot_spacing_um, mpp, patch_size), got {type(geometry).__name__}; "
            "pass `geometry=model.patches`."
        )
        raise TypeError(msg)
    return geometry


def _check_patch_scale(geometry: Mapping[str, Any], slide_mpp: float, slide: str) -> None:
    model_mpp, patch_size = geometry.get("mpp"), geometry.get("patch_size")
    if model_mpp and abs(model_mpp / slide_mpp - 1) > _MPP_TOLERANCE:
        warnings.warn(
            f"The model was trained on patches at {model_mpp:.4g} µm/px and slide {slide!r} has {slide_mpp:.4g} µm/px: "
            f"embed with `hx.tl.embed_patches(tiles, mpp={model_mpp:.4g}, patch_size={patch_size}, encoder=...)`, "
            f"which resamples the slide's patches by {model_mpp / slide_mpp:.3g}x; `predict_expression` refuses "
            "features embedded at another scale.",
            UserWarning,
            stacklevel=3,
        )


def tile_slide(
    data: AnnData | str | Path,
    *,
    spot_diameter_um: float | None = None,
    spacing_um: float | None = None,
    layout: Literal["hex", "grid"] = "hex",
    tissue_mask: Literal["otsu"] | np.ndarray | None = "otsu",
    saturation_threshold: float | None = None,
    min_tissue_fraction: float = 0.5,
    geometry: Mapping[str, Any] | None = None,
    slide: str | None = None,
    mpp: float | None = None,
    level: int | None = None,
) -> AnnData:
    """Place pseudo-spots on the tissue of an H&E slide, ready for embedding and expression prediction.

    Spots of ``spot_diameter_um`` are laid out on a hexagonal (Visium-like) or square lattice of
    pitch ``spacing_um`` over the whole slide, each wholly inside the image; those whose disk is at
    least ``min_tissue_fraction`` tissue are kept. The tissue is found on the slide's downscaled
    ``hires`` image: saturation above Otsu's threshold (H&E is coloured, glass is grey), closed and
    with holes filled. No full-resolution pixel is read here.

    Parameters
    ----------
    data
        A slide from :func:`histo2expr.io.read_wsi` (or any AnnData of the data model with a
        full-resolution image), or the path of a slide file (read with ``read_wsi``).
    spot_diameter_um
        Diameter of the pseudo-spots in µm; default ``geometry["spot_diameter_um"]`` when given,
        else 55 (Visium).
    spacing_um
        Centre-to-centre distance in µm; default ``geometry["spot_spacing_um"]``, else the
        diameter (touching spots, the tissue covered without gaps).
    layout
        ``"hex"``: rows offset by half a pitch, ``sqrt(3) / 2`` pitch apart (6 neighbours, like
        Visium); ``"grid"``: a square lattice (4 neighbours).
    tissue_mask
        ``"otsu"``: the saturation threshold above; a boolean array of any resolution covering the
        whole slide (same aspect ratio, True on tissue); ``None``: tile the whole slide.
    saturation_threshold
        With ``tissue_mask="otsu"``: the saturation threshold in [0, 1] instead of Otsu's
        (which is never below 0.05).
    min_tissue_fraction
        Minimum fraction of a spot's disk on tissue, in (0, 1].
    geometry
        The micrometre geometry of the training data, e.g. the ``patches`` a fitted
        :class:`~histo2expr.tl.Histo2ExprModel` records (``geometry=model.patches``): spot size
        (``"spot_diameter_um"``) and spacing (``"spot_spacing_um"``) default to it, and a warning
        names the ``embed_patches`` call when its patches (``"mpp"``, ``"patch_size"``) were cut at
        another pixel size than the slide's.
    slide
        Slide of ``data.uns["spatial"]`` to tile (needed when it has several); for a path, the slide id.
    mpp, level
        For a path only: passed to :func:`~histo2expr.io.read_wsi`.

    Returns
    -------
    A new AnnData with one row per pseudo-spot and no genes, named ``"{slide}_{row}x{col}"``:

    ``.obs["slide"]``, ``.obs["array_row"]``, ``.obs["array_col"]``
        Slide (categorical) and lattice position of each spot.
    ``.obs["tissue_fraction"]``
        Fraction of the spot's disk on tissue.
    ``.obsm["spatial"]``
        Spot centres (x, y) in full-resolution pixels.
    ``.uns["spatial"][slide]``
        The slide's entry with ``spot_diameter_fullres`` and ``spot_spacing_fullres`` set.
    ``.uns["tile_slide"]["params"]``
        The tiling parameters, including the saturation threshold used.

    Examples
    --------
    >>> tiles = hx.pp.tile_slide("slide.svs", geometry=model.patches)  # doctest: +SKIP
    >>> hx.tl.embed_patches(tiles, encoder="efficientnet_lite0", mpp=model.patches["mpp"])  # doctest: +SKIP
    >>> hx.tl.predict_expression(tiles, model)  # doctest: +SKIP
    >>> virtual = hx.get.predicted_adata(tiles)  # doctest: +SKIP
    """
    from ..io import open_slide_image

    geometry = _check_geometry(geometry)
    slide, entry = _slide_entry(data, slide, mpp, level)
    spot_diameter_um = _positive(
        spot_diameter_um
        if spot_diameter_um is not None
        else geometry.get("spot_diameter_um", DEFAULT_SPOT_DIAMETER_UM),
        "spot_diameter_um",
    )
    spacing_um = _positive(
        spacing_um if spacing_um is not None else geometry.get("spot_spacing_um", spot_diameter_um),
        "spacing_um",
    )
    one_of(layout, ("hex", "grid"), "layout")
    if isinstance(min_tissue_fraction, bool) or not 0 < min_tissue_fraction <= 1:
        msg = f"`min_tissue_fraction` must be in (0, 1], got {min_tissue_fraction!r}."
        raise ValueError(msg)
    metadata, scalefactors = entry["metadata"], entry["scalefactors"]
    slide_mpp = float(scalefactors["microns_per_pixel"])
    _check_patch_scale(geometry, slide_mpp, slide)
    image = open_slide_image(metadata["source_image_path"], level=int(metadata.get("source_image_level", 0)))
    size = image.shape
    radius, spacing = spot_diameter_um / slide_mpp / 2, spacing_um / slide_mpp
    rows, cols, centres = _lattice(size, radius, spacing, layout)
    if len(centres) == 0:
        msg = (
            f"Slide {slide!r} ({size[1]} x {size[0]} px at {slide_mpp:.4g} µm/px) is smaller than one "
            f"{spot_diameter_um:g} µm spot; lower `spot_diameter_um`."
        )
        raise ValueError(msg)
    threshold = None
    if isinstance(tissue_mask, str) and tissue_mask == "otsu":
        hires = entry["images"]["hires"]
        mask, threshold = otsu_tissue_mask(hires, threshold=saturation_threshold)
        mask_scale = hires.shape[1] / size[1]
    elif tissue_mask is None:
        mask, mask_scale = np.ones((1, 1), dtype=bool), 0.0
    else:
        mask = np.asarray(tissue_mask)
        if mask.ndim != 2 or mask.dtype != bool:
            msg = f"`tissue_mask` must be 'otsu', None or a 2-D boolean array, got {mask.dtype} of shape {mask.shape}."
            raise ValueError(msg)
        mask_scale = mask.shape[1] / size[1]
        if abs(mask.shape[0] - size[0] * mask_scale) > max(1.0, mask_scale):
            msg = (
                f"`tissue_mask` of shape {mask.shape} does not have the aspect ratio of slide {slide!r} "
                f"({size[0]} x {size[1]} px, height x width); it must cover the whole slide at any resolution."
            )
            raise ValueError(msg)
    fraction = _tissue_fraction(mask, mask_scale, centres, radius)
    keep = fraction >= min_tissue_fraction
    if not keep.any():
        how = (
            f"the saturation threshold {threshold:.3f} ("
            + ("given" if saturation_threshold is not None else f"Otsu's, at least {MIN_SATURATION}")
            + f"; tissue covers {mask.mean():.1%} of the hires image)"
            if threshold is not None
            else "the given `tissue_mask`"
        )
        msg = (
            f"No tissue found on slide {slide!r}: none of {len(centres)} pseudo-spots of {spot_diameter_um:g} µm "
            f"has {min_tissue_fraction:.0%} of its area on tissue by {how}. Pass a lower "
            "`saturation_threshold=`, a lower `min_tissue_fraction=`, your own boolean `tissue_mask=`, or "
            "`tissue_mask=None` to tile the whole slide."
        )
        raise ValueError(msg)
    rows, cols, centres, fraction = rows[keep], cols[keep], centres[keep], fraction[keep]
    obs = pd.DataFrame(
        {
            "slide": pd.Categorical([slide] * len(rows), categories=[slide]),
            "array_row": rows.astype(np.int64),
            "array_col": cols.astype(np.int64),
            "tissue_fraction": fraction,
        },
        index=pd.Index([f"{slide}_{r}x{c}" for r, c in zip(rows, cols, strict=True)]),
    )
    out = AnnData(X=sp.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs)
    out.obsm[Key.obsm.spatial] = centres.astype(np.float64)
    tiled = copy.deepcopy(entry)
    tiled["scalefactors"]["spot_diameter_fullres"] = 2 * radius
    tiled["scalefactors"]["spot_spacing_fullres"] = spacing
    out.uns[Key.uns.spatial] = {slide: tiled}
    out.uns[Key.uns.tile_slide] = {
        "params": {
            "spot_diameter_um": spot_diameter_um,
            "spacing_um": spacing_um,
            "layout": layout,
            "tissue_mask": tissue_mask
            if isinstance(tissue_mask, str)
            else "none"
            if tissue_mask is None
            else "array",
            "saturation_threshold": np.nan if threshold is None else threshold,
            "min_tissue_fraction": float(min_tissue_fraction),
            "n_candidates": len(keep),
        }
    }
    return out
