"""How :mod:`histo2expr.tl` writes its results into an AnnData (where they live: ``histo2expr._records``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._records import FIT_KEY, KINDS, PREDICT_KEY, h5ad_safe, is_record, result_fields


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
) -> None:
    """Write one call's results under ``key`` at once, removing what an earlier call left there.

    Called after everything is computed, so that a failed call leaves the AnnData as it was.
    """
    for attribute, names in result_fields(key).items():
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
    for name, values in (var or {}).items():
        adata.var[name] = values
    adata.uns[key] = h5ad_safe(record)


def prediction_frame(values: np.ndarray, obs_names: pd.Index, genes: Sequence[str]) -> pd.DataFrame:
    """Predictions as stored: float32, one row per spot, one column per gene."""
    return pd.DataFrame(np.asarray(values, dtype=np.float32), index=obs_names, columns=pd.Index(list(genes)))
