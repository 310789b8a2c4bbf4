"""Turn AnnData into the arrays and SpotSets the methods see; the only place both meet."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import metrics
from .._keys import Key
from .._validation import spatial_coordinates


def check_genes(adata: AnnData, genes: Any) -> int | list[str]:
    """A number of genes to choose, or a user-given gene list validated against ``var_names``.

    Lists, tuples, numpy arrays and pandas Index / Series of names are accepted.
    """
    if isinstance(genes, int | np.integer) and not isinstance(genes, bool):
        if not 1 <= genes <= adata.n_vars:
            msg = f"`genes={genes}` must be between 1 and the number of genes ({adata.n_vars})."
            raise ValueError(msg)
        return int(genes)
    if isinstance(genes, str | bytes | bool) or not isinstance(
        genes, Sequence | np.ndarray | pd.Index | pd.Series
    ):
        msg = f"`genes` must be a number of genes or a list of gene names, got {genes!r}."
        raise TypeError(msg)
    if np.ndim(genes) != 1:
        msg = f"`genes` must be a flat list of gene names, got an array of shape {np.shape(genes)}."
        raise TypeError(msg)
    genes = [str(g) for g in genes]
    if len(genes) == 0:
        msg = "`genes` is an empty list; give gene names or a number of genes to choose."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = "`genes` lists some genes more than once; give each gene once."
        raise ValueError(msg)
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        msg = f"{len(missing)} genes of `genes` are not in `adata.var_names`, e.g. {missing[:5]}; check the symbols."
        raise KeyError(msg)
    return genes


def features_of(adata: AnnData, use_rep: str) -> np.ndarray:
    """The frozen features in ``obsm[use_rep]`` as float32, checked."""
    if use_rep not in adata.obsm:
        msg = (
            f"`adata.obsm[{use_rep!r}]` is missing. Compute the frozen image features first with "
            f"`hx.tl.embed_patches(adata, key_added={use_rep!r})`, or pass `use_rep=None` to train the "
            "encoder end to end on the patches."
        )
        raise KeyError(msg)
    features = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if features.ndim != 2 or not np.isfinite(features).all():
        msg = f"`adata.obsm[{use_rep!r}]` must be a finite (n_spots, n_features) array."
        raise ValueError(msg)
    return features


def tokens_of(adata: AnnData, use_rep: str) -> np.ndarray:
    """The frozen image tokens ``obsm[f"{use_rep}_tokens"]`` as float32 ``(n_spots, n_tokens, n_features)``, checked."""
    key = Key.obsm.tokens(use_rep)
    if key not in adata.obsm:
        msg = (
            f"`adata.obsm[{key!r}]` is missing. Embed the image tokens with "
            f"`hx.tl.embed_patches(adata, tokens=3, key_added={use_rep!r})` (the side of the token grid)."
        )
        raise KeyError(msg)
    tokens = np.asarray(adata.obsm[key], dtype=np.float32)
    if tokens.ndim != 3 or not np.isfinite(tokens).all():
        msg = f"`adata.obsm[{key!r}]` must be a finite (n_spots, n_tokens, n_features) array, got shape {tokens.shape}."
        raise ValueError(msg)
    return tokens


def frozen_inputs(
    adata: AnnData, use_rep: str, *, tokens: bool, method: str
) -> tuple[np.ndarray, str | None]:
    """The frozen features a method is fitted on, and the ``obsm`` key of its tokens (None without).

    A method that takes image tokens (``tokens``) gets ``obsm[f"{use_rep}_tokens"]`` when it is
    there; otherwise the pooled ``obsm[use_rep]`` serve as a single token, with a warning that
    says how to embed real tokens. Other methods get the pooled features.
    """
    key = Key.obsm.tokens(use_rep)
    if tokens and key in adata.obsm:
        return tokens_of(adata, use_rep), key
    if tokens:
        msg = (
            f"Method {method!r} takes image tokens, but `adata.obsm[{key!r}]` is missing, so the pooled "
            f"features `obsm[{use_rep!r}]` are used as a single token. For real tokens run "
            f"`hx.tl.embed_patches(adata, tokens=3, key_added={use_rep!r})` first."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)  # at the caller of fit_histo2expr
    return features_of(adata, use_rep), None


def coordinates(adata: AnnData, *, needed_by: str | None = None) -> np.ndarray:
    """Spot centres ``obsm["spatial"]``; NaN when the data has none and no method reads them.

    Parameters
    ----------
    adata
        The spots.
    needed_by
        Name of a method that reads the coordinates (:attr:`~histo2expr.models.Method.uses_coordinates`):
        without ``obsm["spatial"]`` that is a clear error instead of unknown coordinates.
    """
    if "spatial" in adata.obsm:
        return spatial_coordinates(adata)
    if needed_by is not None:
        msg = (
            f"Method {needed_by!r}, as configured, learns from the spot positions, but `adata.obsm['spatial']` "
            "is missing. Store the spot centres (x, y) in full-resolution pixels there (the histo2expr readers "
            "do), or turn off the parts of the method that use them (see its documentation)."
        )
        raise KeyError(msg)
    return np.full((adata.n_obs, 2), np.nan)


def score_slides(
    truth: np.ndarray,
    predicted: np.ndarray,
    slides: np.ndarray,
    *,
    genes: Sequence[str],
    mean: np.ndarray,
    std: np.ndarray,
) -> tuple[list[dict[str, Any]], dict[str, pd.Series]]:
    """Metrics of every slide on its own (one row each) and the per-gene PCC of every slide.

    A slide with fewer than ``metrics.MIN_SPOTS`` spots is flagged (``small_slide``, with a warning):
    :func:`histo2expr.metrics.summarize` leaves it out of the means over slides.
    """
    rows, pccs = [], {}
    for slide in dict.fromkeys(slides):
        on_slide = slides == slide
        result = metrics.evaluate_slide(truth[on_slide], predicted[on_slide], mean=mean, std=std, ks=(50,))
        small = result["n_spots"] < metrics.MIN_SPOTS
        rows.append({"slide": slide, **result, "n_genes": len(genes), "small_slide": small})
        pccs[slide] = pd.Series(metrics.gene_pcc(truth[on_slide], predicted[on_slide]), index=list(genes))
        if small:
            msg = (
                f"Slide {slide!r} has only {result['n_spots']} spots, fewer than {metrics.MIN_SPOTS}: its "
                "per-gene PCCs are mostly noise, so it is flagged (`small_slide`) and left out of the means over "
                "slides (`hx.metrics.summarize`). Merge it with a sister section or leave it out."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
    return rows, pccs


def gene_pcc_table(pccs: dict[str, pd.Series]) -> pd.DataFrame:
    """Genes (rows) x slides (columns) table of PCCs, index named ``gene``."""
    table = pd.DataFrame(pccs)
    table.index.name = "gene"
    return table


def spot_geometry_um(adata: AnnData) -> dict[str, float]:
    """Median spot diameter and centre-to-centre spacing in µm over the slides of ``uns["spatial"]``.

    Read from each slide's ``scalefactors`` (``spot_diameter_fullres``, ``spot_spacing_fullres``,
    ``microns_per_pixel``); keys are ``"spot_diameter_um"`` and ``"spot_spacing_um"``, each left
    out when no slide records it. A fitted model keeps them so that
    :func:`histo2expr.pp.tile_slide` lays pseudo-spots out like the training spots.
    """
    sizes: dict[str, list[float]] = {"spot_diameter_um": [], "spot_spacing_um": []}
    for entry in (adata.uns.get("spatial") or {}).values():
        factors = entry.get("scalefactors", {}) if isinstance(entry, dict) else {}
        mpp = factors.get("microns_per_pixel")
        for name, key in (
            ("spot_diameter_um", "spot_diameter_fullres"),
            ("spot_spacing_um", "spot_spacing_fullres"),
        ):
            if mpp and factors.get(key):
                sizes[name].append(float(factors[key]) * float(mpp))
    return {name: float(np.median(values)) for name, values in sizes.items() if values}
