"""Where predictions live in an AnnData, how they are written, and the one way to read them.

Every call that predicts — :func:`~histo2expr.tl.fit_histo2expr` with ``cv`` (out-of-fold),
:func:`~histo2expr.tl.predict_expression` and :func:`~histo2expr.tl.evaluate_expression` — owns
one key, its ``key_added``, and writes (see ``docs/data_model.md``):

``uns[key]``
    The record: what wrote it (``"kind"``), the method, the evaluation protocol, the scale of the
    values, the parameters, and the scores when there are any.
``obsm[key]``
    The predictions: a DataFrame with one row per spot (``obs_names``) and one column per predicted
    gene, nothing else — compact, and NaN only where a cross-validation fold did not predict a gene.
``obs[f"{key}_fold"]``, ``obsm[f"X_{key}"]``, ``obs[f"{key}_similarity"]``
    The fold of each spot (cross-validation), the method's image embedding and retrieval similarity
    (prediction).

:func:`predictions` reads them (everything in :mod:`histo2expr.pl` goes through it) and
:func:`predicted_adata` turns them into an AnnData for scanpy and squidpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

#: Default ``key_added`` of :func:`~histo2expr.tl.fit_histo2expr`.
FIT_KEY = "histo2expr"
#: Default ``key_added`` of :func:`~histo2expr.tl.predict_expression` and ``evaluate_expression``.
PREDICT_KEY = "histo2expr_pred"
#: ``uns`` key of the marker of an AnnData made by :func:`predicted_adata`.
PREDICTED_MARKER = "predicted_expression"
#: The kinds of record and the function family that writes each.
KINDS = {"cross_validation": "fit_histo2expr", "fit": "fit_histo2expr", "prediction": "predict_expression"}
#: Protocol of predictions of a model on slides it was not fitted on.
EXTERNAL_PROTOCOL = "external slides"


def _fields(key: str) -> dict[str, list[str]]:
    """Every field a call with ``key_added=key`` may write, besides ``uns[key]``."""
    return {"obsm": [key, f"X_{key}"], "obs": [f"{key}_fold", f"{key}_similarity"]}


def is_record(value: Any) -> bool:
    """A record of ``fit_histo2expr`` / ``predict_expression``: its parameters and genes or held-out PCCs."""
    return isinstance(value, Mapping) and "params" in value and ("genes" in value or "gene_pcc" in value)


def record_keys(adata: AnnData, *, with_predictions: bool = False) -> list[str]:
    """Keys of ``uns`` written by ``fit_histo2expr`` / ``predict_expression`` (with predictions in ``obsm``)."""
    return [k for k, v in adata.uns.items() if is_record(v) and (not with_predictions or k in adata.obsm)]


def check_key(adata: AnnData, key: str, *, kind: str, method: str, protocol: str) -> None:
    """Refuse to write ``kind`` results where another function's results are; warn when replacing another method's.

    Cross-validation (out-of-fold predictions of ``fit_histo2expr``) and predictions of a fitted
    model (``predict_expression``, ``evaluate_expression``) never share a key; rerunning a call
    replaces its own results silently, a call of another method or protocol with a warning.
    """
    if not isinstance(key, str) or not key:
        msg = f"`key_added` must be a non-empty string, got {key!r}."
        raise ValueError(msg)
    old = adata.uns.get(key)
    if not is_record(old):
        return
    old_kind = str(old.get("kind", kind))
    writer, old_writer = KINDS[kind], KINDS.get(old_kind, KINDS[kind])
    if writer != old_writer:
        default = PREDICT_KEY if kind == "prediction" else FIT_KEY
        free = default if default != key else f"{key}_{'pred' if kind == 'prediction' else 'cv'}"
        msg = (
            f"`adata.uns[{key!r}]` holds the results of `{old_writer}` ({old.get('method', '?')}); "
            f"`{writer}` would overwrite them. Pass another `key_added=`, e.g. {free!r}."
        )
        raise ValueError(msg)
    if (old.get("method"), old.get("protocol")) != (method, protocol):
        msg = (
            f"Replacing the results at key {key!r} ({old.get('method')}, {old.get('protocol') or old_kind}) with "
            f"those of {method} ({protocol or kind}). Pass another `key_added=` to keep both."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)


def write_results(
    adata: AnnData,
    key: str,
    *,
    record: dict[str, Any],
    predictions: pd.DataFrame | None = None,
    obs: Mapping[str, Any] | None = None,
    obsm: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write one call's results under ``key`` at once, removing what an earlier call left there.

    Called after everything is computed, so that a failed call leaves the AnnData as it was.
    """
    from ._data import h5ad_safe

    for attribute, names in _fields(key).items():
        mapping = getattr(adata, attribute)
        for name in names:
            if name in mapping:
                del mapping[name]
    if predictions is not None:
        adata.obsm[key] = predictions
    for name, values in (obs or {}).items():
        adata.obs[name] = values
    for name, values in (obsm or {}).items():
        adata.obsm[name] = values
    adata.uns[key] = h5ad_safe(record)


