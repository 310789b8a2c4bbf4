"""Input checks shared by every layer; each error names the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._keys import Key

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
    """Return ``adata.obs[key]`` as a categorical, or raise naming the available columns.

    Slide ids (``what="slide"``) must also be storable keys (:func:`check_slide_id`).
    """
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
    values = values.astype(str).astype("category")
    if what == "slide":
        for slide in values.cat.categories:
            check_slide_id(slide)
    return values


def spatial_coordinates(adata: AnnData, key: str = Key.obsm.spatial) -> np.ndarray:
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
    """Raise if a count matrix holds NaN, infinite, negative or non-integer values."""
    values = (
        matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else np.asarray(matrix)
    )
    if values.size and not np.isfinite(values).all():
        msg = f"{where} contains NaN or infinite values; histo2expr needs raw, finite counts."
        raise ValueError(msg)
    if values.size and (values < 0).any():
        msg = f"{where} contains negative values; histo2expr needs raw counts (did you pass log or scaled data?)."
        raise ValueError(msg)
    fractional = values[values != np.round(values)] if values.size else values
    if fractional.size:
        msg = (
            f"{where} contains non-integer values (e.g. {fractional.flat[0]:.4g}), so it does not hold raw counts "
            "(log-normalised or scaled data, or counts divided by something). Pass the raw counts; if these are "
            "corrected counts, round them first (`np.rint`)."
        )
        raise ValueError(msg)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise naming the parameter when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"`{name}` must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return int(value)


def positive_int_or_none(value: Any, name: str, *, what: str = "") -> int | None:
    """``value`` as an int, None as None; raise naming the parameter (and ``what`` it counts) otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        msg = f"`{name}` must be None or a positive integer{f' ({what})' if what else ''}, got {value!r}."
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


def one_of(value: Any, choices: Iterable[str], name: str, *, fix: str = "") -> str:
    """Return ``value``, or raise naming the parameter and its choices (and ``fix``) when it is not one of them."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        msg = f"`{name}` must be one of {choices}, got {value!r}.{f' {fix}' if fix else ''}"
        raise ValueError(msg)
    return value


def level(value: Any, levels: Sequence[str], name: str) -> int:
    """The position of ``value`` in ``levels``, given as a level's name or its position; raise naming both forms."""
    if isinstance(value, str) and value.lower() in levels:
        return list(levels).index(value.lower())
    if not isinstance(value, bool) and isinstance(value, int | np.integer) and 0 <= value < len(levels):
        return int(value)
    choices = ", ".join(f"{i} ({n!r})" for i, n in enumerate(levels))
    msg = f"`{name}` must be one of {choices}: the number or the name, got {value!r}."
    raise ValueError(msg)


def flag(value: Any, name: str) -> bool:
    """Return ``value``, or raise naming the parameter when it is not True or False."""
    if not isinstance(value, bool | np.bool_):
        msg = f"`{name}` must be True or False, got {value!r}."
        raise TypeError(msg)
    return bool(value)


