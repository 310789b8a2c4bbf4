"""Patches around spots: lazy crops at one physical scale, stain normalisation, augmentations, torch datasets."""

from ._augment import Augment, augment_rng, dihedral, dihedral_views
from ._dataset import EpochSampler, PatchDataset, patch_loader
from ._source import PatchSource
from ._stain import StainVectors, hed_jitter, macenko_stains, normalize_stains

__all__ = [
    "Augment",
    "EpochSampler",
    "PatchDataset",
    "PatchSource",
    "StainVectors",
    "augment_rng",
    "dihedral",
    "dihedral_views",
    "hed_jitter",
    "macenko_stains",
    "normalize_stains",
    "patch_loader",
]
