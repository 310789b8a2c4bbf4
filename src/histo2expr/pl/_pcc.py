"""Gene-wise PCC of held-out slides: boxes per slide, and PCC(HEG@K) against K."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from .. import metrics
from .._docs import fill_docs
from .._keys import FIT_KEY
from .._validation import positive_int
from ._utils import (
    as_keys,
    axes,
    check_genes,
    choose_slides,
    finish,
    fit_record,
    key_colours,
    pcc_table,
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

#: The K of PCC(HEG@K) in CHRep's figure 3.
DEFAULT_KS = (50, 100, 150, 200)


def _capped_ks(ks: Sequence[int] | None, n_genes: int) -> list[int]:
    """The values of K up to ``n_genes`` (the default ones silently, given ones with a warning)."""
    given = ks is not None
    ks = sorted({positive_int(k, "ks") for k in (DEFAULT_KS if ks is None else ks)})
    if not ks:
        msg = "`ks` is empty; give the values of K, e.g. (50, 100, 150, 200)."
        raise ValueError(msg)
    kept = [k for k in ks if k <= n_genes] or [n_genes]
    dropped = [k for k in ks if k > n_genes]
    if given and dropped:
        msg = f"K = {dropped} exceed the {n_genes} genes predicted and are left out of the HEG curve."
        warnings.warn(msg, UserWarning, stacklevel=3)
    return kept


def _genes_per_slide(adata: AnnData, key: str) -> int:
    """The fewest genes predicted on any held-out slide of ``key`` (each fold chose its own)."""
    record = fit_record(adata, key, need=("gene_pcc",))
    folds = record.get("folds")
    if folds is not None and "n_genes" in folds:
        return int(folds["n_genes"].min())
    return len(record["gene_pcc"])


def _union(columns: list[list[str]]) -> list[str]:
    return list(dict.fromkeys(c for names in columns for c in names))


@fill_docs
def gene_pcc_boxplot(
    adata: AnnData,
    *,
    key: str | Sequence[str] = FIT_KEY,
    slides: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Box plot of the gene-wise PCC on every held-out slide.

    One box per held-out slide holds the Pearson correlation of each predicted gene
    across that slide's spots (genes constant on the slide, with NaN PCC, are left out).
    With several keys (methods), their boxes stand side by side per slide.

    Parameters
    ----------
    adata
        AnnData cross-validated with :func:`~histo2expr.tl.fit_histo2expr` (``cv=...``) or
        scored with :func:`~histo2expr.tl.evaluate_expression`.
    {keys_param}
    slides
        Held-out slides to show (default: all, in the order they were held out).
    genes
        Restrict the boxes to these genes (default: every gene the key predicted).
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``uns[key]["gene_pcc"]``; the title names the
    evaluation protocol(s).
    """
    keys = as_keys(key)
    tables = {k: pcc_table(adata, k) for k in keys}
    slides = choose_slides(_union([list(t.columns) for t in tables.values()]), slides, "held-out slides")
    for k, table in tables.items():
        genes = None if genes is None else check_genes(genes, list(table.index), k)
    ax_given = ax is not None
    ax = axes(ax, (max(4.0, 0.6 * len(slides) * (1 + 0.5 * len(keys))), 4.0))
    width = 0.8 / len(keys)
    for j, (k, colour) in enumerate(zip(keys, key_colours(len(keys)), strict=True)):
        table = tables[k] if genes is None else tables[k].loc[genes]
        shown = [i for i, s in enumerate(slides) if s in table.columns]
        ax.boxplot(
            [table[slides[i]].dropna().to_numpy() for i in shown],
            positions=[i + (j - (len(keys) - 1) / 2) * width for i in shown],
            widths=0.9 * width,
            patch_artist=True,
            manage_ticks=False,
            boxprops={"facecolor": colour, "alpha": 0.7},
            medianprops={"color": "black"},
            flierprops={"markersize": 3},
        )
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(slides)), slides)
    ax.set_xlim(-0.6, len(slides) - 0.4)
    ax.set_xlabel("held-out slide")
    ax.set_ylabel("PCC per gene")
    ax.set_title(titled("Gene-wise PCC on held-out slides", [protocol_of(adata, k) for k in keys]))
    if len(keys) > 1:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=c, alpha=0.7, label=k) for k, c in zip(keys, key_colours(len(keys)), strict=True)
        ]
        ax.legend(handles=handles, loc="best", fontsize="small")
    return finish(ax, name="gene_pcc_boxplot", show=show, save=save, return_fig=return_fig, ax_given=ax_given)


