"""Score a fitted model on slides with measured expression (an external cohort)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .. import _logging as logg
from .._keys import PREDICT_KEY, Key, write_fields
from .._validation import (
    check_log_normalised,
    check_not_empty,
    check_unique_var_names,
    get_table,
    log_expression,
    slide_labels,
)
from ._data import gene_pcc_table, score_slides
from ._intervals import HeldOut, score_intervals
from ._model import Histo2ExprModel
from ._predict import predict_expression

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData


def evaluate_expression(
    data: AnnData | SpatialData,
    model: Histo2ExprModel,
    *,
    key_added: str = PREDICT_KEY,
    slide_key: str = "slide",
    table_key: str = "table",
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Predict every slide of ``data`` with ``model`` and score it against the measured expression.

    Use it to test a model on an independent cohort: nothing of ``data`` is used to fit
    anything; metrics are computed per slide exactly as in cross-validation, with MSE and
    MAE in the model's (training) standardised space.

    Parameters
    ----------
    data
        Log-normalised AnnData (or SpatialData) that measured every gene of the model, with
        what :func:`~histo2expr.tl.predict_expression` needs (frozen features or images).
    model
        A fitted :class:`~histo2expr.tl.Histo2ExprModel`.
    key_added
        Key of the results, as in :func:`~histo2expr.tl.predict_expression` (never a key that holds
        the cross-validation of :func:`~histo2expr.tl.fit_histo2expr`).
    slide_key
        Column of ``obs`` with the slide of each spot (optional for one slide).
    table_key
        SpatialData only: the table to use.
    device
        Where to predict (see :func:`~histo2expr.tl.predict_expression`); `None`: the model's device.

    Returns
    -------
    One row per slide (``slide, n_spots, pcc_acg, pcc_heg50, pcc_hvg50, mse, mae, ...``), and
    sets what :func:`~histo2expr.tl.predict_expression` sets plus

    ``.uns[key_added]["folds"]``
        The returned table (so the plotting functions read it as they read cross-validation).
    ``.uns[key_added]["gene_pcc"]``
        PCC of every model gene (rows) on every slide (columns).
    ``.uns[key_added]["interval_coverage"]``, ``["interval_width"]``
        A model fitted with ``intervals``: the coverage and mean width of every gene's intervals (rows) on
        every slide (columns); the returned rows gain their means, ``coverage`` and ``interval_width``, and
        the slide's ``ood_fraction`` and ``distance_ratio`` (see ``uns[key_added]["shift"]``).
    """
    table = get_table(data, table_key)
    check_not_empty(table, what="evaluation")
    check_unique_var_names(table)
    check_log_normalised(table)
    truth = log_expression(table, model.genes)
    start = logg.info(
        f"evaluating {model.method.name} on {logg.counted(table.n_obs, 'spot')} with measured expression"
    )
    predict_expression(
        data, model, key_added=key_added, slide_key=slide_key, table_key=table_key, device=device
    )
    predicted = table.obsm[Key.obsm.predictions(key_added)][model.genes].to_numpy()
    slides = slide_labels(table, slide_key, required=False)
    rows, pccs = score_slides(
        truth, predicted, slides, genes=model.genes, mean=model.scaler.mean_, std=model.scaler.scale_
    )
    scores = {"gene_pcc": gene_pcc_table(pccs)}
    lower, upper = Key.obsm.lower(key_added), Key.obsm.upper(key_added)
    if lower in table.obsm:  # a model calibrated with intervals: their coverage here
        spots = HeldOut(
            lower=table.obsm[lower][model.genes].to_numpy(),
            upper=table.obsm[upper][model.genes].to_numpy(),
            difficulty=table.obs[Key.obs.difficulty(key_added)].to_numpy(),
            p_value=table.obs[Key.obs.ood_pvalue(key_added)].to_numpy(),
        )
        per_slide, coverage, width = score_intervals(truth, spots, slides, model.genes)
        rows = [{**row, **per_slide.loc[row["slide"]].to_dict()} for row in rows]
        scores.update(interval_coverage=gene_pcc_table(coverage), interval_width=gene_pcc_table(width))
    folds = pd.DataFrame(rows)
    record = Key.uns.record(key_added)
    write_fields(table, uns={record: {**table.uns[record], "folds": folds, **scores}}, start=start)
    return folds
