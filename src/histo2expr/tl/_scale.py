"""What a prediction is and on which scale, and whether a new slide resembles the training slides.

A model predicts log-normalised expression, ``log1p(counts / library size * target_sum)``, as the
training slides measured it: at *their* sequencing depth. At another depth the same tissue
measures differently on that scale — fewer counts make more zeros, and the mean of the logged
values drops — so levels predicted for a slide sequenced much more shallowly than the training
slides are higher than what that slide measures, while their pattern over the tissue is not
affected. :func:`to_scale` offers two ways out: the expected log-normalised value at the new
slide's depth (Poisson sampling of the predicted expression at that depth), or scores
standardised within each slide.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

#: A slide whose median library size differs from the training slides' by more than this factor is flagged.
DEPTH_RATIO_WARNING = 3.0
#: A slide whose mean optical density differs from every training slide's by more than this fraction is flagged.
COLOUR_DIFFERENCE_WARNING = 0.3
#: Points of the tables that map expression to its expected log-normalised value.
_GRID_POINTS = 600
#: Up to this mean count the expected log-normalised value is summed exactly.
_EXACT_MEAN = 1000.0


def library_sizes(adata: AnnData) -> np.ndarray | None:
    """Counts per spot: ``obs["total_counts"]`` (:func:`histo2expr.pp.normalize`), else ``layers["counts"]``.

    None when neither is there, or when they are not all positive (no genes measured).
    """
    if "total_counts" in adata.obs:
        totals = adata.obs["total_counts"].to_numpy(dtype=np.float64)
    elif "counts" in adata.layers:
        totals = np.asarray(adata.layers["counts"].sum(axis=1), dtype=np.float64).ravel()
    else:
        return None
    return totals if len(totals) and np.all(totals > 0) and np.isfinite(totals).all() else None


def target_sum(adata: AnnData) -> float | None:
    """The counts per spot that ``X`` was normalised to, read off ``X`` and ``layers["counts"]`` (None without)."""
    totals = library_sizes(adata)
    if totals is None or "counts" not in adata.layers or "log1p" not in adata.uns:
        return None
    rows = np.arange(min(adata.n_obs, 200))
    counts = adata.layers["counts"][rows]
    logged = adata.X[rows]
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    logged = logged.toarray() if sp.issparse(logged) else np.asarray(logged)
    positive = counts > 0
    if not positive.any():
        return None
    ratio = np.expm1(logged[positive]) * np.broadcast_to(totals[rows, None], counts.shape)[positive]
    return float(np.median(ratio / counts[positive]))


def _colour_of_spots(entry: Mapping[str, Any], centres: np.ndarray) -> np.ndarray | None:
    """Mean optical density (R, G, B) of the hires image over boxes of one spot diameter around the spots."""
    images = entry.get("images", {}) if isinstance(entry, Mapping) else {}
    factors = entry.get("scalefactors", {}) if isinstance(entry, Mapping) else {}
    image, scale = images.get("hires"), factors.get("tissue_hires_scalef")
    if image is None or not scale or len(centres) == 0:
        return None
    density = -np.log10((np.asarray(image, dtype=np.float64)[..., :3] + 1.0) / 256.0)
    height, width = density.shape[:2]
    integral = np.zeros((height + 1, width + 1, 3))
    integral[1:, 1:] = density.cumsum(0).cumsum(1)
    half = max(1, round(float(factors.get("spot_diameter_fullres") or 0.0) * float(scale) / 2))
    x, y = np.rint(np.asarray(centres, dtype=np.float64) * float(scale)).astype(int).T
    top, bottom = np.clip(y - half, 0, height), np.clip(y + half + 1, 0, height)
    left, right = np.clip(x - half, 0, width), np.clip(x + half + 1, 0, width)
    area = ((bottom - top) * (right - left))[:, None]
    inside = area[:, 0] > 0
    if not inside.any():
        return None
    sums = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
    return (sums[inside] / area[inside]).mean(axis=0)


def slide_statistics(adata: AnnData, slides: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per slide: median library size (when counts are known) and mean optical density of its spots (when imaged)."""
    from ._data import coordinates

    totals = library_sizes(adata)
    centres = coordinates(adata)
    spatial = adata.uns.get("spatial") or {}
    out: dict[str, dict[str, Any]] = {}
    for slide in dict.fromkeys(slides):
        on_slide = slides == slide
        stats: dict[str, Any] = {}
        if totals is not None:
            stats["library_size"] = float(np.median(totals[on_slide]))
        colour = (
            _colour_of_spots(spatial.get(slide, {}), centres[on_slide]) if "spatial" in adata.obsm else None
        )
        if colour is not None:
            stats["colour_od"] = [float(c) for c in colour]
        out[str(slide)] = stats
    return out


def training_statistics(adata: AnnData, slides: np.ndarray) -> dict[str, Any]:
    """What a model keeps of its training slides to judge new ones: per-slide statistics and the depth."""
    per_slide = slide_statistics(adata, slides)
    totals = library_sizes(adata)
    return {
        "slides": per_slide,
        "library_size": None if totals is None else float(np.median(totals)),
        "target_sum": target_sum(adata),
    }


