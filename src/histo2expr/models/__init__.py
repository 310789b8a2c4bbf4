"""Methods and their building blocks: the method contract, the training engine, encoders, retrieval, losses.

Tensors in, tensors out; never AnnData. The submodules import torch, Lightning and timm, so
they are loaded on first use and ``import histo2expr`` stays light. Users normally reach the
methods by name through :func:`histo2expr.tl.fit_histo2expr`; this namespace documents them and
lets developers add one (:class:`Method`, :func:`register_method`, the ``histo2expr.methods``
entry point group; see the docs page "Adding a method").
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapted import ActivationCache, AdaptedViews, TopBlocks
    from .backends import InferenceEncoder
    from .base import (
        FitReport,
        Method,
        MethodSettings,
        SpotSet,
        TrainConfig,
        available_methods,
        get_method,
        register_method,
    )
    from .bleep import BLEEPMethod, BLEEPSettings
    from .chrep import CHRepMethod, CHRepSettings
    from .cmrcnet import CMRCNetMethod, CMRCNetSettings
    from .encoders import BUILTIN_ENCODERS, Encoder, build_encoder
    from .ensemble import Ensemble
    from .gallery import Gallery
    from .handcrafted import ColourTextureStats
    from .hest_probe import HESTProbeMethod, HESTProbeSettings
    from .inference import resolve_device
    from .ivf import IVFIndex
    from .layers import pool_token_grid
    from .losses import bleep_loss, info_nce, pcc_loss, regression_loss, topology_loss, topology_prior
    from .nh2st import NH2STMethod, NH2STSettings
    from .presets import ENCODER_PRESETS, EncoderPreset, register_encoder_preset
    from .retrieval import aggregate, cosine_topk
    from .ridge import RidgeMethod, RidgeSettings
    from .stnet import STNetMethod, STNetSettings
    from .training import LossOutput, SpotNetwork, TrainingPlan, check_engine_flags, train_network

_LAZY = {
    "ActivationCache": ".adapted",
    "AdaptedViews": ".adapted",
    "TopBlocks": ".adapted",
    "BUILTIN_ENCODERS": ".encoders",
    "Encoder": ".encoders",
    "build_encoder": ".encoders",
    "ColourTextureStats": ".handcrafted",
    "InferenceEncoder": ".backends",
    "ENCODER_PRESETS": ".presets",
    "EncoderPreset": ".presets",
    "register_encoder_preset": ".presets",
    "resolve_device": ".inference",
    "pool_token_grid": ".layers",
    "Method": ".base",
    "MethodSettings": ".base",
    "SpotSet": ".base",
    "TrainConfig": ".base",
    "FitReport": ".base",
    "available_methods": ".base",
    "get_method": ".base",
    "Ensemble": ".ensemble",
    "register_method": ".base",
    "LossOutput": ".training",
    "SpotNetwork": ".training",
    "TrainingPlan": ".training",
    "train_network": ".training",
    "check_engine_flags": ".training",
    "Gallery": ".gallery",
    "IVFIndex": ".ivf",
    "RidgeMethod": ".ridge",
    "HESTProbeMethod": ".hest_probe",
    "HESTProbeSettings": ".hest_probe",
    "STNetMethod": ".stnet",
    "BLEEPMethod": ".bleep",
    "CHRepMethod": ".chrep",
    "NH2STMethod": ".nh2st",
    "CMRCNetMethod": ".cmrcnet",
    "BLEEPSettings": ".bleep",
    "CHRepSettings": ".chrep",
    "CMRCNetSettings": ".cmrcnet",
    "NH2STSettings": ".nh2st",
    "RidgeSettings": ".ridge",
    "STNetSettings": ".stnet",
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
    "ActivationCache",
    "AdaptedViews",
    "BLEEPMethod",
    "BLEEPSettings",
    "CHRepMethod",
    "CHRepSettings",
    "CMRCNetMethod",
    "CMRCNetSettings",
    "ColourTextureStats",
    "Encoder",
    "EncoderPreset",
    "Ensemble",
    "FitReport",
    "Gallery",
    "HESTProbeMethod",
    "HESTProbeSettings",
    "IVFIndex",
    "InferenceEncoder",
    "LossOutput",
    "Method",
    "MethodSettings",
    "NH2STMethod",
    "NH2STSettings",
    "RidgeMethod",
    "RidgeSettings",
    "STNetMethod",
    "STNetSettings",
    "SpotNetwork",
    "SpotSet",
    "TopBlocks",
    "TrainConfig",
    "TrainingPlan",
    "aggregate",
    "available_methods",
    "bleep_loss",
    "build_encoder",
    "check_engine_flags",
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
    "train_network",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
