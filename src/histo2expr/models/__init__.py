"""Methods and their building blocks: encoders, retrieval, losses (tensors in, tensors out; never AnnData).

The submodules import torch and timm, so they are loaded on first use and
``import histo2expr`` stays light. Users normally reach the methods by name through
:func:`histo2expr.tl.fit_histo2expr`; this namespace documents them and lets
developers add one (:func:`register_method`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._device import resolve_device
    from .base import FitReport, Method, SpotSet, TrainConfig, available_methods, get_method, register_method
    from .bleep import BLEEPMethod
    from .chrep import CHRepMethod
    from .cmrcnet import CMRCNetMethod
    from .encoders import BUILTIN_ENCODERS, Encoder, build_encoder
    from .handcrafted import ColourTextureStats
    from .hest_probe import HESTProbeMethod
    from .inference import InferenceEncoder
    from .layers import pool_token_grid
    from .losses import bleep_loss, info_nce, pcc_loss, regression_loss, topology_loss, topology_prior
    from .nh2st import NH2STMethod
    from .presets import ENCODER_PRESETS, EncoderPreset, register_encoder_preset
    from .retrieval import aggregate, cosine_topk
    from .ridge import RidgeMethod
    from .stnet import STNetMethod

_LAZY = {
    "BUILTIN_ENCODERS": ".encoders",
    "Encoder": ".encoders",
    "build_encoder": ".encoders",
    "ColourTextureStats": ".handcrafted",
    "InferenceEncoder": ".inference",
    "ENCODER_PRESETS": ".presets",
    "EncoderPreset": ".presets",
    "register_encoder_preset": ".presets",
    "resolve_device": "._device",
    "pool_token_grid": ".layers",
    "Method": ".base",
    "SpotSet": ".base",
    "TrainConfig": ".base",
    "FitReport": ".base",
    "available_methods": ".base",
    "get_method": ".base",
    "register_method": ".base",
    "RidgeMethod": ".ridge",
    "HESTProbeMethod": ".hest_probe",
    "STNetMethod": ".stnet",
    "BLEEPMethod": ".bleep",
    "CHRepMethod": ".chrep",
    "NH2STMethod": ".nh2st",
    "CMRCNetMethod": ".cmrcnet",
    "bleep_loss": ".losses",
    "pcc_loss": ".losses",
    "regression_loss": ".losses",
    "info_nce": ".losses",
    "topology_loss": ".losses",
    "topology_prior": ".losses",
    "cosine_topk": ".retrieval",
    "aggregate": ".retrieval",
}

__all__ = [
    "BUILTIN_ENCODERS",
    "ENCODER_PRESETS",
    "BLEEPMethod",
    "CHRepMethod",
    "CMRCNetMethod",
    "ColourTextureStats",
    "Encoder",
    "EncoderPreset",
    "FitReport",
    "HESTProbeMethod",
    "InferenceEncoder",
    "Method",
    "NH2STMethod",
    "RidgeMethod",
    "STNetMethod",
    "SpotSet",
    "TrainConfig",
    "aggregate",
    "available_methods",
    "bleep_loss",
    "build_encoder",
    "cosine_topk",
    "get_method",
    "info_nce",
    "pcc_loss",
    "pool_token_grid",
    "register_encoder_preset",
    "register_method",
    "regression_loss",
    "resolve_device",
    "topology_loss",
    "topology_prior",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
