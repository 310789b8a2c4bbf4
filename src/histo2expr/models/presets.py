"""Pathology foundation-model encoders by name: their architecture, normalisation, pooling and weights.

An :class:`EncoderPreset` records what a model card prescribes: the timm architecture and keyword
arguments that reproduce the published checkpoint, the input size and magnification the model was
trained at, the per-channel mean / std, and how a patch's feature vector is pooled from the tokens.
:func:`histo2expr.models.build_encoder` builds any registered preset by name
(``build_encoder("uni2-h")``); :func:`register_encoder_preset` adds another one.

Weights come from a local checkpoint (``weights="path/to/pytorch_model.bin"``), from the Hugging
Face hub (``weights="default"``: the published checkpoint, which needs network access and, for gated
models, an account that was granted access), or are random (``weights=None``). Checkpoints saved by
Hugging Face ``transformers`` (DINOv2 naming: Phikon-v2, Hibou) are renamed to timm's keys by
``hf_dinov2_to_timm``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Normalisation of the Bioptimus H-optimus models (their model cards).
_BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: Normalisation of the Hibou models (their repository's example).
_HIBOU_MEAN = (0.7068, 0.5755, 0.7220)
_HIBOU_STD = (0.1950, 0.2316, 0.1816)
#: Normalisation of CONCH (OpenAI CLIP statistics).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: How a preset's feature vector is pooled from the backbone's output tokens.
POOLINGS = ("class_token", "class_and_patch_mean")
#: Formats of published checkpoints that presets read.
CHECKPOINT_FORMATS = ("timm", "hf_dinov2")


@dataclass(frozen=True)
class EncoderPreset:
    """A pathology foundation model as its model card prescribes it.

    Attributes
    ----------
    name
        The name :func:`~histo2expr.models.build_encoder` knows it by (e.g. ``"uni2-h"``).
    hub_id
        Hugging Face hub repository of the published weights (e.g. ``"MahmoodLab/UNI2-h"``).
    feature_dim
        Length of a patch's feature vector.
    mean, std
        Per-channel normalisation of [0, 1] RGB images (default ImageNet's).
    timm_name, timm_kwargs
        The timm architecture and a function returning the keyword arguments of
        ``timm.create_model`` that reproduce the checkpoint (a function, so that timm layers
        such as ``SwiGLUPacked`` are only imported when the model is built); ``num_classes=0`` is
        added. ``None`` for a preset with its own ``build``.
    checkpoint_format
        ``"timm"`` (keys of the timm model) or ``"hf_dinov2"`` (Hugging Face ``transformers``
        DINOv2 keys, renamed by ``hf_dinov2_to_timm``).
    pooling
        ``"class_token"`` (the timm head's class token) or ``"class_and_patch_mean"`` (the class
        token concatenated with the mean of the patch tokens, register tokens excluded).
    input_size
        Side in pixels of the patches the model was trained on.
    microns_per_pixel
        Pixel size the model was trained at (``None``: mixed magnifications).
    licence
        The licence of the weights, as the model card states it.
    gated
        Whether the hub repository asks users to request access.
    reference
        The model card.
    build
        Only for models that timm cannot build: a function of ``weights`` (a path, ``"default"``
        for the hub, or ``None``) returning ``(module, source)``, the module mapping normalised
        images to ``(B, feature_dim)``.
    notes
        What users must know (extra packages, differences to the card).
    """

    name: str
    hub_id: str
    feature_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    timm_name: str | None = None
    timm_kwargs: Callable[[], dict[str, Any]] = dict
    checkpoint_format: str = "timm"
    pooling: str = "class_token"
    input_size: int = 224
    microns_per_pixel: float | None = 0.5
    licence: str = ""
    gated: bool = True
    reference: str = ""
    build: Callable[[Any], tuple[nn.Module, str]] | None = field(default=None, repr=False)
    notes: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            msg = f"`pooling` must be one of {POOLINGS}, got {self.pooling!r}."
            raise ValueError(msg)
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            msg = f"`checkpoint_format` must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}."
            raise ValueError(msg)
        if (self.timm_name is None) == (self.build is None):
            msg = f"Preset {self.name!r} needs exactly one of `timm_name` and `build`."
            raise ValueError(msg)

    def create_backbone(self, **overrides: Any) -> nn.Module:
        """The timm architecture with random weights and no classifier (works under ``torch.device("meta")``).

        ``overrides`` replace or extend the preset's timm keyword arguments (e.g. ``drop_path_rate``).
        """
        import timm

        return timm.create_model(
            self.timm_name, pretrained=False, num_classes=0, **{**self.timm_kwargs(), **overrides}
        )


#: Registered presets by name; add one with :func:`register_encoder_preset`.
ENCODER_PRESETS: dict[str, EncoderPreset] = {}


def register_encoder_preset(preset: EncoderPreset, *, overwrite: bool = False) -> EncoderPreset:
    """Make ``preset`` available by name to :func:`~histo2expr.models.build_encoder` and ``embed_patches``.

    Parameters
    ----------
    preset
        The model's architecture, normalisation, pooling and hub repository.
    overwrite
        Replace a registered preset of the same name.

    Returns
    -------
    The preset (so that it can be used as a decorator-free one-liner).

    Examples
    --------
    >>> import timm
    >>> register_encoder_preset(  # doctest: +SKIP
    ...     EncoderPreset(
    ...         name="h0-mini",
    ...         hub_id="bioptimus/H0-mini",
    ...         timm_name="vit_base_patch14_reg4_dinov2",
    ...         timm_kwargs=lambda: {"img_size": 224, "mlp_ratio": 5.33334, "mlp_layer": timm.layers.SwiGLUPacked},
    ...         feature_dim=1536,
    ...         pooling="class_and_patch_mean",
    ...         mean=(0.707223, 0.578729, 0.703617),
    ...         std=(0.211883, 0.230117, 0.177517),
    ...     )
    ... )
    """
    if not isinstance(preset, EncoderPreset):
        msg = f"Register an EncoderPreset, got {type(preset).__name__}."
        raise TypeError(msg)
    if preset.name in ENCODER_PRESETS and not overwrite:
        msg = f"An encoder preset named {preset.name!r} is already registered; pass `overwrite=True` to replace it."
        raise ValueError(msg)
    ENCODER_PRESETS[preset.name] = preset
    return preset


# --- weights -------------------------------------------------------------------------------------


def hub_state_dict(preset: EncoderPreset) -> dict[str, torch.Tensor]:
    """Download (or take from the local Hugging Face cache) the published weights of ``preset``.

    Raises a :class:`RuntimeError` that names the fix when the repository is gated and this
    account has no access, or when the hub cannot be reached and the file is not cached.
    """
    from huggingface_hub import errors
    from timm.models import load_state_dict_from_hf

    url = f"https://huggingface.co/{preset.hub_id}"
    local = (
        f"or download the checkpoint on a machine that can reach the hub and pass its path as "
        f"`weights=` (e.g. `build_encoder({preset.name!r}, weights='pytorch_model.bin')`)"
    )
    try:
        return load_state_dict_from_hf(preset.hub_id)
    except errors.GatedRepoError as err:
        msg = (
            f"The weights of {preset.name!r} ({url}) are gated: request access on the model page, then log in "
            "with an account that was granted it (`hf auth login`, or set the HF_TOKEN environment variable), "
            f"{local}."
        )
        raise RuntimeError(msg) from err
    except errors.RepositoryNotFoundError as err:
        msg = (
            f"The hub repository {preset.hub_id!r} of {preset.name!r} was not found or is not visible to you. "
            f"Gated models answer so without a token: request access on {url} and log in (`hf auth login` or "
            f"HF_TOKEN), {local}."
        )
        raise RuntimeError(msg) from err
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, OSError) as err:
        msg = (
            f"The weights of {preset.name!r} could not be fetched from {url} ({type(err).__name__}: {err}): "
            "this machine cannot reach the hub (no network, or HF_HUB_OFFLINE=1) and the file is not in the "
            f"local Hugging Face cache. Run once where the hub is reachable (it caches the file), {local}; "
            "or `weights=None` for random weights."
        )
        raise RuntimeError(msg) from err


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.weights_in.weight": "mlp.fc1.weight",  # SwiGLU: [gate; value], as timm's SwiGLUPacked
    "mlp.weights_in.bias": "mlp.fc1.bias",
    "mlp.weights_out.weight": "mlp.fc2.weight",
    "mlp.weights_out.bias": "mlp.fc2.bias",
}
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def hf_dinov2_to_timm(state: Mapping[str, torch.Tensor], *, no_embed_class: bool) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``transformers`` DINOv2 checkpoint (with or without registers) to timm's ViT keys.

    The published naming (``embeddings.cls_token``, ``encoder.layer.N.attention.attention.query``,
    ``...attention.output.dense``, ``...layer_scale1.lambda1``, ``...mlp.fc1`` or the SwiGLU
    ``...mlp.weights_in`` / ``weights_out``, ``layernorm``) becomes timm's (``cls_token``,
    ``blocks.N.attn.qkv`` with query, key and value stacked, ``attn.proj``, ``ls1.gamma``,
    ``mlp.fc1``, ``norm``). ``embeddings.mask_token`` (used only in pre-training) is dropped.

    Parameters
    ----------
    state
        The checkpoint.
    no_embed_class
        Whether the timm model adds position embeddings to the patch tokens only (timm's DINOv2
        models with registers). The checkpoint's class-token position embedding is then folded
        into the class token, which computes the same as the checkpoint's model.

    Returns
    -------
    A new state dict in timm's naming.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer = _HF_LAYER.match(key)
        if key == "embeddings.mask_token":
            continue
        if layer is None:
            top = {
                "embeddings.cls_token": "cls_token",
                "embeddings.register_tokens": "reg_token",
                "embeddings.position_embeddings": "pos_embed",
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "layernorm.weight": "norm.weight",
                "layernorm.bias": "norm.bias",
            }
            if key not in top:
                msg = (
                    f"Unexpected key {key!r} in a Hugging Face DINOv2 checkpoint; it has no timm counterpart."
                )
                raise ValueError(msg)
            out[top[key]] = tensor
            continue
        index, rest = int(layer.group(1)), layer.group(2)
        part = next((p for p in _HF_QKV if rest.startswith(f"{p}.")), None)
        if part is not None:
            qkv.setdefault(index, {})[f"{_HF_QKV.index(part)}.{rest.rsplit('.', 1)[1]}"] = tensor
        elif rest in _HF_BLOCK_RENAMES:
            out[f"blocks.{index}.{_HF_BLOCK_RENAMES[rest]}"] = tensor
        else:
            msg = f"Unexpected key {key!r} in a Hugging Face DINOv2 checkpoint; it has no timm counterpart."
            raise ValueError(msg)
    for index, parts in qkv.items():
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{i}.{kind}") for i in range(3)]
            if any(p is None for p in pieces):
                msg = f"Layer {index} of the DINOv2 checkpoint lacks its query, key or value {kind}."
                raise ValueError(msg)
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(pieces, dim=0)
    if no_embed_class and "pos_embed" in out and "cls_token" in out:
        position = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + position[:, :1]
        out["pos_embed"] = position[:, 1:]
    return out


def read_preset_checkpoint(
    preset: EncoderPreset, state: Mapping[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """The checkpoint ``state`` of ``preset`` in the keys of its timm model ``backbone``.

    A ``"hf_dinov2"`` checkpoint is converted when it is in ``transformers`` naming (keys under
    ``embeddings.``); one already in timm naming is used as it is.
    """
    if preset.checkpoint_format == "hf_dinov2" and any(key.startswith("embeddings.") for key in state):
        return hf_dinov2_to_timm(state, no_embed_class=bool(getattr(backbone, "no_embed_class", False)))
    return dict(state)


# --- the presets --------------------------------------------------------------------------------


def _swiglu(**kwargs: Any) -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **kwargs}


def _conch(weights: Any) -> tuple[nn.Module, str]:
    """CONCH's image tower through the official ``conch`` package (CoCa with attentional pooling, not timm)."""
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as err:
        msg = (
            "The 'conch' encoder needs the official CONCH package, which is not on PyPI: install it with "
            "`pip install git+https://github.com/Mahmoodlab/CONCH.git` (CONCH is a CoCa model whose image "
            "embedding comes from an attentional pooler that timm does not provide)."
        )
        raise ImportError(msg) from err
    if weights is None:
        msg = (
            "The 'conch' encoder cannot be built with random weights (the CONCH package builds it from a "
            "checkpoint); pass `weights=` the path of pytorch_model.bin, or 'default' for the hub."
        )
        raise ValueError(msg)
    source = "hf_hub:MahmoodLab/conch" if isinstance(weights, str) and weights == "default" else str(weights)
    model = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=source, return_transform=False)
    return _ConchImageEncoder(model), "hub" if source.startswith("hf_hub:") else source


