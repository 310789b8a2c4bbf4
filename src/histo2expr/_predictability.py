"""How well each gene is predicted: its cross-validated PCC with a confidence interval over held-out slides."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Confidence of the interval of each gene's mean held-out PCC.
CONFIDENCE = 0.95
#: The columns :func:`gene_predictability` returns, written to ``var`` with the key as prefix.
COLUMNS = ("cv_pcc", "cv_pcc_low", "cv_pcc_high", "predictable")


def gene_predictability(gene_pcc: pd.DataFrame, *, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Mean PCC of every gene over the held-out slides, a t confidence interval of it, and a flag.

    Slides are the independent units (spots of a slide are spatially correlated, so a bootstrap over
    spots would be too narrow): the interval is ``mean ± t(n - 1) sd / sqrt(n)`` over the ``n``
    held-out slides where the gene was predicted and not constant, clipped to [-1, 1]. A gene is
    ``predictable`` when the interval lies above zero; with fewer than two slides the bounds are NaN
    and the gene is not flagged predictable.

    Parameters
    ----------
    gene_pcc
        Genes (rows) x held-out slides (columns) PCC table (``uns[key]["gene_pcc"]``).
    confidence
        Coverage of the interval.

    Returns
    -------
    One row per gene: ``cv_pcc``, ``cv_pcc_low``, ``cv_pcc_high``, ``predictable`` (bool).
    """
    from scipy.stats import t

    values = gene_pcc.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, values, 0.0).sum(axis=1) / n
        variance = np.where(finite, (values - mean[:, None]) ** 2, 0.0).sum(axis=1) / (n - 1)
        half = t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1)) * np.sqrt(variance / n)
    half = np.where(n >= 2, half, np.nan)
    low, high = np.clip(mean - half, -1.0, 1.0), np.clip(mean + half, -1.0, 1.0)
    return pd.DataFrame(
        {
            "cv_pcc": mean,
            "cv_pcc_low": low,
            "cv_pcc_high": high,
            "predictable": np.nan_to_num(low, nan=-1.0) > 0,
        },
        index=gene_pcc.index,
    )
