"""How :mod:`histo2expr.tl` writes its results into an AnnData (the keys: ``histo2expr._keys``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import FIT_KEY, PREDICT_KEY, Key, result_fields, write_fields
from .._records import KINDS, is_record
from ..models.base import plain_value


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
    var: Mapping[str, Any] | None = None,
    start: float | None = None,
) -> None:
    """Write one call's results under ``key`` at once, removing what an earlier call left there.

    Called after everything is computed, so that a failed call leaves the AnnData as it was; every
    field is logged (:func:`histo2expr._keys.write_fields`), then the time since ``start``.
    """
    obsm = {**({} if predictions is None else {Key.obsm.predictions(key): predictions}), **(obsm or {})}
    write_fields(
        adata,
        obs=obs,
        var=var,
        obsm=obsm,
        uns={Key.uns.record(key): plain_value(record)},
        remove=result_fields(key),
        start=start,
    )


def prediction_frame(values: np.ndarray, obs_names: pd.Index, genes: Sequence[str]) -> pd.DataFrame:
    """Predictions as stored: float32, one row per spot, one column per gene."""
    return pd.DataFrame(np.asarray(values, dtype=np.float32), index=obs_names, columns=pd.Index(list(genes)))
