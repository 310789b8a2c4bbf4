"""Where the results of :mod:`histo2expr.tl` live in an AnnData, and how every layer reads them.

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
``obsm[f"{key}_lower"]``, ``obsm[f"{key}_upper"]``, ``obs[f"{key}_ood_pvalue"]``, ``obs[f"{key}_difficulty"]``
    Prediction intervals (laid out like the predictions), each spot's out-of-distribution p-value and
    its difficulty (adaptive intervals), see ``docs/trust.md``.
``var[f"{key}_cv_pcc"]``, ``var[f"{key}_cv_pcc_low"]``, ``var[f"{key}_cv_pcc_high"]``, ``var[f"{key}_predictable"]``
    Each gene's cross-validated PCC with its confidence interval and predictability flag.

The keys are built by :class:`histo2expr._keys.Key`; ``tl`` writes them (``tl/_predictions.py``, through
:func:`histo2expr._keys.write_fields`); :mod:`histo2expr.get` and :mod:`histo2expr.pl` read them through
the functions here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from ._predictability import COLUMNS, gene_predictability

#: The kinds of record and the function family that writes each.
KINDS = {"cross_validation": "fit_histo2expr", "fit": "fit_histo2expr", "prediction": "predict_expression"}
#: Protocol of predictions of a model on slides it was not fitted on.
EXTERNAL_PROTOCOL = "external slides"


def is_record(value: Any) -> bool:
    """A record of ``fit_histo2expr`` / ``predict_expression``: its parameters and genes or held-out PCCs."""
    return isinstance(value, Mapping) and "params" in value and ("genes" in value or "gene_pcc" in value)


def record_keys(adata: AnnData, *, with_predictions: bool = False) -> list[str]:
    """Keys of ``uns`` written by ``fit_histo2expr`` / ``predict_expression`` (with predictions in ``obsm``)."""
    return [k for k, v in adata.uns.items() if is_record(v) and (not with_predictions or k in adata.obsm)]


#: The scales :func:`~histo2expr.tl.predict_expression` returns, and what each value means.
SCALES = {
    "training": "log-normalised expression at the training slides' sequencing depth",
    "depth": "expected log-normalised expression at this slide's sequencing depth",
    "standardized": "predicted log-normalised expression standardised per gene within each slide",
}


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


def gene_scores(record: Mapping[str, Any], genes: Sequence[str]) -> pd.DataFrame:
    """Each gene's cross-validated PCC, its confidence interval and predictability flag, NaN (False) where unknown."""
    if "gene_pcc" in record and record.get("kind", "cross_validation") == "cross_validation":
        scores = gene_predictability(record["gene_pcc"])
    elif "cv_pcc" in record:
        scores = record["cv_pcc"]
    else:
        scores = pd.DataFrame(columns=["cv_pcc"], dtype=np.float64)
    scores = scores.reindex(index=list(genes), columns=list(COLUMNS))
    scores["predictable"] = scores["predictable"].fillna(False).astype(bool)
    return scores
