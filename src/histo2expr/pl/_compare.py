"""Fold metrics of several fitted methods, slide by slide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import metrics
from .._docs import fill_docs
from ._utils import as_keys, axes, finish, fit_record, key_colours, protocol_of, titled

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Label of the group of bars with the mean over slides.
MEAN_LABEL = "mean"


@fill_docs
def compare_methods(
    adata: AnnData,
    *,
    key: Sequence[str],
    metric: str = "pcc_acg",
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Bar chart of one fold metric of several fitted methods, per held-out slide and on average.

    Parameters
    ----------
    adata
        AnnData cross-validated once per method with :func:`~histo2expr.tl.fit_histo2expr`
        (``cv=...``, one ``key_added`` each).
    key
        The ``key_added`` of every method to compare.
    metric
        A numeric column of the fold tables: ``"pcc_acg"``, ``"pcc_heg50"``, ``"pcc_hvg50"``,
        ``"mse"``, ``"mae"``, ``"gene_corr_agreement"``, ...
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``uns[key]["folds"]`` of every key; the
    last group of bars is the mean over slides (:func:`histo2expr.metrics.summarize`). The title
    names the evaluation protocol(s) (``uns[key]["protocol"]``).
    """
    keys = as_keys(key)
    values = {}
    for name in keys:
        folds = fit_record(adata, name, need=("folds",))["folds"]
        numeric = list(metrics.summarize(folds).index)
        if metric not in numeric:
            msg = f"`metric={metric!r}` is not a metric of `adata.uns[{name!r}]['folds']`; choose one of {numeric}."
            raise KeyError(msg)
        per_slide = folds.set_index(folds["slide"].astype(str))[metric]
        values[name] = {**per_slide.to_dict(), MEAN_LABEL: float(metrics.summarize(folds)[metric])}
    slides = dict.fromkeys(s for v in values.values() for s in v if s != MEAN_LABEL)
    groups = [*slides, MEAN_LABEL]
    ax_given = ax is not None
    ax = axes(ax, (max(4.0, 0.5 * len(groups) * (1 + 0.4 * len(keys))) + 1.2, 3.5))
    width = 0.8 / len(keys)
    for j, (name, colour) in enumerate(zip(keys, key_colours(len(keys)), strict=True)):
        heights = [values[name].get(g, np.nan) for g in groups]
        positions = np.arange(len(groups)) + (j - (len(keys) - 1) / 2) * width
        ax.bar(positions, heights, width=0.95 * width, color=colour, label=name)
    ax.axvline(len(groups) - 1.5, color="grey", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("held-out slide")
    ax.set_ylabel(metric)
    ax.set_title(titled(f"{metric} per held-out slide", [protocol_of(adata, name) for name in keys]))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return finish(ax, name="compare_methods", show=show, save=save, return_fig=return_fig, ax_given=ax_given)