def warn_if_unlike_training(
    adata: AnnData, slides: np.ndarray, training: Mapping[str, Any] | None, *, scale: str = "training"
) -> None:
    """Warn when a slide's depth (at the ``"training"`` scale) or colour is far from every training slide's.

    The thresholds are :data:`DEPTH_RATIO_WARNING` and :data:`COLOUR_DIFFERENCE_WARNING`.
    """
    if not training:
        return
    known = training.get("slides") or {}
    depth = training.get("library_size")
    train_colours = [np.asarray(s["colour_od"]) for s in known.values() if "colour_od" in s]
    for slide, stats in slide_statistics(adata, slides).items():
        size = stats.get("library_size")
        if scale == "training" and depth and size and max(size / depth, depth / size) > DEPTH_RATIO_WARNING:
            msg = (
                f"Slide {slide!r} was sequenced at a median of {size:,.0f} counts per spot, {max(size / depth, depth / size):.1f}x "
                f"{'fewer' if size < depth else 'more'} than the training slides ({depth:,.0f}). Predictions are "
                "log-normalised expression at the training slides' depth, so their levels are not this slide's: "
                "compare patterns, not levels, or pass `scale='depth'` (this slide's depth) or `scale='standardized'`."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
        colour = stats.get("colour_od")
        if colour is None or not train_colours:
            continue
        differences = [np.max(np.abs(np.asarray(colour) - c) / np.maximum(c, 1e-3)) for c in train_colours]
        if min(differences) > COLOUR_DIFFERENCE_WARNING:
            msg = (
                f"The H&E of slide {slide!r} differs in colour from every training slide (mean optical density "
                f"{np.round(colour, 3).tolist()}, {100 * min(differences):.0f}% away from the closest). Stain and "
                "scanner differences change what an image encoder sees; treat its predictions with care, or "
                "normalise the stain before embedding."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)


@functools.lru_cache(maxsize=16)
def _expected_log_table(depth: float, target: float) -> tuple[np.ndarray, np.ndarray]:
    """``(x, E[log1p(K target / depth)])`` for K ~ Poisson(x depth / target), on a grid of expression x.

    ``x`` is expression per ``target`` counts. The expectation is summed over K up to a mean of
    :data:`_EXACT_MEAN` counts and taken to second order beyond (error below 1e-6 there).
    """
    from scipy.special import gammaln

    grid = np.concatenate([[0.0], np.logspace(-4, math.log10(50 * target), _GRID_POINTS)])
    scale = target / depth
    expected = np.zeros_like(grid)
    for i, x in enumerate(grid[1:], start=1):
        mean = x / scale
        if mean > _EXACT_MEAN:
            level = mean * scale
            expected[i] = math.log1p(level) - mean * scale**2 / (2.0 * (1.0 + level) ** 2)
            continue
        spread = 12.0 * math.sqrt(mean) + 12.0
        k = np.arange(max(0, math.floor(mean - spread)), math.ceil(mean + spread) + 1, dtype=np.float64)
        pmf = np.exp(k * math.log(mean) - mean - gammaln(k + 1.0))
        expected[i] = float(np.sum(pmf * np.log1p(k * scale)))
    return grid, np.maximum.accumulate(expected)


def match_depth(predicted: np.ndarray, *, training_depth: float, depth: float, target: float) -> np.ndarray:
    """Predicted log-normalised expression at ``training_depth`` re-expressed at ``depth`` (median counts per spot).

    Inverts the expected log-normalised value at the training depth to the expression it implies,
    then takes that expression's expected log-normalised value at ``depth`` (Poisson sampling).
    """
    grid, at_training = _expected_log_table(training_depth, target)
    _, at_depth = _expected_log_table(depth, target)
    expression = np.interp(np.clip(predicted, 0.0, None), at_training, grid)
    return np.interp(expression, grid, at_depth).astype(np.float32)


def check_depth_inputs(
    adata: AnnData, training: Mapping[str, Any] | None, library_size: float | None
) -> np.ndarray | None:
    """Check what ``scale="depth"`` needs; return the library size of every spot (None when given as a number)."""
    training = training or {}
    if not training.get("library_size") or not training.get("target_sum"):
        msg = (
            "`scale='depth'` needs the training slides' depth, which this model does not record: fit it on data "
            "normalised with `hx.pp.normalize` (which keeps `layers['counts']`), or use `scale='standardized'`."
        )
        raise ValueError(msg)
    if library_size is not None:
        if (
            isinstance(library_size, bool)
            or not isinstance(library_size, int | float)
            or not library_size > 0
        ):
            msg = f"`library_size` must be a positive number of counts per spot, got {library_size!r}."
            raise ValueError(msg)
        return None
    sizes = library_sizes(adata)
    if sizes is None:
        msg = (
            "`scale='depth'` needs this slide's sequencing depth: normalise its counts with `hx.pp.normalize` "
            "(which records `obs['total_counts']`), or pass `library_size=` with the median counts per spot "
            "its assay gives."
        )
        raise ValueError(msg)
    return sizes


def to_scale(
    predicted: np.ndarray,
    slides: np.ndarray,
    *,
    scale: str,
    adata: AnnData,
    training: Mapping[str, Any] | None,
    library_size: float | None,
) -> np.ndarray:
    """``predicted`` (log-normalised at the training depth) on ``scale``, slide by slide (see ``SCALES``)."""
    if scale == "training":
        return predicted
    out = np.empty_like(predicted, dtype=np.float32)
    if scale == "standardized":
        for slide in dict.fromkeys(slides):
            rows = slides == slide
            values = predicted[rows].astype(np.float64)
            spread = values.std(axis=0)
            out[rows] = np.where(
                spread > 0, (values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0), 0.0
            )
        return out
    sizes = check_depth_inputs(adata, training, library_size)  # None when `library_size` is given
    recorded = training or {}  # its depth is checked above
    for slide in dict.fromkeys(slides):
        rows = slides == slide
        depth = float(cast("float", library_size)) if sizes is None else float(np.median(sizes[rows]))
        out[rows] = match_depth(
            predicted[rows],
            training_depth=float(recorded["library_size"]),
            depth=depth,
            target=float(recorded["target_sum"]),
        )
    return out
