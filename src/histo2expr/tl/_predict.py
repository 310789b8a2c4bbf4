"""Predict expression for new slides with a fitted model (no counts needed)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_not_empty, check_unique_var_names, get_table
from ..models.base import SpotSet
from ._data import coordinates, features_of, slide_labels, tokens_of
from ._model import Histo2ExprModel

if TYPE_CHECKING:
    from spatialdata import SpatialData

#: Relative difference of micrometres per pixel tolerated between training and new patches.
_MPP_TOLERANCE = 0.02


def _check_frozen_features(table: AnnData, model: Histo2ExprModel) -> np.ndarray:
    features = features_of(table, model.use_rep)
    record = table.uns.get(model.use_rep, {})
    trained, current = model.encoder or {}, record.get("encoder") or {}
    if trained.get("weights_sha1") and current.get("weights_sha1") != trained["weights_sha1"]:
        msg = (
            f"`obsm[{model.use_rep!r}]` was embedded with another encoder ({current.get('name', 'unknown')}, "
            f"weights {current.get('weights', 'unknown')}) than the model was trained on "
            f"({trained.get('name')}, weights {trained.get('weights')}). Re-embed with "
            f"`hx.tl.embed_patches(adata, encoder={trained.get('name')!r}, weights={trained.get('weights')!r}, "
            f"key_added={model.use_rep!r})`."
        )
        raise ValueError(msg)
    trained_mpp = (model.patches or {}).get("mpp")
    current_mpp = (record.get("patches") or {}).get("mpp")
    if trained_mpp and current_mpp and abs(current_mpp / trained_mpp - 1) > _MPP_TOLERANCE:
        msg = (
            f"The features were embedded at {current_mpp:.3g} µm/px but the model was trained at "
            f"{trained_mpp:.3g} µm/px; morphology at another scale gives wrong predictions. Re-embed with "
            f"`hx.tl.embed_patches(adata, mpp={trained_mpp:.4g}, key_added={model.use_rep!r})`."
        )
        raise ValueError(msg)
    if model.token_rep:
        return _check_tokens(table, model)
    if features.shape[1] != model.params["n_features"]:
        msg = (
            f"`obsm[{model.use_rep!r}]` has {features.shape[1]} features per spot; the model expects "
            f"{model.params['n_features']}. Embed with the model's encoder."
        )
        raise ValueError(msg)
    return features


def _check_tokens(table: AnnData, model: Histo2ExprModel) -> np.ndarray:
    """The image tokens of a model trained on tokens, checked against the token grid it was trained on."""
    tokens = tokens_of(table, model.use_rep)
    expected = (model.params["n_tokens"], model.params["n_features"])
    if tokens.shape[1:] != expected:
        grid = math.isqrt(expected[0])
        msg = (
            f"`obsm[{model.token_rep!r}]` has {tokens.shape[1]} tokens of {tokens.shape[2]} features per spot; the "
            f"model was trained on {expected[0]} of {expected[1]}. Re-embed with "
            f"`hx.tl.embed_patches(adata, tokens={grid}, key_added={model.use_rep!r})` and the model's encoder."
        )
        raise ValueError(msg)
    return tokens


def predict_expression(
    data: AnnData | SpatialData,
    model: Histo2ExprModel,
    *,
    key_added: str = "histo2expr",
    slide_key: str = "slide",
    table_key: str = "table",
    copy: bool = False,
) -> AnnData | None:
    """Predict the model's genes for every spot of ``data`` from its H&E alone.

    Parameters
    ----------
    data
        AnnData (or SpatialData) with the same kind of spots: frozen features in
        ``obsm[model.use_rep]`` embedded with the model's encoder at its scale (frozen
        regime; a model trained on image tokens also reads ``obsm[model.token_rep]``, of the
        same token grid), or images and spot centres (end-to-end regime). Counts are not needed.
    model
        A fitted :class:`~histo2expr.tl.Histo2ExprModel`.
    key_added
        Prefix of the fields written.
    slide_key
        Column of ``obs`` with the slide of each spot (optional for one slide).
    table_key
        SpatialData only: the table to use.
    copy
        When ``data`` has the model's genes: write into a copy and return it.

    Returns
    -------
    When every model gene is in ``data.var_names``: ``None`` (or the copy), and sets

    ``.layers[f"{key_added}_pred"]``
        Predicted log-normalised expression of the model's genes, NaN for other genes.
    ``.obsm[f"X_{key_added}"]``
        The model's image embedding of each spot.
    ``.obs[f"{key_added}_similarity"]``
        Retrieval methods (``bleep``, ``chrep``, ...) only: the mean cosine similarity of each spot
        to the training spots it retrieves (:meth:`~histo2expr.models.Method.confidence`); low
        values flag spots unlike anything seen in training.
    ``.var[f"{key_added}_cv_pcc"]``
        Each model gene's mean PCC over the held-out slides of its cross-validation (NaN for other
        genes, and for all when the model was fitted without ``cv``).
    ``.uns[key_added]``
        The model's description.

    Otherwise a new AnnData with ``var`` = the model's genes (with ``{key_added}_cv_pcc``), the
    predictions in ``X`` and in ``layers[f"{key_added}_pred"]``, ``obs`` (with
    ``{key_added}_similarity``), ``obsm`` (incl. ``X_{key_added}``) and ``uns["spatial"]`` taken
    from ``data``, and the model's description in ``uns[key_added]``.
    """
    table = get_table(data, table_key)
    if not isinstance(model, Histo2ExprModel):
        msg = f"`model` must be a Histo2ExprModel (from `hx.tl.fit_histo2expr` or `.load`), got {type(model).__name__}."
        raise TypeError(msg)
    check_not_empty(table, what="prediction", genes=False)
    check_unique_var_names(table)
    slides = slide_labels(table, slide_key, required=False)
    if model.use_rep is not None:
        spots = SpotSet(
            coords=coordinates(table), groups=slides, features=_check_frozen_features(table, model)
        )
    else:
        from ..patches import PatchSource

        geometry = model.patches or {}
        source = PatchSource(
            data,
            patch_size=geometry["patch_size"],
            mpp=geometry.get("mpp"),
            slide_key=slide_key,
            table_key=table_key,
        )
        spots = SpotSet(
            coords=coordinates(table), groups=slides, patches=source, indices=np.arange(table.n_obs)
        )
    predicted = model.predict_log(spots)
    embedding = model.method.embed(spots)
    similarity = model.method.confidence(spots, embedding=embedding)
    cv_pcc = pd.Series(model.cv_gene_pcc or {}, dtype=np.float64).reindex(model.genes).to_numpy()
    if all(g in table.var_names for g in model.genes):
        target = table.copy() if copy else table
        layer = np.full(target.shape, np.nan, dtype=np.float32)
        layer[:, target.var_names.get_indexer(model.genes)] = predicted
        target.layers[f"{key_added}_pred"] = layer
        target.obsm[f"X_{key_added}"] = embedding
        if similarity is not None:
            target.obs[f"{key_added}_similarity"] = similarity
        gene_pcc = np.full(target.n_vars, np.nan)
        gene_pcc[target.var_names.get_indexer(model.genes)] = cv_pcc
        target.var[f"{key_added}_cv_pcc"] = gene_pcc
        target.uns[key_added] = model.describe()
        return target if copy else None
    out = AnnData(
        X=predicted, obs=table.obs.copy(), var=pd.DataFrame(index=pd.Index(model.genes, name="gene"))
    )
    out.layers[f"{key_added}_pred"] = predicted.copy()
    for key, value in table.obsm.items():
        out.obsm[key] = value.copy()
    out.obsm[f"X_{key_added}"] = embedding
    if similarity is not None:
        out.obs[f"{key_added}_similarity"] = similarity
    out.var[f"{key_added}_cv_pcc"] = cv_pcc
    if "spatial" in table.uns:
        out.uns["spatial"] = table.uns["spatial"]
    out.uns[key_added] = model.describe()
    return out
