"""Gene selection that can be fitted on a subset of slides (the training slides of a fold)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _logging as logg
from .._docs import fill_docs
from .._keys import SELECTED_KEY, Key, write_fields
from .._validation import check_log_normalised, check_obs_key, one_of, positive_int

_FLAVORS = ("heg", "hvg")


def _log_expression(adata: AnnData, layer: str | None) -> np.ndarray | sp.spmatrix:
    if layer is not None:
        if layer not in adata.layers:
            msg = f"Layer {layer!r} is not in `adata.layers` ({list(adata.layers)})."
            raise KeyError(msg)
        return adata.layers[layer]
    check_log_normalised(adata)
    return adata.X


def _column_stats(matrix: np.ndarray | sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        mean = np.asarray(matrix.mean(axis=0)).ravel()
        mean_sq = np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel()
    else:
        matrix = np.asarray(matrix, dtype=np.float64)
        mean, mean_sq = matrix.mean(axis=0), (matrix**2).mean(axis=0)
    return mean, np.maximum(mean_sq - mean**2, 0.0)


@fill_docs
def select_genes(
    adata: AnnData,
    n_top: int = 250,
    *,
    flavor: str = "heg",
    slides: Sequence[str] | None = None,
    slide_key: str = "slide",
    layer: str | None = None,
    key_added: str = SELECTED_KEY,
    inplace: bool = True,
) -> list[str] | None:
    """Choose the genes to predict, from the chosen slides only.

    ``"heg"`` ranks genes by mean log-normalised expression (highly expressed genes,
    as in ST-Net, BLEEP and CHRep); ``"hvg"`` by variance of log-normalised
    expression *within* each slide, averaged over slides, so that depth differences
    between slides do not make a gene look variable. Ties keep ``var`` order.

    Parameters
    ----------
    adata
        Log-normalised spots x genes (see :func:`histo2expr.pp.normalize`).
    n_top
        Number of genes to keep.
    flavor
        ``"heg"`` or ``"hvg"``.
    slides
        Slides whose spots the statistics are computed on — in cross-validation the
        training slides of the fold, never the held-out one. ``None``: all slides.
    {slide_key_param}
    layer
        Layer with log-normalised values; ``None`` uses ``X``.
    key_added
        Name of the ``var`` columns written when ``inplace=True``.
    inplace
        Write the selection into ``var`` (and return None) or return the gene names.

    Returns
    -------
    The selected gene names, best first, when ``inplace=False``. Otherwise sets:

    ``.var[key_added]``
        Whether the gene is selected.
    ``.var[f"{key_added}_rank"]``
        Rank of selected genes (0 = best), -1 for the others.
    ``.uns[key_added]``
        ``{"flavor", "n_top", "slides"}``.
    """
    one_of(flavor, _FLAVORS, "flavor")
    n_top = positive_int(n_top, "n_top")
    if not n_top <= adata.n_vars:
        msg = f"`n_top={n_top}` must be between 1 and the number of genes ({adata.n_vars}); lower it."
        raise ValueError(msg)
    labels = check_obs_key(adata, slide_key)
    chosen = list(labels.cat.categories) if slides is None else [str(s) for s in slides]
    unknown = sorted(set(chosen) - set(labels.cat.categories))
    if unknown:
        msg = f"Slides {unknown} are not in `adata.obs[{slide_key!r}]` ({list(labels.cat.categories)})."
        raise ValueError(msg)
    if not chosen:
        msg = "`slides` is empty; give at least one slide to choose genes on."
        raise ValueError(msg)
    values = _log_expression(adata, layer)
    if flavor == "heg":
        mask = np.asarray(labels.isin(chosen))
        score, _ = _column_stats(values[mask])
    else:
        variances = [_column_stats(values[np.asarray(labels == s)])[1] for s in chosen]
        score = np.mean(variances, axis=0)
    order = np.argsort(-score, kind="stable")[:n_top]
    genes = list(adata.var_names[order])
    if not inplace:
        return genes
    logg.info(f"selected {logg.counted(n_top, 'gene')} by {flavor} on {logg.counted(len(chosen), 'slide')}")
    rank = pd.Series(-1, index=adata.var_names, dtype=np.int64)
    rank.iloc[order] = np.arange(n_top)
    write_fields(
        adata,
        var={Key.var.selected(key_added): rank.values >= 0, Key.var.rank(key_added): rank.values},
        uns={Key.uns.record(key_added): {"flavor": flavor, "n_top": int(n_top), "slides": chosen}},
    )
    return None
