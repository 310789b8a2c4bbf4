"""Which predictions can be trusted: interval coverage, uncertainty over the H&E, per-gene predictability."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._docs import fill_docs
from .._keys import FIT_KEY, Key
from .._records import gene_scores
from .._validation import one_of, positive_int
from ..get import intervals
from ._spatial import colour_limit, panel_axes, scatter, slide_view
from ._utils import axes, check_genes, finish, fit_record, predicted_genes, protocol_of, slide_spots, titled

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: What :func:`spatial_uncertainty` can show, and the colour bar label of each.
UNCERTAINTY = {
    "width": "interval width (log expression)",
    "ood": "out-of-distribution score, -log10 p",
    "difficulty": "distance to training spots (1 = typical)",
}


@fill_docs
def interval_coverage(
    adata: AnnData,
    key: str = FIT_KEY,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Empirical coverage of the prediction intervals on every held-out slide against the nominal level.

    One column per held-out slide: the coverage of every gene (dots), their mean (a black bar) and
    the nominal level (a dashed line).

    Parameters
    ----------
    adata
        AnnData cross-validated with intervals (``hx.tl.fit_histo2expr(..., cv=..., intervals=True)``).
    key
        The ``key_added`` of the fit.
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``uns[key]["interval_coverage"]`` and ``uns[key]["intervals"]``.
    """
    record = fit_record(adata, key, need=("gene_pcc",))
    if "interval_coverage" not in record:
        msg = (
            f"`adata.uns[{key!r}]` has no interval coverage: cross-validate with intervals, "
            f"`hx.tl.fit_histo2expr(adata, cv=..., intervals=True, key_added={key!r})`."
        )
        raise KeyError(msg)
    coverage = record["interval_coverage"].rename(columns=str)
    level = float(record["intervals"]["level"])
    given = ax is not None
    ax = axes(ax, (max(3.0, 0.7 * coverage.shape[1] + 1.5), 3.2))
    rng = np.random.default_rng(0)
    for i, slide in enumerate(coverage.columns):
        values = coverage[slide].dropna().to_numpy()
        ax.scatter(
            i + rng.uniform(-0.2, 0.2, len(values)), values, s=6, alpha=0.4, color="tab:blue", linewidths=0
        )
        ax.plot([i - 0.3, i + 0.3], [values.mean()] * 2, color="black", linewidth=2)
    ax.axhline(level, color="tab:red", linestyle="--", linewidth=1, label=f"nominal {level:g}")
    ax.set_xticks(range(coverage.shape[1]), coverage.columns, rotation=90)
    ax.set_xlabel("held-out slide")
    ax.set_ylabel("empirical coverage per gene")
    ax.set_ylim(min(0.0, float(np.nanmin(coverage.to_numpy())) - 0.02), 1.02)
    ax.legend(loc="lower right", frameon=False)
    ax.set_title(titled(f"{key}: interval coverage", [protocol_of(adata, key)]))
    return finish(ax, name="interval_coverage", show=show, save=save, return_fig=return_fig, ax_given=given)


def _uncertainty_values(
    adata: AnnData, key: str, value: str, gene: str | None, spots: np.ndarray
) -> tuple[np.ndarray, str]:
    """The values :func:`spatial_uncertainty` draws on ``spots`` and the title's name of them."""
    if value == "width":
        lower, upper = intervals(adata, key)
        if gene is not None:
            return (upper[gene] - lower[gene]).to_numpy()[spots], f"{gene}: interval width"
        width = (upper - lower).iloc[spots]
        return width.mean(axis=1, skipna=True).to_numpy(), "mean interval width over genes"
    column = Key.obs.ood_pvalue(key) if value == "ood" else Key.obs.difficulty(key)
    if column not in adata.obs:
        msg = (
            f"`adata.obs[{column!r}]` is missing: it is written by `hx.tl.predict_expression` and by "
            "`hx.tl.fit_histo2expr(..., cv=..., intervals=True)`."
        )
        raise KeyError(msg)
    values = adata.obs[column].to_numpy(dtype=np.float64)[spots]
    return (-np.log10(values), "out-of-distribution score") if value == "ood" else (values, "difficulty")


