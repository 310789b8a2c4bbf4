"""Measured and predicted expression over the H&E of one slide."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics
from .._validation import spatial_coordinates
from ..tl._predictions import FIT_KEY
from ..tl._scale import SCALES
from ._utils import (
    check_genes,
    finish,
    fit_record,
    has_truth,
    predicted_genes,
    prediction,
    scale_of,
    slide_spots,
    truth,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

#: Inches per panel.
_PANEL_SIZE = 3.6


def _background(adata: AnnData, slide: str) -> tuple[np.ndarray | None, float, float | None]:
    """The slide's hires image (None when absent), its scale factor and the spot diameter (full-res px)."""
    entry = adata.uns.get("spatial", {}).get(slide, {})
    scalefactors = entry.get("scalefactors", {})
    image = entry.get("images", {}).get("hires")
    scale = scalefactors.get("tissue_hires_scalef")
    diameter = scalefactors.get("spot_diameter_fullres")
    diameter = None if diameter is None else float(diameter)
    if image is None or scale is None:
        return None, 1.0, diameter
    return np.asarray(image), float(scale), diameter


def _spot_diameter(centres: np.ndarray) -> float:
    """Spot diameter when unrecorded: the smallest distance between spot centres (touching spots)."""
    from scipy.spatial import cKDTree

    if len(centres) < 2:
        return 1.0
    distances, _ = cKDTree(centres).query(centres, k=2)
    return float(np.median(distances[:, 1]))


def _draw(
    ax: Axes,
    image: np.ndarray | None,
    centres: np.ndarray,
    diameter: float,
    values: np.ndarray,
    *,
    norm: Normalize,
    cmap: str,
) -> Any:
    from matplotlib.collections import EllipseCollection

    if image is not None:
        ax.imshow(image)
    spots = EllipseCollection(
        diameter,
        diameter,
        0.0,
        units="xy",
        offsets=centres,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        linewidths=0,
    )
    spots.set_array(values)
    ax.add_collection(spots)
    low, high = centres.min(axis=0) - diameter, centres.max(axis=0) + diameter
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(high[1], low[1])  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return spots


def colour_limit(value: float | str | None, values: np.ndarray, default: str) -> float:
    """A colour limit: a number, or ``"pNN"`` for the NNth percentile of ``values`` (scanpy's convention)."""
    value = default if value is None else value
    if isinstance(value, str):
        try:
            percentile = float(value.removeprefix("p")) if value.startswith("p") else math.nan
        except ValueError:
            percentile = math.nan
        if not 0 <= percentile <= 100:
            msg = f"A colour limit must be a number or a percentile such as 'p1' or 'p99', got {value!r}."
            raise ValueError(msg)
        return float(np.percentile(values, percentile))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        msg = f"A colour limit must be a number or a percentile such as 'p1' or 'p99', got {value!r}."
        raise ValueError(msg)
    return float(value)