def seed_value(value: Any, name: str = "seed") -> int:
    """Return ``value`` as an int, or raise naming the parameter when it is not an integer in ``[0, 2**32)``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < 2**32:
        msg = f"`{name}` must be an integer between 0 and 2**32 - 1, got {value!r}."
        raise ValueError(msg)
    return int(value)


#: Pixel sizes (µm) outside this range are not a microscope's: e.g. the 72 or 300 dpi software defaults.
PLAUSIBLE_MPP = (0.02, 20.0)
#: The fix of an implausible ``microns_per_pixel`` argument of a reader.
MPP_FIX = (
    "Pass the pixel size of the full-resolution image in micrometres (about 0.25 at 40x, 0.5 at 20x), or None "
    "to estimate it from the spots."
)


def check_microns_per_pixel(value: Any, *, where: str, fix: str) -> float:
    """``value`` as a pixel size in µm, or raise when it is missing, not positive or no microscope's.

    Parameters
    ----------
    value
        The pixel size read from a file or given by the user.
    where
        Where it comes from (e.g. ``"metadata/TENX95.json field 'pixel_size_um_estimated'"``).
    fix
        How the user corrects it, appended to the message.
    """
    number = None
    if not isinstance(value, bool) and isinstance(value, int | float | np.number | str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not np.isfinite(number) or number <= 0:
        msg = f"The pixel size in {where} is {value!r}, not a positive number of micrometres per pixel. {fix}"
        raise ValueError(msg)
    if not PLAUSIBLE_MPP[0] <= number <= PLAUSIBLE_MPP[1]:
        msg = (
            f"The pixel size in {where} is {number:g} µm, outside the {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} µm "
            f"of a microscope image (about 0.25 at 40x, 0.5 at 20x). {fix}"
        )
        raise ValueError(msg)
    return number


def check_not_empty(adata: AnnData, *, what: str, genes: bool = True) -> None:
    """Raise when ``adata`` has no spots (or, with ``genes``, no genes); ``what`` names the step that needs them."""
    if adata.n_obs == 0 or (genes and adata.n_vars == 0):
        msg = (
            f"The AnnData has {adata.n_obs} spots and {adata.n_vars} genes; {what} needs at least one of each. "
            "Check the filtering that emptied it (e.g. a slide or gene subset that matched nothing)."
        )
        raise ValueError(msg)


def check_unique_var_names(adata: AnnData) -> None:
    """Raise when ``adata.var_names`` repeat a gene (genes are looked up by name)."""
    if adata.var_names.has_duplicates:
        repeated = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        msg = (
            f"`adata.var_names` lists genes more than once (e.g. {repeated}), so genes cannot be looked up by "
            "name. Run `adata.var_names_make_unique()` first."
        )
        raise ValueError(msg)


def check_slide_id(slide: Any) -> str:
    """Return ``slide`` as a string, or raise when it cannot be a key of ``uns["spatial"]`` in an h5ad file.

    HDF5 reads ``"/"`` as a path separator and ``""``, ``"."`` and ``".."`` as the group itself or its
    parent, so such a slide id would be silently split or merged when the AnnData is written.
    """
    text = str(slide)
    if text in ("", ".", "..") or "/" in text:
        msg = (
            f"Slide id {text!r} cannot be stored: written to .h5ad or zarr, an empty id, '.', '..' or an id "
            "with '/' becomes a path and is silently mangled. Rename the slide (e.g. replace '/' with '_') in "
            "`obs[slide_key]` and in the keys of `uns['spatial']`, or pass another id to the reader."
        )
        raise ValueError(msg)
    return text


def check_element_name(slide: str) -> None:
    """Raise when ``slide`` cannot name SpatialData elements (letters, digits, ``_``, ``-``, ``.`` only)."""
    if slide.startswith("__") or not all(c.isalnum() or c in "_-." for c in slide):
        msg = (
            f"Slide id {slide!r} cannot name a SpatialData element: names may only hold letters, digits, '_', "
            "'-' and '.', and may not start with '__'. Rename the slide (e.g. spaces to '_') in `obs[slide_key]` "
            "and in the keys of `uns['spatial']` first."
        )
        raise ValueError(msg)


def _sample_rows(n: int, size: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, size)).round().astype(np.int64))


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)


#: Most counts per spot a library-size normalisation targets (CPM): log1p of normalised counts stays below
#: ``log1p(MAX_NORMALISED_TOTAL)``, whatever the cohort's depth.
MAX_NORMALISED_TOTAL = 1e6
#: Matrix entries (spots x genes) read by :func:`check_log_normalised`, from evenly spaced spots (at least
#: 10, at most 1000): this bounds its cost on large data.
_CHECKED_ENTRIES = 2_000_000
#: Relative spread of ``expm1(X) / counts`` within a spot that float32 (or float16) storage can cause.
_RATIO_TOLERANCE = 0.01


def check_log_normalised(adata: AnnData, *, counts_layer: str = Key.layers.counts) -> None:
    """Raise unless ``adata.X`` holds log1p of counts normalised per spot (:func:`histo2expr.pp.normalize`).

    Checked on evenly spaced spots (up to 1000, fewer with many genes), by properties that hold for any cohort, depth
    and target sum: ``uns["log1p"]`` is set (its ``"base"`` is honoured); no value is negative
    (log1p of counts never is: negative values mean scaled or centred data); the non-zero values
    are not all integers (raw counts); none exceeds ``log1p(1e6)`` (no per-spot normalisation
    targets more than a million counts: larger values are counts or normalised values that were
    never logged); and, when ``layers[counts_layer]`` holds the raw counts, ``expm1(X)`` is the
    counts times one factor per spot, with zeros in the same places (a second log, or any
    transformation after normalising, breaks that).
    """
    fix = "Run `hx.pp.normalize(adata)` (it rebuilds X from `layers['counts']` when they are there)."
    log1p = adata.uns.get("log1p")
    if log1p is None:
        msg = (
            "`adata.X` does not look log-normalised (no `adata.uns['log1p']`); histo2expr predicts "
            f"log-normalised expression. {fix}"
        )
        raise ValueError(msg)
    base = log1p.get("base") if isinstance(log1p, dict) else None
    base = None if base is None or not np.isfinite(float(base)) else float(base)
    rows = _sample_rows(adata.n_obs, min(1000, max(10, _CHECKED_ENTRIES // max(adata.n_vars, 1))))
    values = _dense(adata.X[rows]) if adata.n_obs else np.zeros((0, adata.n_vars))
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0:
        msg = (
            f"`adata.X` has negative values (down to {finite.min():.3g}), which log1p of counts never has: it "
            "looks scaled or centred (e.g. `sc.pp.scale`). Keep the log-normalised values in X (scale a copy "
            f"if you need to). {fix}"
        )
        raise ValueError(msg)
    nonzero = finite[finite != 0]
    if nonzero.size and np.array_equal(nonzero, np.round(nonzero)):
        msg = f"`adata.X` holds whole numbers only, i.e. raw counts, although `uns['log1p']` is set. {fix}"
        raise ValueError(msg)
    ceiling = np.log1p(MAX_NORMALISED_TOTAL) / (np.log(base) if base else 1.0)
    if nonzero.size and nonzero.max() > ceiling:
        msg = (
            f"`adata.X` has values up to {nonzero.max():.4g}, more than log1p of a million counts per spot "
            f"({ceiling:.3g}), the most a log-normalised matrix holds: X looks like counts or normalised values "
            f"that were never logged. {fix}"
        )
        raise ValueError(msg)
    if counts_layer in adata.layers and adata.n_obs:
        _check_matches_counts(adata, values, rows, counts_layer, base, fix)


def _check_matches_counts(
    adata: AnnData, values: np.ndarray, rows: np.ndarray, counts_layer: str, base: float | None, fix: str
) -> None:
    """Raise unless ``expm1(values)`` is ``layers[counts_layer]`` scaled by one factor per spot."""
    counts = _dense(adata.layers[counts_layer][rows])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        unlogged = np.expm1(values * np.log(base)) if base else np.expm1(values)
        ratios = np.where(counts > 0, unlogged / np.where(counts > 0, counts, 1.0), np.nan)
    zeros_differ = np.isfinite(values) & ((values != 0) != (counts > 0))
    low, high = np.nanmin(ratios, axis=1, initial=np.inf), np.nanmax(ratios, axis=1, initial=-np.inf)
    spread = np.where(np.isfinite(low) & (low > 0), high / np.where(low > 0, low, 1.0), 1.0)
    bad = zeros_differ.any(axis=1) | (spread > 1 + _RATIO_TOLERANCE)
    if bad.any():
        spot = adata.obs_names[rows[np.flatnonzero(bad)[0]]]
        msg = (
            f"`adata.X` is not log1p of `adata.layers[{counts_layer!r}]` normalised per spot (e.g. spot {spot!r}: "
            "expm1(X) is not the counts times one factor): X was transformed again after normalising, e.g. "
            f"logged twice. {fix}"
        )
        raise ValueError(msg)


#: Spot centres closer (median distance to the nearest spot) than this fraction of the recorded
#: centre-to-centre spacing are not on the scale of the full-resolution image (grid spots never are).
MIN_SPACING_RATIO = 0.75
#: Spots whose nearest neighbour is looked up by :func:`check_spot_spacing` (a seeded sample).
_SPACING_SAMPLE = 5000


def check_spot_spacing(coords: np.ndarray, spacing_px: float | None, *, slide: str, where: str) -> None:
    """Raise when the spots of a slide sit much closer together than the spacing the slide records.

    Spots lie on a grid of centre-to-centre distance ``spacing_px`` (or sparser, where spots are
    missing), so the median distance of a spot to its nearest spot is never much below it: when it
    is below :data:`MIN_SPACING_RATIO` of it, the coordinates are on another scale (e.g. pixels of a
    downscaled image) and patches would be cut at the wrong places and scale.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres (x, y) of one slide, in full-resolution pixels.
    spacing_px
        The slide's recorded centre-to-centre spacing in the same pixels (None: nothing to check).
    slide
        The slide id, for the message.
    where
        Where the coordinates come from, for the message (e.g. ``"`obsm['spatial']`"``).
    """
    if spacing_px is None or not np.isfinite(spacing_px) or spacing_px <= 0 or len(coords) < 2:
        return
    from scipy.spatial import cKDTree

    sample = coords
    if len(coords) > _SPACING_SAMPLE:
        sample = coords[np.random.default_rng(0).choice(len(coords), _SPACING_SAMPLE, replace=False)]
    distances = cKDTree(coords).query(sample, k=2)[0][:, 1]
    distances = distances[distances > 0]  # spots at the very same place say nothing about the scale
    if distances.size and np.median(distances) < MIN_SPACING_RATIO * spacing_px:
        msg = (
            f"The spots of slide {slide!r} are {np.median(distances):.4g} px apart (median distance to the nearest "
            f"spot in {where}), but the slide records a centre-to-centre spacing of {spacing_px:.4g} px "
            "(`scalefactors['spot_spacing_fullres']`), and spots on a grid are never closer than that. The "
            "coordinates look scaled (e.g. pixels of a downscaled image): store the spot centres in full-resolution "
            "pixels, or correct the slide's scale factors."
        )
        raise ValueError(msg)


def log_expression(adata: AnnData, genes: Sequence[str]) -> np.ndarray:
    """Dense ``(n_spots, len(genes))`` float32 log-normalised expression of ``genes`` from ``X``.

    The callers check once that ``X`` is log-normalised (:func:`~histo2expr._validation.check_log_normalised`).
    """
    columns = adata.var_names.get_indexer(list(genes))
    if (columns < 0).any():
        missing = [g for g, c in zip(genes, columns, strict=True) if c < 0]
        msg = (
            f"{len(missing)} of the model's genes are not in `adata.var_names`, e.g. {missing[:5]}. "
            "Evaluate on data that measured them (same gene symbols), or predict without evaluation."
        )
        raise KeyError(msg)
    values = adata.X[:, columns]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    if not np.isfinite(values).all():
        msg = "`adata.X` contains NaN or infinite values for the chosen genes; fix or drop those spots."
        raise ValueError(msg)
    return values.astype(np.float32)


def slide_labels(adata: AnnData, slide_key: str, *, required: bool = True) -> np.ndarray:
    """Slide of every spot as strings (one pseudo-slide when not required and absent)."""
    if not required and slide_key not in adata.obs:
        return np.full(adata.n_obs, "slide", dtype=object)
    return check_obs_key(adata, slide_key).astype(str).to_numpy()


#: The largest patch side in pixels.
MAX_PATCH_SIZE = 4096


def check_patch_size(patch_size: Any) -> int:
    """Return ``patch_size`` as an int, or raise when it is not a whole number of pixels from 2 to 4096."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int | np.integer):
        msg = f"`patch_size` must be an integer number of pixels, got {patch_size!r}."
        raise TypeError(msg)
    if not 2 <= patch_size <= MAX_PATCH_SIZE:
        msg = (
            f"`patch_size={patch_size}` is out of range; use 2 to {MAX_PATCH_SIZE} pixels "
            "(224 is what most encoders expect)."
        )
        raise ValueError(msg)
    return int(patch_size)


