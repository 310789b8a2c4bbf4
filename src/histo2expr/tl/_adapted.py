"""The adapted-encoder regime on AnnData: cache the lower blocks' activations, pick the frozen blocks that join them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._data import features_of

if TYPE_CHECKING:
    from anndata import AnnData

    from ..models.adapted import ActivationCache, AdaptedViews
    from ..patches import PatchSource


def side_features(table: AnnData, use_rep: str | None) -> np.ndarray | None:
    """The frozen blocks of ``obsm[use_rep]`` other than the spot view (context, neighbours), or None.

    The spot view is what the adapted encoder computes itself; the other blocks that
    :func:`~histo2expr.tl.embed_patches` appended join its features.
    """
    if use_rep is None:
        return None
    if use_rep not in table.obsm:
        msg = (
            f"`adata.obsm[{use_rep!r}]` is missing: in the adapted regime its context and neighbour blocks join the "
            f"adapted features. Embed them with `hx.tl.embed_patches(adata, key_added={use_rep!r})`, or pass "
            "`use_rep=None` for the adapted features alone."
        )
        raise KeyError(msg)
    features = features_of(table, use_rep)
    blocks = (table.uns.get(use_rep) or {}).get("blocks")
    if not blocks or "spot" not in blocks:
        msg = (
            f"`uns[{use_rep!r}]` does not say which columns of `obsm[{use_rep!r}]` are the spot view, so the "
            "context and neighbour blocks that join the adapted features cannot be found. Embed with "
            f"`hx.tl.embed_patches(adata, key_added={use_rep!r})`, or pass `use_rep=None`."
        )
        raise ValueError(msg)
    columns = [np.arange(*map(int, span)) for name, span in blocks.items() if name != "spot"]
    if not columns:
        return None
    return features[:, np.concatenate(columns)]


def activation_cache(
    source: PatchSource,
    *,
    encoder: Any,
    weights: Any,
    trainable_blocks: int,
    views: AdaptedViews,
    seed: int,
    batch_size: int,
    progress: bool,
) -> ActivationCache:
    """The lower blocks' activations of every spot of ``source`` under ``views`` (computed once, then cached)."""
    from ..models import build_encoder
    from ..models.adapted import ActivationCache

    model = build_encoder(encoder, weights=weights, seed=seed)
    return ActivationCache.build(
        source,
        model,
        trainable_blocks=trainable_blocks,
        views=views,
        batch_size=batch_size,
        progress=progress,
    )


def encoder_record(cache: ActivationCache, seed: int) -> dict[str, Any]:
    """The model's record of the adapted encoder: its description, with the seed of random weights."""
    record = dict(cache.encoder)
    if record.get("weights") == "random":
        record["seed"] = seed
    return record


def inference_cache(state: dict[str, Any], encoder: dict[str, Any], source: PatchSource) -> ActivationCache:
    """The activations a model trained in the adapted regime predicts from: its ``tta`` views of ``source``.

    Parameters
    ----------
    state
        The method's image input state (``ImageInput.to_state``).
    encoder
        The model's encoder record (:func:`encoder_record`).
    source
        Where the patches are cut, at the model's geometry.
    """
    from ..models.adapted import AdaptedViews

    weights = encoder.get("weights")
    if weights == "random" and "seed" in encoder:
        arguments: dict[str, Any] = {"weights": None, "seed": int(encoder["seed"])}
    elif weights == "imagenet":
        arguments = {"weights": "imagenet", "seed": 0}
    else:
        msg = (
            f"The model's adapted encoder ({encoder.get('name')}, weights {weights}) cannot be re-created from its "
            "record (only ImageNet and seeded random weights can); predict with the fitted model in the session "
            "that fitted it, or fit it with `weights='imagenet'`."
        )
        raise ValueError(msg)
    cache = activation_cache(
        source,
        encoder=encoder["name"],
        trainable_blocks=int(state["trainable_blocks"]),
        views=AdaptedViews(**state["views"]).inference(),
        batch_size=64,
        progress=False,
        **arguments,
    )
    if cache.encoder["weights_sha1"] != encoder["weights_sha1"]:
        msg = (
            f"The encoder re-created for prediction ({encoder['name']}, weights {weights}) has other weights "
            f"than the model was trained on (hash {str(encoder['weights_sha1'])[:12]}); refit the model."
        )
        raise ValueError(msg)
    return cache
