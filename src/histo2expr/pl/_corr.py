"""Gene-gene correlation of measured and predicted expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from .. import metrics
from .._docs import fill_docs
from .._keys import FIT_KEY
from .._validation import positive_int
from ._utils import (
    check_genes,
    finish,
    fit_record,
    predicted_genes,
    prediction,
    protocol_of,
    slide_spots,
    titled,
    truth,
    unpredicted,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Above this many genes the heatmaps carry no gene names.
_MAX_LABELLED_GENES = 60


def _cluster_order(corr: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering of genes at distance 1 - correlation."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(corr) < 3:
        return np.arange(len(corr))
    distance = squareform(np.clip(1.0 - corr, 0.0, 2.0), checks=False)
    return leaves_list(linkage(distance, method="average"))


@fill_docs
def gene_corr_heatmap(
    adata: AnnData,
    *,
    key: str = FIT_KEY,
    genes: Sequence[str] | None = None,
    n_top: int = 50,
    slide: str | None = None,
    cmap: str = "RdBu_r",
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> list[Axes] | Figure | None:
    """Gene-gene correlation of the measured and of the predicted expression, side by side.

    Both matrices correlate genes across spots and share the gene order of a hierarchical
    clustering (average linkage, distance 1 - correlation) of the measured one. The title
    gives their agreement, :func:`histo2expr.metrics.gene_corr_agreement`: the Pearson
    correlation of their upper triangles. Genes constant on the spots (in truth or
    prediction) have no correlation and are left out.

    Parameters
    ----------
    adata
        AnnData cross-validated with :func:`~histo2expr.tl.fit_histo2expr` (``cv=...``, its
        out-of-fold predictions) or predicted with :func:`~histo2expr.tl.predict_expression`,
        with measured log-normalised expression in ``X``.
    {key_param}
    genes
        The genes to correlate (default: the ``n_top`` with the highest mean measured
        expression among those predicted on every spot shown).
    n_top
        Number of genes when ``genes`` is not given.
    slide
        One slide (as the fold metric ``gene_corr_agreement`` does), or None for every spot.
    cmap
        Diverging colour map; the scale is fixed to [-1, 1].
    ax
        Two Axes to draw the measured and the predicted matrix into (default: a new figure).
    {show_save_params}

    Returns
    -------
    {plot_returns} (measured, predicted), else None. Reads the predictions of ``key``
    (:func:`histo2expr.get.predictions`) and ``X``; the title names the evaluation protocol.
    """
    import matplotlib.pyplot as plt

    record = fit_record(adata, key)
    spots, slide = slide_spots(adata, record, slide)
    known = predicted_genes(record)
    if genes is None:
        n_top = positive_int(n_top, "n_top")
        everywhere = ~unpredicted(prediction(adata, key, known, spots))
        candidates = [g for g, ok in zip(known, everywhere, strict=True) if ok]
        genes = [candidates[i] for i in metrics.top_genes(truth(adata, candidates, spots), n_top)]
    else:
        genes = check_genes(genes, known, key)
    predicted = prediction(adata, key, genes, spots)
    if unpredicted(predicted).any():
        missing = [g for g, bad in zip(genes, unpredicted(predicted), strict=True) if bad]
        msg = (
            f"{missing[:5]} lack a prediction of {key!r} on some of the spots shown (their folds chose "
            "other genes); pass `slide=` or `genes=` predicted on every spot shown."
        )
        raise ValueError(msg)
    measured = truth(adata, genes, spots)
    varying = ~np.isnan(metrics.gene_pcc(measured, predicted))
    genes = [g for g, ok in zip(genes, varying, strict=True) if ok]
    if len(genes) < 2:
        msg = f"Fewer than two genes vary on the spots shown ({genes}); choose other genes or slides."
        raise ValueError(msg)
    measured, predicted = measured[:, varying], predicted[:, varying]
    agreement = metrics.gene_corr_agreement(measured, predicted)
    corr_measured = np.corrcoef(measured, rowvar=False)
    corr_predicted = np.corrcoef(predicted, rowvar=False)
    order = _cluster_order(corr_measured)
    names = [genes[i] for i in order]
    size = 3.2 + 0.08 * min(len(genes), _MAX_LABELLED_GENES)
    if ax is None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(2 * size + 1.0, size), layout="constrained")
    else:
        if isinstance(ax, str) or len(ax) != 2:
            msg = "`ax` must be two Axes: one for the measured and one for the predicted correlations."
            raise ValueError(msg)
        left, right = ax
        fig = cast("Figure", left.figure)
    for panel, corr, what in (
        (left, corr_measured, "measured"),
        (right, corr_predicted, f"predicted ({key})"),
    ):
        heatmap = panel.imshow(
            corr[np.ix_(order, order)], cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest"
        )
        panel.set_title(what)
        labelled = len(names) <= _MAX_LABELLED_GENES
        panel.set_xticks(
            range(len(names)) if labelled else [], names if labelled else [], rotation=90, fontsize=6
        )
        panel.set_yticks(range(len(names)) if labelled else [], names if labelled else [], fontsize=6)
    fig.colorbar(heatmap, ax=[left, right], shrink=0.8, label="gene-gene PCC")
    where = "all spots" if slide is None else f"slide {slide}"
    fig.suptitle(
        titled(
            f"Gene-gene correlation, {len(genes)} genes, {where}: agreement r = {agreement:.3f}",
            [protocol_of(adata, key)],
        )
    )
    return finish(
        [left, right],
        name="gene_corr_heatmap",
        show=show,
        save=save,
        return_fig=return_fig,
        ax_given=ax is not None,
    )
