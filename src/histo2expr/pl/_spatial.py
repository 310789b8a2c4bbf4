"""Measured and predicted expression over the H&E of one slide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics
from .._validation import spatial_coordinates
from ._utils import (
    check_genes,
    finish,
    fit_record,
    has_truth,
    predicted_genes,
    prediction,
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


def spatial_expression(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    key: str = "histo2expr",
    slide: str | None = None,
    cmap: str = "viridis",
    show: bool | None = None,
) -> Figure | None:
    """Measured and predicted expression of genes over the H&E of one slide.

    One row per gene: the measured expression and the prediction side by side on one colour
    scale, each spot a disc of the spot's diameter over the slide's ``"hires"`` image, and the
    gene's PCC on the slide in the title. For H&E-only data (the AnnData
    :func:`~histo2expr.tl.predict_expression` returns for slides without counts, or any
    AnnData without ``uns["log1p"]``), the prediction alone.

    Parameters
    ----------
    adata
        AnnData with predictions of ``key`` in ``layers[f"{key}_pred"]`` (out-of-fold after
        cross-validation), spot centres in ``obsm["spatial"]`` and, for the background,
        ``uns["spatial"][slide]["images"]["hires"]`` with its ``tissue_hires_scalef``.
    genes
        One gene or a list of genes predicted by ``key``.
    key
        The ``key_added`` of the fit or prediction.
    slide
        The slide to show (may be left out when ``adata`` has one slide).
    cmap
        Colour map of the expression.
    show
        Show the figure (default) or return it.

    Returns
    -------
    The Figure when not shown, else None. Reads ``layers[f"{key}_pred"]``, ``X`` (measured),
    ``obsm["spatial"]`` and ``uns["spatial"][slide]``; without a ``"hires"`` image the spots are
    drawn on a blank background.
    """
    import matplotlib.pyplot as plt
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
    measured = truth(adata, genes, spots) if has_truth(adata) else None
    image, scale, diameter = _background(adata, slide)
    centres = spatial_coordinates(adata)[spots] * scale
    diameter = _spot_diameter(centres) if diameter is None else diameter * scale
    columns = 1 if measured is None else 2
    fig, grid = plt.subplots(
        len(genes),
        columns,
        figsize=(_PANEL_SIZE * columns + 0.8, _PANEL_SIZE * len(genes)),
        squeeze=False,
        layout="constrained",
    )
    for i, gene in enumerate(genes):
        panels = [predicted[:, i]] if measured is None else [measured[:, i], predicted[:, i]]
        stacked = np.concatenate(panels)
        norm = Normalize(float(stacked.min()), float(stacked.max()))
        for ax, values in zip(grid[i], panels, strict=True):
            spots_artist = _draw(ax, image, centres, diameter, values, norm=norm, cmap=cmap)
        if measured is None:
            grid[i, 0].set_title(f"{gene}: predicted ({key}), slide {slide}")
        else:
            pcc = metrics.gene_pcc(measured[:, i], predicted[:, i])[0]
            grid[i, 0].set_title(f"{gene}: measured, slide {slide}")
            grid[i, 1].set_title(f"{gene}: predicted ({key}), PCC = {pcc:.3f}")
        fig.colorbar(spots_artist, ax=list(grid[i]), shrink=0.8, label="log expression")
    return finish(fig, show=show)