def prediction_frame(values: np.ndarray, obs_names: pd.Index, genes: Sequence[str]) -> pd.DataFrame:
    """Predictions as stored: float32, one row per spot, one column per gene."""
    return pd.DataFrame(np.asarray(values, dtype=np.float32), index=obs_names, columns=pd.Index(list(genes)))


def default_key(adata: AnnData, key: str | None) -> str:
    """``key``, or the only key of ``adata`` with predictions."""
    if key is not None:
        return key
    found = record_keys(adata, with_predictions=True)
    if len(found) == 1:
        return found[0]
    if not found:
        msg = (
            "`adata` holds no predictions. Run `hx.tl.fit_histo2expr(adata, cv=...)` or "
            "`hx.tl.predict_expression(adata, model)` first."
        )
        raise KeyError(msg)
    msg = f"`adata` holds predictions under several keys {found}; pass `key=` with the one to use."
    raise KeyError(msg)


def fit_record(adata: AnnData, key: str, *, need: Sequence[str] = ()) -> Mapping[str, Any]:
    """``adata.uns[key]``, checked to come from ``hx.tl`` and to hold every part in ``need``."""
    record = adata.uns.get(key)
    if not is_record(record):
        msg = (
            f"`adata.uns[{key!r}]` holds no results of `hx.tl`: key {key!r} was never fitted or predicted "
            f"(keys with results here: {record_keys(adata)}). Run `hx.tl.fit_histo2expr(adata, cv=..., "
            f"key_added={key!r})` first, or pass `key=` with the `key_added` you used."
        )
        raise KeyError(msg)
    for part in need:
        if part not in record:
            msg = (
                f"`adata.uns[{key!r}]` has no {part!r}: this needs held-out metrics, written by "
                f"`hx.tl.fit_histo2expr(adata, cv=..., key_added={key!r})` or "
                f"`hx.tl.evaluate_expression(adata, model, key_added={key!r})`. A fit without `cv` or a bare "
                "`predict_expression` has none."
            )
            raise KeyError(msg)
    return record


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
    if key not in adata.obsm:
        msg = (
            f"`adata.uns[{key!r}]` ({record.get('kind', 'fit')}) has no predictions in `adata.obsm[{key!r}]`: "
            "a fit without `cv` predicts nothing. Cross-validate with `hx.tl.fit_histo2expr(adata, cv=...)` or "
            "predict with `hx.tl.predict_expression(adata, model)`."
        )
        raise KeyError(msg)
    frame = adata.obsm[key]
    if not isinstance(frame, pd.DataFrame):
        msg = f"`adata.obsm[{key!r}]` is not a DataFrame of predictions (genes as columns); refit or predict again."
        raise TypeError(msg)
    return frame.copy()


def gene_scores(record: Mapping[str, Any], genes: Sequence[str]) -> np.ndarray:
    """Each gene's mean cross-validated PCC over held-out slides, NaN where unknown."""
    if "gene_pcc" in record and record.get("kind", "cross_validation") == "cross_validation":
        scores = record["gene_pcc"].mean(axis=1, skipna=True)
    elif "cv_pcc" in record:
        scores = record["cv_pcc"]["cv_pcc"]
    else:
        return np.full(len(genes), np.nan)
    return pd.Series(scores, dtype=np.float64).reindex(list(genes)).to_numpy()


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
    ``.var["cv_pcc"]``
        Each gene's mean PCC over the held-out slides of the cross-validation behind the model (NaN
        when unknown): how far its predicted map can be trusted.
    ``.obs``, ``.obsm``, ``.uns["spatial"]``
        Copied from ``adata`` (without prediction tables), so spatial plots work as on measured data.
    ``.uns["predicted_expression"]``
        The marker that the values are predicted: ``predicted`` (True), ``source_key``, ``kind``,
        ``method``, ``protocol`` (how the predictions were made), ``cv_protocol`` (the evaluation
        protocol behind ``var["cv_pcc"]``), ``scale`` and the parameters of the model.
    """
    from ._data import h5ad_safe, log_expression

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
        var=pd.DataFrame({"cv_pcc": gene_scores(record, genes)}, index=pd.Index(genes, name="gene")),
    )
    if "log1p" in adata.uns and all(g in adata.var_names for g in genes):
        out.layers["measured"] = log_expression(adata, genes)
    for name, values in adata.obsm.items():
        if not isinstance(values, pd.DataFrame):
            out.obsm[name] = values.copy()
    if "spatial" in adata.uns:
        out.uns["spatial"] = adata.uns["spatial"]
    out.uns[PREDICTED_MARKER] = h5ad_safe(
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