def check_level(value: Any, name: str = "level") -> float:
    """Return ``value`` as a float, or raise naming the parameter when it is not a probability in (0, 1)."""
    bad = (
        isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not np.isfinite(value)
    )
    if bad or not 0 < value < 1:
        msg = f"`{name}` must be a probability strictly between 0 and 1 (e.g. 0.9 for 90% intervals), got {value!r}."
        raise ValueError(msg)
    return float(value)


#: The kinds of prediction interval of ``fit_histo2expr(intervals=...)`` and how each is made
#: (recorded in ``uns[key]["intervals"]["method"]``).
KINDS = {
    "adaptive": "split conformal per gene, scaled per spot by its distance to the training spots",
    "constant": "split conformal per gene (one half-width per gene)",
}
#: Most inner folds of training slides the calibration residuals come from.
MAX_CALIBRATION_FOLDS = 5
#: How the per-gene quantile is taken from the calibration scores (``interval_calibration``).
CALIBRATIONS = {
    "pooled": "the conformal quantile of the scores of all calibration spots",
    "per_slide": "the largest of the calibration slides' own conformal quantiles (coverage on each slide)",
    "shift": (
        "the conformal quantile of the scores of all calibration spots, and the intervals of a slide whose "
        "distance ratio r (median distance to the training spots relative to an unseen training slide's) "
        "exceeds 1 widened r-fold"
    ),
}


def check_intervals(
    intervals: Any, level: Any, folds: Any, calibration: Any
) -> tuple[str | None, float, int]:
    """The interval options of ``fit_histo2expr``, checked: the kind (None: no intervals), level and folds."""
    level = check_level(level)
    if calibration not in CALIBRATIONS:
        msg = f"`interval_calibration` must be one of {sorted(CALIBRATIONS)}, got {calibration!r}."
        raise ValueError(msg)
    if intervals is None or intervals is False:
        return None, level, folds
    kind = "adaptive" if intervals is True else intervals
    if kind not in KINDS:
        msg = f"`intervals` must be True, False, or one of {sorted(KINDS)}, got {intervals!r}."
        raise ValueError(msg)
    if (
        isinstance(folds, bool)
        or not isinstance(folds, int | np.integer)
        or not 2 <= folds <= MAX_CALIBRATION_FOLDS
    ):
        msg = (
            f"`calibration_folds` must be an integer between 2 and {MAX_CALIBRATION_FOLDS}, got {folds!r}: the "
            "method is refitted once per fold, so fewer folds cost less and calibrate on fewer slides per refit."
        )
        raise ValueError(msg)
    return kind, level, int(folds)
