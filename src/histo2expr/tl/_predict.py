"""Predict expression for new slides with a fitted model (no counts needed)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _logging as logg
from .._keys import PREDICT_KEY, Key
from .._records import EXTERNAL_PROTOCOL, SCALES
from .._settings import cpu_threads
from .._validation import check_not_empty, check_unique_var_names, get_table, one_of, slide_labels
from ..models.base import SpotSet
from ._data import coordinates, features_of, tokens_of
from ._intervals import Calibration, new_spots, standardized_bounds
from ._model import Histo2ExprModel
from ._ood import slide_shift, warn_if_out_of_distribution
from ._predictions import check_key, prediction_frame, write_results
from ._scale import check_depth_inputs, to_scale, warn_if_unlike_training

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

#: Relative difference of micrometres per pixel tolerated between training and new patches.
_MPP_TOLERANCE = 0.02
#: Options of :func:`~histo2expr.tl.embed_patches` that change the features, recorded with the patch
#: geometry (``None`` values are not recorded), and what a record without them means (the features
#: of versions before these options: one view, no context, no neighbours).
_EMBEDDING_OPTIONS = {"tta": 1, "context": None, "neighbours": None, "stain_normalization": None}


def frozen_encoder_arguments(model: Histo2ExprModel) -> dict[str, Any] | None:
    """The :func:`~histo2expr.tl.embed_patches` arguments that embed new slides as the model's training slides were.

    Encoder, weights, patch geometry, embedding options (views, context, neighbours, stain
    normalisation), token grid and ``key_added``; None when the weights cannot be
    re-created from the model's record (a state dict or a module's own weights, or random weights
    without their seed): only the user has them then.
    """
    trained = model.encoder or {}
    weights = trained.get("weights")
    if weights == "random" and "seed" in trained:
        arguments: dict[str, Any] = {"weights": None, "seed": int(trained["seed"])}
    elif weights == "imagenet" or (isinstance(weights, str) and Path(weights).suffix):
        arguments = {"weights": weights}
    elif weights == "none":  # an encoder without weights (colour_texture)
        arguments = {}
    else:
        return None
    geometry = model.patches or {}
    if geometry.get("patch_size"):
        arguments["patch_size"] = int(geometry["patch_size"])
    if geometry.get("mpp"):
        arguments["mpp"] = float(geometry["mpp"])
    arguments.update({option: geometry.get(option, absent) for option, absent in _EMBEDDING_OPTIONS.items()})
    if model.token_rep:
        arguments["tokens"] = math.isqrt(int(model.params["n_tokens"]))
    return {"encoder": trained.get("name"), **arguments, "key_added": model.use_rep}


#: The call that embeds one AnnData, named in the errors of :func:`predict_expression`.
EMBED_CALL = "hx.tl.embed_patches(adata"


def _reembed_hint(model: Histo2ExprModel, call: str = EMBED_CALL) -> str:
    """How to embed new slides with the encoder weights the model was trained on (a call that works).

    ``call``: the embedding call up to its first keyword argument, e.g. ``"hx.tl.embed_patches(adata"``.
    """
    trained = model.encoder or {}
    weights, name = trained.get("weights"), trained.get("name")
    arguments = frozen_encoder_arguments(model)
    if arguments is not None:
        listed = ", ".join(
            f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value!r}"
            for key, value in arguments.items()
            if key not in _EMBEDDING_OPTIONS or key in _differing_options(arguments)
        )
        return f"Re-embed with `{call}, {listed})`."
    if weights == "random":
        return (
            "The model's random encoder weights carry no seed and cannot be re-created; refit the model on "
            f"features embedded with `{call}, encoder={name!r}, weights=None, seed=0, "
            f"key_added={model.use_rep!r})` and embed new slides the same way."
        )
    differing = _differing_options(model.patches or {})
    return (  # a state dict or a module's own weights: only the user has them
        f"Re-embed with the encoder and weights the model was trained on ({name}, {weights}, weights hash "
        f"{trained.get('weights_sha1', '')[:12]}): `{call}, encoder=..., weights=..."
        f"{''.join(f', {k}={v!r}' for k, v in differing.items())}, key_added={model.use_rep!r})`."
    )


def _differing_options(geometry: Mapping[str, Any]) -> dict[str, Any]:
    """The embedding options recorded in ``geometry`` that differ from :func:`~histo2expr.tl.embed_patches`' defaults."""
    from ._embed import embed_patches

    defaults = inspect.signature(embed_patches).parameters
    trained = {option: geometry.get(option, absent) for option, absent in _EMBEDDING_OPTIONS.items()}
    return {k: v for k, v in trained.items() if v != defaults[k].default}