class _ConchImageEncoder(nn.Module):
    """``encode_image(proj_contrast=False, normalize=False)`` of a CONCH model: the 512-d image embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, proj_contrast=False, normalize=False)


_H_OPTIMUS_0 = EncoderPreset(
    name="h-optimus-0",
    hub_id="bioptimus/H-optimus-0",
    timm_name="vit_giant_patch14_reg4_dinov2",
    timm_kwargs=lambda: {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    feature_dim=1536,
    mean=_BIOPTIMUS_MEAN,
    std=_BIOPTIMUS_STD,
    licence="Apache 2.0",
    reference="https://huggingface.co/bioptimus/H-optimus-0",
)

for _preset in (
    EncoderPreset(
        name="uni",
        hub_id="MahmoodLab/UNI",
        timm_name="vit_large_patch16_224",
        timm_kwargs=lambda: {
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "dynamic_img_size": True,
        },
        feature_dim=1024,
        licence="CC-BY-NC-ND 4.0",
        reference="https://huggingface.co/MahmoodLab/UNI",
    ),
    EncoderPreset(
        name="uni2-h",
        hub_id="MahmoodLab/UNI2-h",
        timm_name="vit_giant_patch14_224",
        timm_kwargs=lambda: _swiglu(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        feature_dim=1536,
        licence="CC-BY-NC-ND 4.0",
        reference="https://huggingface.co/MahmoodLab/UNI2-h",
    ),
    EncoderPreset(
        name="conch",
        hub_id="MahmoodLab/CONCH",
        build=_conch,
        feature_dim=512,
        mean=_OPENAI_MEAN,
        std=_OPENAI_STD,
        input_size=448,
        licence="CC-BY-NC-ND 4.0",
        reference="https://huggingface.co/MahmoodLab/CONCH",
        notes="Needs the official `conch` package (GitHub only); no random initialisation, no tokens.",
    ),
    EncoderPreset(
        name="virchow2",
        hub_id="paige-ai/Virchow2",
        timm_name="vit_huge_patch14_224",
        timm_kwargs=lambda: _swiglu(
            img_size=224,
            init_values=1e-5,
            reg_tokens=4,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
        ),
        feature_dim=2560,
        pooling="class_and_patch_mean",
        microns_per_pixel=None,
        licence="CC-BY-NC-ND 4.0",
        reference="https://huggingface.co/paige-ai/Virchow2",
        notes="Trained at mixed magnifications (5x to 40x); 0.5 µm/px (20x) is a common choice.",
    ),
    _H_OPTIMUS_0,
    replace(
        _H_OPTIMUS_0,  # the same architecture and normalisation, trained on more data
        name="h-optimus-1",
        hub_id="bioptimus/H-optimus-1",
        licence="see the model card",
        reference="https://huggingface.co/bioptimus/H-optimus-1",
    ),
    EncoderPreset(
        name="prov-gigapath",
        hub_id="prov-gigapath/prov-gigapath",
        timm_name="vit_giant_patch14_dinov2",
        timm_kwargs=lambda: {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        feature_dim=1536,
        licence="Apache 2.0",
        reference="https://huggingface.co/prov-gigapath/prov-gigapath",
    ),
    EncoderPreset(
        name="phikon-v2",
        hub_id="owkin/phikon-v2",
        timm_name="vit_large_patch16_224",
        timm_kwargs=lambda: {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        checkpoint_format="hf_dinov2",
        feature_dim=1024,
        licence="see the model card",
        gated=False,
        reference="https://huggingface.co/owkin/phikon-v2",
    ),
    EncoderPreset(
        name="hibou-b",
        hub_id="histai/hibou-b",
        timm_name="vit_base_patch14_reg4_dinov2",
        timm_kwargs=lambda: _swiglu(img_size=224, mlp_ratio=5.33334, dynamic_img_size=True),
        checkpoint_format="hf_dinov2",
        feature_dim=768,
        mean=_HIBOU_MEAN,
        std=_HIBOU_STD,
        licence="Apache 2.0",
        gated=False,
        reference="https://huggingface.co/histai/hibou-b",
    ),
):
    register_encoder_preset(_preset)
