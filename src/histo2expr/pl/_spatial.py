"""Measured and predicted expression over the H&E of one slide."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import metrics
from .._docs import fill_docs
from .._keys import FIT_KEY
from .._records import SCALES
from .._validation import spatial_coordinates
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


def slide_view(adata: AnnData, slide: str, spots: np.ndarray, panels: dict[str, np.ndarray]) -> AnnData:
    """The spots of ``slide`` as squidpy plots them: one ``obs`` column per panel, the slide's image entry.

    The spot diameter, when the slide does not record it, is the median distance between
    neighbouring spot centres (touching spots).
    """
    from anndata import AnnData
    from scipy.spatial import cKDTree

    centres = spatial_coordinates(adata)[spots]
    entry = dict(adata.uns.get("spatial", {}).get(slide, {}))
    scalefactors = dict(entry.get("scalefactors", {}))
    if scalefactors.get("spot_diameter_fullres") is None:
        distances = cKDTree(centres).query(centres, k=2)[0][:, 1] if len(centres) > 1 else np.ones(1)
        scalefactors["spot_diameter_fullres"] = float(np.median(distances))
    entry["scalefactors"] = scalefactors
    view = AnnData(obs=pd.DataFrame(panels, index=adata.obs_names[spots]))
    view.obsm["spatial"] = centres
    view.uns["spatial"] = {slide: entry}
    return view


def scatter(panel: Axes, view: AnnData, slide: str, column: str, *, norm: Normalize, cmap: str) -> Any:
    """Draw ``view.obs[column]`` with squidpy's ``spatial_scatter``; return the discs (for a colour bar).

    Each spot is a disc of the spot's diameter over the slide's ``"hires"`` image (blank without one).
    """
    with warnings.catch_warnings():
        # docrep's notes on squidpy's own docstrings when squidpy is first imported: nothing to act on
        warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
        import squidpy as sq

    entry = view.uns["spatial"][slide]
    sq.pl.spatial_scatter(
        view,
        color=column,
        library_id=slide,
        img="hires" in entry.get("images", {}) and "tissue_hires_scalef" in entry["scalefactors"],
        img_res_key="hires",
        size_key="spot_diameter_fullres",
        cmap=cmap,
        norm=norm,
        colorbar=False,
        frameon=False,
        axis_label="",
        ax=panel,
    )
    return panel.collections[-1]


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


def panel_axes(ax: Axes | Sequence[Axes] | None, rows: int, columns: int) -> tuple[Figure, np.ndarray, bool]:
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
    given = np.asarray([ax] if not isinstance(ax, Sequence | np.ndarray) else ax, dtype=object).ravel()
    if given.size != rows * columns:
        msg = (
            f"`ax` has {given.size} axes but the plot has {rows * columns} panels ({rows} gene(s) x {columns}: "
            f"{'measured and predicted' if columns == 2 else 'predicted'}); pass that many, row by row."
        )
        raise ValueError(msg)
    return given[0].figure, given.reshape(rows, columns), True


@fill_docs
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
    save: bool | str | None = None,
    return_fig: bool = False,
) -> list[Axes] | Figure | None:
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
    {key_param}
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
    {show_save_params}

    Returns
    -------
    {plot_returns} (row by row), else None. Reads the predictions of ``key``, ``X`` (measured),
    ``obsm["spatial"]`` and ``uns["spatial"][slide]``; without a ``"hires"`` image the spots are
    drawn on a blank background.
    """
    from matplotlib.colors import Normalize

    record = fit_record(adata, key)
    genes = check_genes(genes, predicted_genes(record), key)
    spots, slide = slide_spots(adata, record, slide, pooled=False)
    assert slide is not None
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
    shared = scale_of(adata, key) != SCALES["standardized"]
    columns = 1 if measured is None else 2
    fig, grid, ax_given = panel_axes(ax, len(genes), columns)
    panels = {}
    for i, gene in enumerate(genes):
        if measured is not None:
            panels[f"{gene}: measured"] = measured[:, i]
        panels[f"{gene}: predicted"] = predicted[:, i]
    view = slide_view(adata, slide, spots, panels)
    label = "log expression" if shared else "standardised prediction"
    for i, gene in enumerate(genes):
        names = [f"{gene}: predicted"] if measured is None else [f"{gene}: measured", f"{gene}: predicted"]
        groups = [names] if shared else [[name] for name in names]
        for group in groups:
            stacked = np.concatenate([panels[name] for name in group])
            norm = Normalize(colour_limit(vmin, stacked, "p1"), colour_limit(vmax, stacked, "p99"))
            for name in group:
                panel = grid[i, names.index(name)]
                discs = scatter(panel, view, slide, name, norm=norm, cmap=cmap)
                if not shared:
                    fig.colorbar(discs, ax=panel, shrink=0.8, label=label)
        if measured is None:
            grid[i, 0].set_title(f"{gene}: predicted ({key}), slide {slide}")
        else:
            pcc = metrics.gene_pcc(measured[:, i], predicted[:, i])[0]
            grid[i, 0].set_title(f"{gene}: measured, slide {slide}")
            grid[i, 1].set_title(f"{gene}: predicted ({key}), PCC = {pcc:.3f}")
        if shared:
            fig.colorbar(grid[i, 0].collections[-1], ax=list(grid[i]), shrink=0.8, label=label)
    return finish(
        list(grid.ravel()),
        name="spatial_expression",
        show=show,
        save=save,
        return_fig=return_fig,
        ax_given=ax_given,
    )
