"""Per-column standardisation fitted on training spots only, with a floored scale."""

from __future__ import annotations

import numpy as np


class Standardizer:
    """Centre and scale columns with statistics of the training spots.

    A column whose standard deviation is tiny on the training slides would be
    blown up on a slide from another scanner, so the scale is floored at ``floor_ratio``
    times the median column standard deviation, and standardised values are clipped to
    ``±clip``.

    Parameters
    ----------
    floor_ratio
        Floor of each column's scale, relative to the median scale of all columns.
    clip
        Standardised values are clipped to ``[-clip, clip]``; ``None`` disables it.
    """

    def __init__(self, *, floor_ratio: float = 0.1, clip: float | None = 10.0) -> None:
        self.floor_ratio = floor_ratio
        self.clip = clip
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, values: np.ndarray) -> Standardizer:
        """Learn the mean and floored scale of every column of ``values``."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) < 2:
            msg = f"Standardisation needs a 2-D array with at least two rows, got shape {values.shape}."
            raise ValueError(msg)
        std = values.std(axis=0)
        positive = std[std > 0]
        floor = self.floor_ratio * float(np.median(positive)) if positive.size else 1.0
        self.mean_ = values.mean(axis=0)
        self.scale_ = np.maximum(std, max(floor, 1e-12))
        return self

    def _check(self, values: np.ndarray) -> np.ndarray:
        if self.mean_ is None:
            msg = "This Standardizer is not fitted yet; call fit() on the training spots first."
            raise RuntimeError(msg)
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-1] != len(self.mean_):
            msg = f"Expected {len(self.mean_)} columns, got {values.shape[-1]}."
            raise ValueError(msg)
        return values

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardise ``values`` with the training statistics (float32)."""
        z = (self._check(values) - self.mean_) / self.scale_
        if self.clip is not None:
            z = np.clip(z, -self.clip, self.clip)
        return z.astype(np.float32)

    def inverse_transform(self, values: np.ndarray) -> np.ndarray:
        """Map standardised values back to the original scale (float32)."""
        return (self._check(values) * self.scale_ + self.mean_).astype(np.float32)

    def state_dict(self) -> dict:
        """The fitted statistics, as plain lists (JSON- and h5ad-serialisable)."""
        self._check(np.zeros((1, 0 if self.mean_ is None else len(self.mean_))))
        return {
            "floor_ratio": self.floor_ratio,
            "clip": self.clip,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> Standardizer:
        """Rebuild a fitted Standardizer from :meth:`state_dict`."""
        scaler = cls(floor_ratio=state["floor_ratio"], clip=state["clip"])
        scaler.mean_ = np.asarray(state["mean"], dtype=np.float64)
        scaler.scale_ = np.asarray(state["scale"], dtype=np.float64)
        return scaler
