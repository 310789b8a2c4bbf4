"""Evaluation metrics of predicted expression, computed per held-out slide.

All functions take ``(n_spots, n_genes)`` arrays of one slide: the ground truth and
the prediction on the same (log-normalised) scale.

NaN policy (the evaluation protocol of docs/data_model.md): the Pearson correlation of a
gene that is constant on the slide — in the truth or in the prediction — is undefined. It
is returned as NaN, left out of every mean, and counted (``n_nan_genes``); it is never set
to 0.

Small slides: a held-out slide with fewer than ``MIN_SPOTS`` (20) spots is flagged
(``small_slide`` in the tables of :func:`histo2expr.tl.fit_histo2expr`). Its per-gene PCC
rests on so few spots that it is mostly noise (the standard error of a correlation over n
spots is about ``1 / sqrt(n - 3)``: 0.24 at 20 spots), so :func:`summarize` leaves it out of
the means over slides (:func:`counted_slides`) — unless every slide is that small — while the
per-slide rows keep every slide.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "counted_slides",
    "evaluate_slide",
    "gene_corr_agreement",
    "gene_pcc",
    "mae",
    "mse",
    "pcc_acg",
    "pcc_top",
    "summarize",
    "top_genes",
]

#: Relative tolerance under which a gene's values count as constant.
_CONSTANT_RTOL = 1e-12
#: Held-out slides with fewer spots are flagged as small and left out of the means over slides.
MIN_SPOTS = 20


def _as_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], np.asarray(y_pred, dtype=np.float64).reshape(-1, 1)
    if y_true.shape != y_pred.shape:
        msg = f"Truth and prediction must have the same shape, got {y_true.shape} and {y_pred.shape}."
        raise ValueError(msg)
    if y_true.ndim != 2:
        msg = f"Expected (n_spots, n_genes) arrays, got {y_true.ndim} dimensions."
        raise ValueError(msg)
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        msg = "Truth or prediction contains NaN or infinite values; metrics need finite values."
        raise ValueError(msg)
    return y_true, y_pred


def gene_pcc(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson correlation per gene across the spots of one slide.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` truth and prediction.

    Returns
    -------
    ``(n_genes,)`` correlations; NaN where the truth or the prediction is constant.
    """
    y_true, y_pred = _as_pair(y_true, y_pred)
    dt = y_true - y_true.mean(axis=0)
    dp = y_pred - y_pred.mean(axis=0)
    norm_t = np.sqrt((dt**2).sum(axis=0))
    norm_p = np.sqrt((dp**2).sum(axis=0))
    scale_t = np.abs(y_true).max(axis=0, initial=0.0) * np.sqrt(len(y_true))
    scale_p = np.abs(y_pred).max(axis=0, initial=0.0) * np.sqrt(len(y_pred))
    constant = (norm_t <= _CONSTANT_RTOL * np.maximum(scale_t, 1e-300)) | (
        norm_p <= _CONSTANT_RTOL * np.maximum(scale_p, 1e-300)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        pcc = (dt * dp).sum(axis=0) / (norm_t * norm_p)
    pcc = np.clip(pcc, -1.0, 1.0)
    pcc[constant] = np.nan
    return pcc


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def top_genes(y_true: np.ndarray, k: int, *, by: str = "mean") -> np.ndarray:
    """Indices of the ``k`` genes with the highest mean (HEG) or variance (HVG) of the truth.

    Ties are broken by gene order, so the choice is deterministic.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    if by == "mean":
        score = y_true.mean(axis=0)
    elif by == "var":
        score = y_true.var(axis=0)
    else:
        msg = f"`by` must be 'mean' (HEG) or 'var' (HVG), got {by!r}."
        raise ValueError(msg)
    if k < 1:
        msg = f"K must be at least 1, got {k}."
        raise ValueError(msg)
    order = np.argsort(-score, kind="stable")
    return order[: min(k, len(order))]


def pcc_acg(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """PCC(ACG): mean gene-wise PCC over all genes (NaN genes left out)."""
    return _nanmean(gene_pcc(y_true, y_pred))


def pcc_top(y_true: np.ndarray, y_pred: np.ndarray, k: int = 50, *, by: str = "mean") -> float:
    """PCC(HEG@K) (``by="mean"``) or PCC(HVG@K) (``by="var"``) of one slide.

    The K genes are those with the highest mean (or variance) of the ground truth on
    this slide; their PCCs are averaged, NaN genes left out. With fewer than K genes,
    all genes are used.
    """
    y_true, y_pred = _as_pair(y_true, y_pred)
    genes = top_genes(y_true, k, by=by)
    return _nanmean(gene_pcc(y_true[:, genes], y_pred[:, genes]))


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean squared error over all spots and genes."""
    y_true, y_pred = _as_pair(y_true, y_pred)
    return float(np.mean((y_true - y_pred) ** 2))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error over all spots and genes."""
    y_true, y_pred = _as_pair(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def gene_corr_agreement(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Agreement of the gene-gene correlation structure of truth and prediction.

    The Pearson correlation between the upper triangles of the two gene x gene
    correlation matrices (genes constant in either are left out). 1 means the
    prediction reproduces which genes co-vary.
    """
    y_true, y_pred = _as_pair(y_true, y_pred)
    keep = ~np.isnan(gene_pcc(y_true, y_pred))
    if keep.sum() < 3:
        return float("nan")
    corr_t = np.corrcoef(y_true[:, keep], rowvar=False)
    corr_p = np.corrcoef(y_pred[:, keep], rowvar=False)
    upper = np.triu_indices(int(keep.sum()), k=1)
    return float(gene_pcc(corr_t[upper], corr_p[upper])[0])


def evaluate_slide(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    ks: Sequence[int] = (50,),
) -> dict[str, float]:
    """Every metric of one held-out slide.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` log-normalised truth and prediction.
    mean, std
        Per-gene standardisation statistics of the training slides. When given,
        ``mse`` and ``mae`` are computed in the standardised space; ``mse_log`` and
        ``mae_log`` are always in log space.
    ks
        The K of PCC(HEG@K) and PCC(HVG@K).

    Returns
    -------
    A dict with ``n_spots``, ``pcc_acg``, ``pcc_heg{K}``, ``pcc_hvg{K}``, ``mse``,
    ``mae``, ``mse_log``, ``mae_log``, ``gene_corr_agreement`` and ``n_nan_genes``.
    """
    y_true, y_pred = _as_pair(y_true, y_pred)
    pcc = gene_pcc(y_true, y_pred)
    out: dict[str, float] = {"n_spots": len(y_true), "pcc_acg": _nanmean(pcc)}
    for k in ks:
        out[f"pcc_heg{k}"] = _nanmean(pcc[top_genes(y_true, k, by="mean")])
        out[f"pcc_hvg{k}"] = _nanmean(pcc[top_genes(y_true, k, by="var")])
    if mean is not None and std is not None:
        std = np.asarray(std, dtype=np.float64)
        z_true = (y_true - mean) / std
        z_pred = (y_pred - mean) / std
        out["mse"], out["mae"] = mse(z_true, z_pred), mae(z_true, z_pred)
    else:
        out["mse"], out["mae"] = mse(y_true, y_pred), mae(y_true, y_pred)
    out["mse_log"], out["mae_log"] = mse(y_true, y_pred), mae(y_true, y_pred)
    out["gene_corr_agreement"] = gene_corr_agreement(y_true, y_pred)
    out["n_nan_genes"] = int(np.isnan(pcc).sum())
    return out


def counted_slides(folds: pd.DataFrame, *, min_spots: int = MIN_SPOTS) -> pd.Series:
    """Which rows of a per-slide metrics table the means over slides count.

    The slides with at least ``min_spots`` spots; every slide when all are smaller (then there is
    nothing better to average). The others are small slides, left out of the means.

    Parameters
    ----------
    folds
        One row per held-out slide with an ``n_spots`` column (e.g. ``uns[key]["folds"]`` of
        :func:`histo2expr.tl.fit_histo2expr`).
    min_spots
        The smallest number of spots a slide needs to count (``0``: every slide counts).
    """
    if "n_spots" not in folds.columns:
        msg = (
            f"The metrics table needs an `n_spots` column (one row per slide); it has {list(folds.columns)}."
        )
        raise KeyError(msg)
    large = folds["n_spots"] >= min_spots
    return large if large.any() else pd.Series(True, index=folds.index)


def summarize(folds: pd.DataFrame, *, min_spots: int = MIN_SPOTS) -> pd.Series:
    """Mean of every numeric metric column over held-out slides (NaN slides left out).

    Only the slides :func:`counted_slides` counts: small slides (fewer than ``min_spots`` spots)
    are left out unless every slide is that small; ``min_spots=0`` averages every slide.
    """
    counted = folds[counted_slides(folds, min_spots=min_spots).to_numpy()]
    numeric = counted.select_dtypes("number").drop(columns=["n_spots", "n_nan_genes"], errors="ignore")
    return numeric.mean(axis=0, skipna=True)