@fill_docs
def spatial_uncertainty(
    adata: AnnData,
    gene: str | None = None,
    *,
    key: str = FIT_KEY,
    value: str = "width",
    slide: str | None = None,
    cmap: str = "magma",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Uncertainty of the predictions over the H&E of one slide: interval width or out-of-distribution score.

    Parameters
    ----------
    adata
        AnnData with the results of ``key``: intervals (``value="width"``) or out-of-distribution scores.
    gene
        ``value="width"``: the gene whose interval width is shown; None shows the mean over the genes.
    key
        The ``key_added`` of the fit or prediction.
    value
        ``"width"`` (upper minus lower bound), ``"ood"`` (``-log10`` of the out-of-distribution p-value:
        1.3 is p = 0.05) or ``"difficulty"`` (distance to the training spots relative to an unseen
        training slide's median).
    slide
        The slide to show (may be left out when ``adata`` has one slide).
    cmap
        Colour map.
    vmin, vmax
        Colour limits: numbers, or percentiles such as ``"p1"`` and ``"p99"`` (the defaults).
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``obsm[f"{key}_lower"]`` / ``obsm[f"{key}_upper"]``
    (:func:`histo2expr.get.intervals`) or ``obs[f"{key}_ood_pvalue"]`` / ``obs[f"{key}_difficulty"]``,
    ``obsm["spatial"]`` and ``uns["spatial"][slide]``.
    """
    from matplotlib.colors import Normalize

    one_of(value, UNCERTAINTY, "value")
    record = fit_record(adata, key)
    if gene is not None:
        gene = check_genes(gene, predicted_genes(record), key)[0]
    spots, slide = slide_spots(adata, record, slide, pooled=False)
    values, name = _uncertainty_values(adata, key, value, gene, spots)
    if not np.isfinite(values).any():
        msg = f"{name} has no value on slide {slide!r} under key {key!r} (a fold that did not predict {gene!r}?)."
        raise ValueError(msg)
    assert slide is not None  # pooled=False names the slide
    fig, grid, given = panel_axes(ax, 1, 1)
    panel = grid[0, 0]
    finite = values[np.isfinite(values)]
    norm = Normalize(colour_limit(vmin, finite, "p1"), colour_limit(vmax, finite, "p99"))
    discs = scatter(panel, slide_view(adata, slide, spots, {name: values}), slide, name, norm=norm, cmap=cmap)
    fig.colorbar(discs, ax=panel, shrink=0.8, label=UNCERTAINTY[value])
    panel.set_title(f"{name} ({key}), slide {slide}")
    return finish(
        panel, name="spatial_uncertainty", show=show, save=save, return_fig=return_fig, ax_given=given
    )


@fill_docs
def gene_predictability(
    adata: AnnData,
    key: str = FIT_KEY,
    *,
    n_genes: int = 30,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Genes ranked by their cross-validated PCC, with its 95% confidence interval over held-out slides.

    Genes whose interval lies above zero (``predictable``) are drawn in colour, the others in grey.

    Parameters
    ----------
    adata
        AnnData cross-validated by :func:`~histo2expr.tl.fit_histo2expr` (``cv=...``), or with
        predictions of a model that was.
    key
        The ``key_added`` of the fit or prediction.
    n_genes
        The best genes shown (all with a larger number).
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``uns[key]["gene_pcc"]`` (cross-validation) or
    ``uns[key]["cv_pcc"]`` (predictions).
    """
    positive_int(n_genes, "n_genes")
    record = fit_record(adata, key)
    scores = gene_scores(record, predicted_genes(record)).dropna(subset=["cv_pcc"])
    if scores.empty:
        msg = (
            f"Key {key!r} has no cross-validated PCC per gene: fit with `cv=` (or predict with a model that was "
            "cross-validated)."
        )
        raise KeyError(msg)
    scores = scores.sort_values("cv_pcc", ascending=False).head(n_genes)
    given = ax is not None
    ax = axes(ax, (4.0, 0.6 + 0.18 * len(scores)))
    positions = np.arange(len(scores))[::-1]
    errors = np.vstack([scores["cv_pcc"] - scores["cv_pcc_low"], scores["cv_pcc_high"] - scores["cv_pcc"]])
    for flag, colour, label in (
        (True, "tab:blue", "CI above 0"),
        (False, "tab:grey", "not distinguishable from 0"),
    ):
        chosen = (scores["predictable"] == flag).to_numpy()
        if chosen.any():
            ax.errorbar(
                scores["cv_pcc"].to_numpy()[chosen],
                positions[chosen],
                xerr=np.nan_to_num(errors[:, chosen]),
                fmt="o",
                color=colour,
                markersize=3,
                capsize=2,
                label=label,
            )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(positions, scores.index)
    ax.set_xlabel("held-out PCC (95% CI over slides)")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(titled(f"{key}: gene predictability", [protocol_of(adata, key)]))
    return finish(ax, name="gene_predictability", show=show, save=save, return_fig=return_fig, ax_given=given)