def check_feature_record(
    record: Mapping[str, Any], model: Histo2ExprModel, *, call: str = EMBED_CALL
) -> None:
    """Refuse features whose record (``uns[model.use_rep]``) differs from those the model was trained on.

    Encoder weights, patch scale and embedding options are compared; the error names the problem
    and the embedding call (``call``, see :func:`_reembed_hint`) that gives matching features.
    """
    trained, current = model.encoder or {}, record.get("encoder") or {}
    if trained.get("weights_sha1") and current.get("weights_sha1") != trained["weights_sha1"]:
        msg = (
            f"`obsm[{model.use_rep!r}]` was embedded with other encoder weights ({current.get('name', 'unknown')}, "
            f"weights {current.get('weights', 'unknown')}, hash {str(current.get('weights_sha1', ''))[:12]}) than "
            f"the model was trained on ({trained.get('name')}, weights {trained.get('weights')}, hash "
            f"{trained['weights_sha1'][:12]}). {_reembed_hint(model, call)}"
        )
        raise ValueError(msg)
    trained_mpp = (model.patches or {}).get("mpp")
    current_mpp = (record.get("patches") or {}).get("mpp")
    if trained_mpp and current_mpp and abs(current_mpp / trained_mpp - 1) > _MPP_TOLERANCE:
        msg = (
            f"The features were embedded at {current_mpp:.3g} µm/px but the model was trained at "
            f"{trained_mpp:.3g} µm/px; morphology at another scale gives wrong predictions. Re-embed with "
            f"`{call}, mpp={trained_mpp:.4g}, key_added={model.use_rep!r})`."
        )
        raise ValueError(msg)
    for option, default in _EMBEDDING_OPTIONS.items():
        trained_value = (model.patches or {}).get(option, default)
        current_value = (record.get("patches") or {}).get(option, default)
        if trained_value != current_value:
            msg = (
                f"The features were embedded with `{option}={current_value!r}` but the model was trained on "
                f"features embedded with `{option}={trained_value!r}`. {_reembed_hint(model, call)}"
            )
            raise ValueError(msg)


def _check_frozen_features(table: AnnData, model: Histo2ExprModel) -> np.ndarray:
    rep = model.use_rep
    assert rep is not None  # a model of the frozen regime was fitted on obsm[use_rep]
    features = features_of(table, rep)
    check_feature_record(table.uns.get(rep, {}), model)
    if model.token_rep:
        return _check_tokens(table, model, rep)
    if features.shape[1] != model.params["n_features"]:
        msg = (
            f"`obsm[{model.use_rep!r}]` has {features.shape[1]} features per spot; the model expects "
            f"{model.params['n_features']}. Embed with the model's encoder."
        )
        raise ValueError(msg)
    return features


def _check_tokens(table: AnnData, model: Histo2ExprModel, rep: str) -> np.ndarray:
    """The image tokens of a model trained on tokens of ``obsm[rep]``, checked against its token grid."""
    tokens = tokens_of(table, rep)
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


def _adapted_spots(table: AnnData, model: Histo2ExprModel, spots: SpotSet) -> SpotSet:
    """The spots of a model of the adapted regime: activations of its encoder's lower blocks, and its frozen blocks."""
    from ._adapted import inference_cache, side_features

    features = side_features(table, model.use_rep)
    if model.use_rep is not None and table.obsm[model.use_rep].shape[1] != model.params["n_features"]:
        msg = (
            f"`obsm[{model.use_rep!r}]` has {table.obsm[model.use_rep].shape[1]} features per spot; the model was "
            f"trained next to {model.params['n_features']}. {_reembed_hint(model)}"
        )
        raise ValueError(msg)
    state = model.method.network.image_input.to_state()
    activations = inference_cache(state, model.encoder or {}, spots.patches)
    return dataclasses.replace(spots, patches=None, features=features, activations=activations)


