"""How far spots are from a model's training spots in its embedding: calibrated scores and slide warnings.

A :class:`NeighbourReference` keeps (a seeded sample of) the training spots' embeddings and, as the
reference of what "a new slide like the training slides" looks like, the distance of every kept spot
to its nearest kept spots *of other slides*. A new spot's distance to its nearest training spots is
then turned into a conformal p-value against that reference: a small p-value means the spot lies
farther from the training data than spots of unseen training slides did. The same distance,
relative to the reference median, is the per-spot difficulty of adaptive intervals (``_intervals``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: Nearest training spots whose mean distance is a spot's distance to the training data.
NEIGHBOURS = 10
#: Most training spots a reference keeps (a seeded sample): bounds memory and model size.
MAX_REFERENCE_SPOTS = 2000
#: A spot with a p-value below this is out of distribution.
OOD_P_VALUE = 0.05
#: A slide with more than this share of out-of-distribution spots (5x the expected share) gets a warning.
OOD_FRACTION_WARNING = 0.25
#: Query spots per block of the distance computation (memory bound: block x reference spots).
_BLOCK = 1024


def mean_neighbour_distance(
    query: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int,
    query_groups: np.ndarray | None = None,
    gallery_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Mean Euclidean distance of every query row to its ``k`` nearest gallery rows, block by block.

    With groups, gallery rows of the query row's own group are left out (distances to other slides).
    """
    query = np.asarray(query, dtype=np.float64).reshape(len(query), -1)
    gallery = np.asarray(gallery, dtype=np.float64).reshape(len(gallery), -1)
    gallery_norms = (gallery**2).sum(axis=1)
    out = np.empty(len(query))
    for start in range(0, len(query), _BLOCK):
        block = slice(start, start + _BLOCK)
        squared = (
            (query[block] ** 2).sum(axis=1)[:, None] + gallery_norms[None] - 2.0 * query[block] @ gallery.T
        )
        if query_groups is not None and gallery_groups is not None:
            squared[query_groups[block][:, None] == gallery_groups[None]] = np.inf
        n = min(k, int(np.isfinite(squared).sum(axis=1).min()))
        nearest = np.partition(squared, n - 1, axis=1)[:, :n]
        out[block] = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1)
    return out


@dataclass
class NeighbourReference:
    """Training spots' embeddings and their leave-slide-out neighbour distances (sorted).

    Attributes
    ----------
    gallery
        ``(m, d)`` embeddings of the kept training spots.
    reference
        ``(m,)`` sorted mean distance of each kept spot to its ``k`` nearest kept spots of other
        slides (of other spots, with a single training slide).
    k
        Neighbours averaged.
    """

    gallery: np.ndarray
    reference: np.ndarray
    k: int = NEIGHBOURS

    @classmethod
    def build(cls, embedding: np.ndarray, slides: np.ndarray, *, seed: int) -> NeighbourReference:
        """The reference of spots embedded as ``embedding`` (one row per spot) on ``slides``."""
        embedding = np.asarray(embedding, dtype=np.float32).reshape(len(embedding), -1)
        slides = np.asarray(slides).astype(str)
        if len(embedding) > MAX_REFERENCE_SPOTS:
            keep = np.sort(
                np.random.default_rng(seed).choice(len(embedding), MAX_REFERENCE_SPOTS, replace=False)
            )
            embedding, slides = embedding[keep], slides[keep]
        groups = slides if len(set(slides)) > 1 else np.arange(len(slides)).astype(str)
        distances = mean_neighbour_distance(
            embedding, embedding, k=NEIGHBOURS, query_groups=groups, gallery_groups=groups
        )
        return cls(gallery=embedding, reference=np.sort(distances), k=NEIGHBOURS)

    def scores(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per spot: the difficulty and the conformal p-value of its distance to the training spots.

        The difficulty is the mean distance ``d`` to the ``k`` nearest training spots relative to the
        reference median (1 is typical of an unseen training slide); the p-value is
        ``(1 + #{reference >= d}) / (m + 1)``.
        """
        distance = mean_neighbour_distance(embedding, self.gallery, k=self.k)
        scale = float(np.median(self.reference))
        above = len(self.reference) - np.searchsorted(self.reference, distance, side="left")
        return distance / (scale if scale > 0 else 1.0), (1.0 + above) / (len(self.reference) + 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and arrays (for a weights-only model file)."""
        return {"gallery": self.gallery, "reference": self.reference, "k": int(self.k)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> NeighbourReference:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            gallery=np.asarray(state["gallery"], dtype=np.float32),
            reference=np.asarray(state["reference"], dtype=np.float64),
            k=int(state["k"]),
        )


def distance_ratio(difficulty: np.ndarray) -> float:
    """A slide's median spot difficulty: its distance to the training spots relative to an unseen training slide's."""
    return float(np.median(difficulty))


def slide_shift(p_values: np.ndarray, difficulty: np.ndarray, slides: np.ndarray) -> pd.DataFrame:
    """How far each slide is from the training data, one row per slide.

    Columns ``n_spots``, ``ood_fraction`` (share of spots with p < :data:`OOD_P_VALUE`) and
    ``distance_ratio`` (:func:`distance_ratio`).
    """
    rows = []
    for slide in dict.fromkeys(slides):
        on_slide = slides == slide
        rows.append(
            {
                "slide": str(slide),
                "n_spots": int(on_slide.sum()),
                "ood_fraction": float(np.mean(p_values[on_slide] < OOD_P_VALUE)),
                "distance_ratio": distance_ratio(difficulty[on_slide]),
            }
        )
    return pd.DataFrame(rows)


def warn_if_out_of_distribution(shift: pd.DataFrame, key: str) -> None:
    """Warn, with the numbers, for every slide with more than :data:`OOD_FRACTION_WARNING` out-of-distribution spots."""
    for row in shift.itertuples():
        if row.ood_fraction > OOD_FRACTION_WARNING:
            msg = (
                f"Slide {row.slide!r} is far from the training data: {100 * row.ood_fraction:.0f}% of its spots are "
                f"out of distribution (p < {OOD_P_VALUE} against unseen training slides, where {100 * OOD_P_VALUE:.0f}% "
                f"are expected), median distance {row.distance_ratio:.2f}x that of an unseen training slide. Its "
                f"predictions and intervals are extrapolations: check the spots' `obs[{key + '_ood_pvalue'!r}]`, the "
                "stain and scanner, and whether the tissue type was in training."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
