"""Input checks shared by every layer; each error names the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from spatialdata import SpatialData


def get_table(data: AnnData | SpatialData, table_key: str = "table") -> AnnData:
    """Return the AnnData behind ``data``: itself, or the table of a SpatialData.

    Parameters
    ----------
    data
        An :class:`~anndata.AnnData` or a :class:`~spatialdata.SpatialData`.
    table_key
        Name of the table to use when ``data`` is a SpatialData.
    """
    if isinstance(data, AnnData):
        return data
    tables = getattr(data, "tables", None)
    if tables is None:
        msg = f"Expected an AnnData or a SpatialData object, got {type(data).__name__}."
        raise TypeError(msg)
    if table_key not in tables:
        msg = (
            f"The SpatialData object has no table {table_key!r}; its tables are {sorted(tables)}. "
            "Pass `table_key=` with one of them."
        )
        raise KeyError(msg)
    return tables[table_key]


def check_obs_key(adata: AnnData, key: str, *, what: str = "slide") -> pd.Series:
    """Return ``adata.obs[key]`` as a categorical, or raise naming the available columns."""
    if key not in adata.obs.columns:
        msg = (
            f"`{what}_key={key!r}` is not a column of `adata.obs`; the columns are "
            f"{list(adata.obs.columns)}. Pass the column that holds the {what} of each spot."
        )
        raise KeyError(msg)
    values = adata.obs[key]
    if values.isna().any():
        n = int(values.isna().sum())
        msg = f"`adata.obs[{key!r}]` has {n} missing values; every spot needs a {what}."
        raise ValueError(msg)
    return values.astype(str).astype("category")


def spatial_coordinates(adata: AnnData, key: str = "spatial") -> np.ndarray:
    """Return the ``(n_spots, 2)`` spot centres (x, y) in full-resolution pixels."""
    if key not in adata.obsm:
        msg = (
            f"`adata.obsm[{key!r}]` is missing: histo2expr needs the spot centres in "
            "full-resolution image pixels (x, y). Read the data with a histo2expr or scanpy "
            "reader, or set `adata.obsm['spatial']` yourself."
        )
        raise KeyError(msg)
    coords = np.asarray(adata.obsm[key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        msg = f"`adata.obsm[{key!r}]` must have shape (n_spots, 2), got {coords.shape}."
        raise ValueError(msg)
    coords = coords[:, :2]
    if not np.isfinite(coords).all():
        msg = f"`adata.obsm[{key!r}]` contains NaN or infinite coordinates; drop or fix those spots."
        raise ValueError(msg)
    return coords


def check_counts(matrix: Any, *, where: str) -> None:
    """Raise if a count matrix holds NaN, infinite or negative values."""
    values = (
        matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else np.asarray(matrix)
    )
    if values.size and not np.isfinite(values).all():
        msg = f"{where} contains NaN or infinite values; histo2expr needs raw, finite counts."
        raise ValueError(msg)
    if values.size and (values < 0).any():
        msg = f"{where} contains negative values; histo2expr needs raw counts (did you pass log or scaled data?)."
        raise ValueError(msg)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise naming the parameter when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"`{name}` must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return int(value)


def non_negative_number(value: Any, name: str, *, positive: bool = False) -> float:
    """Return ``value`` as a float, or raise naming the parameter when it is not a finite number >= 0 (> 0)."""
    bad = (
        isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not np.isfinite(value)
    )
    if bad or value < 0 or (positive and value == 0):
        msg = f"`{name}` must be a {'positive' if positive else 'non-negative'} number, got {value!r}."
        raise ValueError(msg)
    return float(value)


def probability(value: Any, name: str) -> float:
    """Return ``value`` as a float, or raise naming the parameter when it is not a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not 0 <= value < 1:
        msg = f"`{name}` must be a probability in [0, 1), got {value!r}."
        raise ValueError(msg)
    return float(value)


def one_of(value: Any, choices: tuple[str, ...], name: str) -> str:
    """Return ``value``, or raise naming the parameter and its choices when it is not one of them."""
    if not isinstance(value, str) or value not in choices:
        msg = f"`{name}` must be one of {list(choices)}, got {value!r}."
        raise ValueError(msg)
    return value


def flag(value: Any, name: str) -> bool:
    """Return ``value``, or raise naming the parameter when it is not True or False."""
    if not isinstance(value, bool | np.bool_):
        msg = f"`{name}` must be True or False, got {value!r}."
        raise TypeError(msg)
    return bool(value)