def predict_expression(
    data: AnnData | SpatialData,
    model: Histo2ExprModel,
    *,
    key_added: str = PREDICT_KEY,
    slide_key: str = "slide",
    table_key: str = "table",
    scale: str = "training",
    library_size: float | None = None,
    copy: bool = False,
    device: str | torch.device | None = None,
) -> AnnData | None:
    """Predict the model's genes for every spot of ``data`` from its H&E alone.

    Follows scanpy's return rule: the results are written into ``data`` (``copy=False``, returns
    ``None``) or into a copy that is returned (``copy=True``), whichever genes ``data`` measured —
    none at all for an H&E-only slide. :func:`histo2expr.get.predicted_adata` then makes an AnnData of
    the predicted genes for scanpy and squidpy.

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
        Key of the results (``uns``, ``obsm``) and prefix of the ``obs`` column written. A key that
        holds the cross-validation of :func:`~histo2expr.tl.fit_histo2expr` is refused.
    slide_key
        Column of ``obs`` with the slide of each spot (optional for one slide).
    table_key
        SpatialData only: the table to use.
    scale
        What the predicted values are. ``"training"`` (default): log-normalised expression
        (``log1p`` of counts per 10,000, as :func:`histo2expr.pp.normalize`) at the *training slides'*
        sequencing depth — what the model learned; on a slide sequenced much more shallowly, levels
        are higher than it measures while patterns are unaffected. ``"depth"``: the expected
        log-normalised value at this slide's depth (Poisson sampling of the predicted expression at
        the median library size of each slide, from ``obs["total_counts"]`` or ``library_size``).
        ``"standardized"``: each gene standardised within each slide (mean 0, SD 1), free of level.
    library_size
        With ``scale="depth"``: the median counts per spot of the new slides, when ``data`` has no
        counts (e.g. the typical depth of the assay that would measure them).
    copy
        Write into a copy of ``data`` (its AnnData table, for a SpatialData) and return it.
    device
        Where to predict: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``; the model
        goes back to its own device afterwards. `None`: the model's device
        (:meth:`~histo2expr.tl.Histo2ExprModel.to`; the CPU after loading).

    Returns
    -------
    ``None``, or the copy with ``copy=True``. Warns when a slide's sequencing depth or H&E colour
    is far from the training slides' (see ``docs/data_model.md``). Sets the following fields:

    ``.obsm[key_added]``
        The predictions: a DataFrame of spots x the model's genes, on ``scale``. Read it with
        :func:`histo2expr.get.predictions`.
    ``.obsm[f"X_{key_added}"]``
        The model's image embedding of each spot.
    ``.obs[f"{key_added}_similarity"]``
        Retrieval methods (``bleep``, ``chrep``, ...) only: the mean cosine similarity of each spot
        to the training spots it retrieves (:meth:`~histo2expr.models.Method.confidence`); low
        values flag spots unlike anything seen in training.
    ``.obs[f"{key_added}_ood_pvalue"]``, ``.obs[f"{key_added}_difficulty"]``
        Each spot's distance to its nearest training spots in the model's embedding: as a conformal
        p-value against spots of unseen training slides (small: unlike the training data), and relative
        to the median of those (1: typical; the per-spot scale of adaptive intervals). A slide with more
        than a quarter of its spots at p < 0.05 gets a warning with the numbers.
    ``.obsm[f"{key_added}_lower"]``, ``.obsm[f"{key_added}_upper"]``
        A model fitted with ``intervals``: the bounds of each prediction's conformal interval, on ``scale``,
        laid out like the predictions (read them with :func:`histo2expr.get.intervals`). With the
        model's ``interval_calibration="shift"`` (the default), a slide (``slide_key``; all spots are
        one slide without it) whose ``distance_ratio`` exceeds 1 gets its intervals widened that many times.
    ``.uns[key_added]``
        The record: ``kind`` (``"prediction"``), ``method``, ``protocol``, ``scale``, the model's
        description (genes, encoder, patches, parameters), ``cv_protocol``, ``cv_pcc`` (per gene: the
        mean PCC over the held-out slides of the model's cross-validation, ``cv_pcc_low`` /
        ``cv_pcc_high`` its 95% confidence interval and ``predictable``; NaN without it), ``shift``
        (per slide: ``n_spots``, ``ood_fraction``, ``distance_ratio``) and ``intervals`` (``level``,
        ``kind``, ``method``, ``calibration``) when written.
    """
    table = get_table(data, table_key)
    if not isinstance(model, Histo2ExprModel):
        msg = f"`model` must be a Histo2ExprModel (from `hx.tl.fit_histo2expr` or `.load`), got {type(model).__name__}."
        raise TypeError(msg)
    check_not_empty(table, what="prediction", genes=False)
    check_unique_var_names(table)
    one_of(scale, SCALES, "scale", fix="See the docstring for what each means.")
    check_key(table, key_added, kind="prediction", method=model.method.name, protocol=EXTERNAL_PROTOCOL)
    slides = slide_labels(table, slide_key, required=False)
    training = model.params.get("training_data")
    if scale == "depth":
        check_depth_inputs(table, training, library_size)
    start = logg.info(
        f"predicting {logg.counted(len(model.genes), 'gene')} with {model.method.name} on "
        f"{logg.counted(table.n_obs, 'spot')} of {logg.counted(len(set(slides)), 'slide')} ({scale} scale)"
    )
    with cpu_threads(0):
        if model.regime == "frozen":
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
                stain_normalization=geometry.get("stain_normalization"),
                slide_key=slide_key,
                table_key=table_key,
            )
            spots = SpotSet(
                coords=coordinates(table), groups=slides, patches=source, indices=np.arange(table.n_obs)
            )
            if model.regime == "adapted":
                spots = _adapted_spots(table, model, spots)
        own_device = model.device
        try:
            if device is not None:
                model.to(device)
            predicted = model.predict_log(spots)
            embedding = model.method.embed(spots)
            similarity = model.method.confidence(spots, embedding=embedding)
        finally:
            model.to(own_device)
    values = to_scale(
        predicted, slides, scale=scale, adata=table, training=training, library_size=library_size
    )
    warn_if_unlike_training(table, slides, training, scale=scale)
    trust = new_spots(model.trust, embedding, predicted, slides)
    obs, obsm, extra = {}, {Key.obsm.embedding(key_added): embedding}, {}
    if trust is not None:
        extra["shift"] = slide_shift(trust.p_value, trust.difficulty, slides)
        warn_if_out_of_distribution(extra["shift"], key_added)
        obs = {Key.obs.ood_pvalue(key_added): trust.p_value, Key.obs.difficulty(key_added): trust.difficulty}
    if trust is not None and trust.lower is not None and trust.upper is not None:  # a calibrated model
        bounds = [trust.lower, trust.upper]
        if scale == "standardized":
            bounds = [standardized_bounds(b, predicted, values, slides) for b in bounds]
        elif scale == "depth":
            bounds = [
                to_scale(b, slides, scale=scale, adata=table, training=training, library_size=library_size)
                for b in bounds
            ]
        extra["intervals"] = Calibration.from_state_dict((model.trust or {})["calibration"]).describe()
        for name, bound in zip((Key.obsm.lower(key_added), Key.obsm.upper(key_added)), bounds, strict=True):
            obsm[name] = prediction_frame(bound, table.obs_names, model.genes)
    if similarity is not None:
        obs[Key.obs.similarity(key_added)] = similarity
    cv_pcc = pd.DataFrame(
        {"cv_pcc": pd.Series(model.cv_gene_pcc or {}, dtype=np.float64).reindex(model.genes).to_numpy()},
        index=pd.Index(model.genes, name="gene"),
    )
    bounds_of_pcc = (model.trust or {}).get("predictability")
    if bounds_of_pcc:
        cv_pcc = cv_pcc.assign(**{name: np.asarray(v, dtype=np.float64) for name, v in bounds_of_pcc.items()})
        cv_pcc["predictable"] = cv_pcc["cv_pcc_low"] > 0
    record = {
        **model.describe(),
        "kind": "prediction",
        "protocol": EXTERNAL_PROTOCOL,
        "cv_protocol": str(model.params.get("protocol") or model.params.get("cv") or ""),
        "scale": SCALES[scale],
        "cv_pcc": cv_pcc,
        **extra,
    }
    target = table.copy() if copy else table
    write_results(
        target,
        key_added,
        record=record,
        predictions=prediction_frame(values, target.obs_names, model.genes),
        obs=obs,
        obsm=obsm,
        start=start,
    )
    return target if copy else None
