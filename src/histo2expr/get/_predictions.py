"""The accessors of stored predictions and their intervals, and an AnnData of them for scanpy and squidpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from .._records import default_key, fit_record, gene_scores
from .._validation import log_expression
from ..models.base import plain_value


def predictions(adata: AnnData, key: str | None = None) -> pd.DataFrame:
    """The predicted expression stored under ``key``: spots (rows) x predicted genes (columns).

    The one accessor of stored predictions: out-of-fold predictions of
    :func:`~histo2expr.tl.fit_histo2expr` (``cv=...``; NaN where a fold did not predict a gene)
    or predictions of :func:`~histo2expr.tl.predict_expression` /
    :func:`~histo2expr.tl.evaluate_expression`. ``adata.uns[key]["scale"]`` says what the values are.

    Parameters
    ----------
    adata
        The AnnData the predictions were written into (a view or subset works too).
    key
        The ``key_added`` of the call; may be left out when ``adata`` holds one set of predictions.

    Returns
    -------
    A copy of ``adata.obsm[key]``: float32, index ``adata.obs_names``, columns the genes.
    """
    key = default_key(adata, key)
    record = fit_record(adata, key)
    name = Key.obsm.predictions(key)
    if name not in adata.obsm:
        msg = (
            f"`adata.uns[{key!r}]` ({record.get('kind', 'fit')}) has no predictions in `adata.obsm[{key!r}]`: "
            "a fit without `cv` predicts nothing. Cross-validate with `hx.tl.fit_histo2expr(adata, cv=...)` or "
            "predict with `hx.tl.predict_expression(adata, model)`."
        )
        raise KeyError(msg)
    frame = adata.obsm[name]
    if not isinstance(frame, pd.DataFrame):
        msg = f"`adata.obsm[{key!r}]` is not a DataFrame of predictions (genes as columns); refit or predict again."
        raise TypeError(msg)
    return frame.copy()


def intervals(adata: AnnData, key: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prediction intervals stored under ``key``: lower and upper bounds, laid out like the predictions.

    Written by :func:`~histo2expr.tl.fit_histo2expr` (``intervals=...`` with ``cv``: out of fold) and by
    :func:`~histo2expr.tl.predict_expression` (a model fitted with ``intervals``);
    ``adata.uns[key]["intervals"]`` says their level and how they were made.

    Parameters
    ----------
    adata
        The AnnData the intervals were written into.
    key
        The ``key_added`` of the call; may be left out when ``adata`` holds one set of predictions.

    Returns
    -------
    Copies of ``adata.obsm[f"{key}_lower"]`` and ``adata.obsm[f"{key}_upper"]``: float32, index
    ``adata.obs_names``, columns the genes, on the scale of the predictions.
    """
    key = default_key(adata, key)
    record = fit_record(adata, key)
    names = (Key.obsm.lower(key), Key.obsm.upper(key))
    if not all(isinstance(adata.obsm.get(name), pd.DataFrame) for name in names):
        msg = (
            f"`adata.uns[{key!r}]` ({record.get('kind', 'fit')}) has no prediction intervals. Fit with "
            "`hx.tl.fit_histo2expr(adata, cv=..., intervals=True)` (out of fold), or predict with a model fitted "
            "with `intervals=True`."
        )
        raise KeyError(msg)
    return adata.obsm[names[0]].copy(), adata.obsm[names[1]].copy()


def predicted_adata(adata: AnnData, key: str | None = None, *, genes: Sequence[str] | None = None) -> AnnData:
    """A new AnnData of the predicted expression: spots x predicted genes, ready for scanpy and squidpy.

    Parameters
    ----------
    adata
        The AnnData the predictions were written into.
    key
        The ``key_added`` of the call; may be left out when ``adata`` holds one set of predictions.
    genes
        The genes to keep (default: every gene predicted on every spot; cross-validation folds that
        chose their own genes leave some genes unpredicted on some slides, and those are left out).

    Returns
    -------
    A new AnnData (``adata`` is not changed) with

    ``.X``
        The predictions (float32), on the scale ``.uns["predicted_expression"]["scale"]`` names.
    ``.layers["measured"]``
        The measured log-normalised expression of the same genes, when ``adata`` has it.
    ``.layers["lower"]``, ``.layers["upper"]``
        The prediction intervals (:func:`intervals`), when the call wrote them.
    ``.var["cv_pcc"]``, ``["cv_pcc_low"]``, ``["cv_pcc_high"]``, ``["predictable"]``
        Each gene's mean PCC over the held-out slides of the cross-validation behind the model, its 95%
        confidence interval over those slides (NaN when unknown) and whether it lies above zero: keep
        the trustworthy genes with ``out[:, out.var["predictable"]]``.
    ``.obs``, ``.obsm``, ``.uns["spatial"]``
        Copied from ``adata`` (without prediction tables), so spatial plots work as on measured data.
    ``.uns["predicted_expression"]``
        The marker that the values are predicted: ``predicted`` (True), ``source_key``, ``kind``,
        ``method``, ``protocol`` (how the predictions were made), ``cv_protocol`` (the evaluation
        protocol behind ``var["cv_pcc"]``), ``scale`` and the parameters of the model.
    """
    key = default_key(adata, key)
    record = fit_record(adata, key)
    frame = predictions(adata, key)
    complete = [str(g) for g in frame.columns[frame.notna().all(axis=0).to_numpy()]]
    if genes is None:
        genes = complete
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        unknown = [g for g in genes if g not in frame.columns]
        partial = [g for g in genes if g in frame.columns and g not in complete]
        if unknown or partial or not genes:
            msg = (
                f"`genes` must be genes predicted on every spot under key {key!r}; {unknown[:5]} are not "
                f"predicted and {partial[:5]} only on some slides. Choose among {complete[:5]}... "
                f"({len(complete)} genes)."
            )
            raise KeyError(msg)
    if not genes:
        msg = f"No gene is predicted on every spot under key {key!r}; pass `genes=` or subset the spots."
        raise ValueError(msg)
    out = AnnData(
        X=frame[genes].to_numpy(dtype=np.float32),
        obs=adata.obs.copy(),
        var=gene_scores(record, genes).rename_axis("gene"),
    )
    if Key.uns.log1p in adata.uns and all(g in adata.var_names for g in genes):
        out.layers[Key.layers.measured] = log_expression(adata, genes)
    if Key.obsm.lower(key) in adata.obsm:
        lower, upper = intervals(adata, key)
        out.layers[Key.layers.lower], out.layers[Key.layers.upper] = (
            lower[genes].to_numpy(),
            upper[genes].to_numpy(),
        )
    for name, values in adata.obsm.items():
        if not isinstance(values, pd.DataFrame):
            out.obsm[name] = values.copy()
    if Key.uns.spatial in adata.uns:
        out.uns[Key.uns.spatial] = adata.uns[Key.uns.spatial]
    out.uns[Key.uns.predicted] = plain_value(
        {
            "predicted": True,
            "source_key": key,
            "kind": record.get("kind", "cross_validation"),
            "method": record.get("method", record.get("params", {}).get("method", "")),
            "protocol": record.get("protocol", ""),
            "cv_protocol": record.get("cv_protocol", record.get("protocol", "")),
            "scale": record.get("scale", ""),
            "params": dict(record.get("params", {})),
        }
    )
    return out