def _panel_axes(ax: Axes | Sequence[Axes] | None, rows: int, columns: int) -> tuple[Figure, np.ndarray, bool]:
    """A ``rows x columns`` grid of axes: the given ones (row by row), or those of a new figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, grid = plt.subplots(
            rows,
            columns,
            figsize=(_PANEL_SIZE * columns + 0.8, _PANEL_SIZE * rows),
            squeeze=False,
            layout="constrained",
        )
        return fig, grid, False
    given = np.asarray(
        [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax)), dtype=object
    )
    if given.size != rows * columns:
        msg = (
            f"`ax` has {given.size} axes but the plot has {rows * columns} panels ({rows} gene(s) x {columns}: "
            f"{'measured and predicted' if columns == 2 else 'predicted'}); pass that many, row by row."
        )
        raise ValueError(msg)
    return given[0].figure, given.reshape(rows, columns), True


def spatial_expression(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    key: str = FIT_KEY,
    slide: str | None = None,
    cmap: str = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
) -> Figure | None:
    """Measured and predicted expression of genes over the H&E of one slide.

    One row per gene: the measured expression and the prediction side by side, each spot a disc of
    the spot's diameter over the slide's ``"hires"`` image, and the gene's PCC on the slide in the
    title. Measured and predicted log-normalised expression share one colour scale per gene, whose
    limits are robust to outliers (1st and 99th percentiles by default); predictions on another scale
    (``scale="standardized"``) get their own. For H&E-only data (no ``uns["log1p"]``), or genes the
    data did not measure, the prediction alone.

    Parameters
    ----------
    adata
        AnnData with predictions of ``key`` (:func:`histo2expr.get.predictions`: out of fold after
        cross-validation, or of :func:`~histo2expr.tl.predict_expression`), spot centres in
        ``obsm["spatial"]`` and, for the background, ``uns["spatial"][slide]["images"]["hires"]``
        with its ``tissue_hires_scalef``.
    genes
        One gene or a list of genes predicted by ``key``.
    key
        The ``key_added`` of the fit (default: that of :func:`~histo2expr.tl.fit_histo2expr`) or of
        the prediction (that of :func:`~histo2expr.tl.predict_expression` is ``"histo2expr_pred"``).
    slide
        The slide to show (may be left out when ``adata`` has one slide).
    cmap
        Colour map of the expression.
    vmin, vmax
        Colour limits: numbers, or percentiles of the values shown per gene, e.g. ``"p1"`` and
        ``"p99"`` (the defaults), as in scanpy.
    ax
        Axes to draw into, one per panel, row by row (2 per gene with measured expression, else
        1); default: a new figure.
    show
        Show the figure; by default when ``ax`` is not given.

    Returns
    -------
    The Figure when not shown, else None. Reads the predictions of ``key``, ``X`` (measured),
    ``obsm["spatial"]`` and ``uns["spatial"][slide]``; without a ``"hires"`` image the spots are
    drawn on a blank background.
    """
    from matplotlib.colors import Normalize

    record = fit_record(adata, key)
    genes = check_genes(genes, predicted_genes(record), key)
    spots, slide = slide_spots(adata, record, slide, pooled=False)
    predicted = prediction(adata, key, genes, spots)
    missing = [g for g, bad in zip(genes, ~np.isfinite(predicted).all(axis=0), strict=True) if bad]
    if missing:
        msg = (
            f"{missing} {'has' if len(missing) == 1 else 'have'} no prediction of {key!r} on slide {slide!r}: "
            "the fold holding that slide out chose other genes. Pick genes of "
            f"`adata.uns[{key!r}]['gene_pcc'][{slide!r}].dropna()`."
        )
        raise ValueError(msg)
    measured_here = has_truth(adata) and all(g in adata.var_names for g in genes)
    measured = truth(adata, genes, spots) if measured_here else None
    scale = scale_of(adata, key)
    shared = scale != SCALES["standardized"]
    image, factor, diameter = _background(adata, slide)
    centres = spatial_coordinates(adata)[spots] * factor
    diameter = _spot_diameter(centres) if diameter is None else diameter * factor
    columns = 1 if measured is None else 2
    fig, grid, ax_given = _panel_axes(ax, len(genes), columns)
    label = "log expression" if shared else "standardised prediction"
    for i, gene in enumerate(genes):
        panels = [predicted[:, i]] if measured is None else [measured[:, i], predicted[:, i]]
        groups = [panels] if shared else [[values] for values in panels]
        artists = []
        for group in groups:
            stacked = np.concatenate(group)
            norm = Normalize(colour_limit(vmin, stacked, "p1"), colour_limit(vmax, stacked, "p99"))
            for values in group:
                artists.append((values, norm))
        for panel, (values, norm) in zip(grid[i], artists, strict=True):
            spots_artist = _draw(panel, image, centres, diameter, values, norm=norm, cmap=cmap)
            if not shared:
                fig.colorbar(spots_artist, ax=panel, shrink=0.8)
        if measured is None:
            grid[i, 0].set_title(f"{gene}: predicted ({key}), slide {slide}")
        else:
            pcc = metrics.gene_pcc(measured[:, i], predicted[:, i])[0]
            grid[i, 0].set_title(f"{gene}: measured, slide {slide}")
            grid[i, 1].set_title(f"{gene}: predicted ({key}), PCC = {pcc:.3f}")
        if shared:
            fig.colorbar(spots_artist, ax=list(grid[i]), shrink=0.8, label=label)
    return finish(fig, show=show, ax_given=ax_given)