def heg_table(
    adata: AnnData,
    *,
    key: str,
    ks: Sequence[int] = DEFAULT_KS,
    slides: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """PCC(HEG@K) of every held-out slide (rows) for every K (columns), from the stored per-gene PCCs.

    The K genes of a slide are those with the highest mean measured expression on that slide
    among the genes its fold predicted (:func:`histo2expr.metrics.top_genes`, as
    :func:`histo2expr.metrics.evaluate_slide` chooses them); their stored PCCs are averaged,
    NaN left out. With fewer than K genes, all are used.
    """
    record = fit_record(adata, key, need=("gene_pcc",))
    table = pcc_table(adata, key)
    slides = choose_slides(list(table.columns), slides, f"held-out slides of {key!r}")
    genes = list(table.index)
    rows = {}
    for slide in slides:
        spots, _ = slide_spots(adata, record, slide)
        evaluated = ~unpredicted(prediction(adata, key, genes, spots))
        fold_genes = [g for g, e in zip(genes, evaluated, strict=True) if e]
        measured = truth(adata, fold_genes, spots)
        pcc = table.loc[fold_genes, slide].to_numpy()
        rows[slide] = [float(pd.Series(pcc[metrics.top_genes(measured, k, by="mean")]).mean()) for k in ks]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(ks))


@fill_docs
def heg_curve(
    adata: AnnData,
    *,
    key: str | Sequence[str] = FIT_KEY,
    ks: Sequence[int] | None = None,
    slides: str | Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """PCC(HEG@K) against K: the mean over held-out slides, one line per key (method).

    PCC(HEG@K) of a slide is the mean PCC of the K genes with the highest mean measured
    expression on that slide (:func:`histo2expr.metrics.pcc_top`); it is read from the stored
    per-gene PCCs, so it equals the ``pcc_heg50`` column of the fold table at K = 50.

    Parameters
    ----------
    adata
        AnnData cross-validated with :func:`~histo2expr.tl.fit_histo2expr` (``cv=...``) or
        scored with :func:`~histo2expr.tl.evaluate_expression`, with its measured
        log-normalised expression in ``X``.
    {keys_param}
    ks
        The values of K, each at most the number of genes predicted (default: 50, 100, 150, 200,
        those up to that number; larger values given explicitly are dropped with a warning).
    slides
        Held-out slides to average over (default: all).
    {ax_param}
    {show_save_params}

    Returns
    -------
    {plot_returns}, else None. Reads ``uns[key]["gene_pcc"]``, the predictions of ``key``
    (:func:`histo2expr.get.predictions`) and ``X``; K is at most the number of genes predicted per
    held-out slide, and the title names the evaluation protocol(s).
    """
    keys = as_keys(key)
    ks = _capped_ks(ks, min(_genes_per_slide(adata, k) for k in keys))
    curves = {k: heg_table(adata, key=k, ks=ks, slides=slides).mean(axis=0, skipna=True) for k in keys}
    ax_given = ax is not None
    ax = axes(ax, (4.5, 3.5))
    for (k, curve), colour in zip(curves.items(), key_colours(len(keys)), strict=True):
        ax.plot(ks, curve.to_numpy(), marker="o", color=colour, label=k)
    ax.set_xticks(ks)
    ax.set_xlabel("K (highly expressed genes)")
    ax.set_ylabel("PCC(HEG@K)")
    ax.set_title(
        titled(
            "PCC of the K most expressed genes,\nmean over held-out slides",
            [protocol_of(adata, k) for k in keys],
        )
    )
    ax.legend(loc="best", fontsize="small")
    return finish(ax, name="heg_curve", show=show, save=save, return_fig=return_fig, ax_given=ax_given)
