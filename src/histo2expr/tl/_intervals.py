"""Conformal prediction intervals per spot and gene, calibrated on slides the model did not train on.

Split conformal prediction (Vovk et al. 2005; Lei et al. 2018) needs residuals of spots the model
did not see. Here they come from an inner grouped cross-validation over the *training* slides of
the model being calibrated (at most ``MAX_CALIBRATION_FOLDS`` folds of whole slides: with five
training slides or fewer, leave-one-slide-out): the method is refitted on each inner fold's
training slides, with the outer model's genes, and predicts the inner held-out slides. A held-out
slide of the outer cross-validation never enters. The score of a calibration spot and gene is the
absolute residual of the log-normalised expression, divided (``"adaptive"``) by the spot's
difficulty, its distance to the training spots in the method's embedding relative to that of an
unseen training slide (:class:`~histo2expr.tl._ood.NeighbourReference`). Per gene, the half-width
is the ``ceil((n + 1) level)``-th smallest of the ``n`` scores (the finite-sample correction). Slides
are the exchangeable units: the guarantee holds on average over new slides like the training
slides, not on every slide (see ``docs/trust.md``). With ``interval_calibration="shift"`` the
intervals of a slide farther from the training spots than an unseen training slide typically is
(distance ratio ``r > 1``) are widened ``r``-fold: an extrapolation beyond what the calibration
slides show, read from the slide's images only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._validation import CALIBRATIONS, KINDS, check_intervals, log_expression
from ..splits import grouped_kfold
from ._ood import NeighbourReference, distance_ratio, slide_shift

if TYPE_CHECKING:
    from ._fit import _FoldFit, _Inputs


@dataclass(frozen=True)
class IntervalSettings:
    """Checked interval parameters of :func:`~histo2expr.tl.fit_histo2expr`."""

    level: float
    kind: str
    folds: int
    calibration: str

    def describe(self) -> dict[str, Any]:
        """The ``uns[key]["intervals"]`` record."""
        return {
            "level": self.level,
            "kind": self.kind,
            "method": KINDS[self.kind],
            "calibration": (
                f"inner grouped cross-validation over the training slides (at most {self.folds} folds of whole "
                f"slides), the method refitted on each; {CALIBRATIONS[self.calibration]}"
            ),
        }


def interval_settings(
    intervals: bool | str | None, level: float, folds: int, calibration: str
) -> IntervalSettings | None:
    """The interval parameters, checked (:func:`histo2expr._validation.check_intervals`): None when none are asked for."""
    kind, level, folds = check_intervals(intervals, level, folds, calibration)
    if kind is None:
        return None
    return IntervalSettings(level=level, kind=kind, folds=folds, calibration=calibration)


def check_calibration_slides(slides: np.ndarray, folds: list, settings: IntervalSettings | None) -> None:
    """Refuse intervals before any fit when a model to calibrate cannot be calibrated.

    That is, when it has fewer than two training slides, or fewer training spots (its calibration
    spots) than the level needs.
    """
    if settings is None:
        return
    training = [f.train for f in folds] or [np.arange(len(slides))]
    fewest = min(len(np.unique(slides[t])) for t in training)
    if fewest < 2:
        msg = (
            f"Intervals are calibrated on training slides the model did not fit, so every model needs at least two "
            f"training slides; here one has {fewest}. Add slides, use fewer cross-validation folds, or pass "
            "`intervals=False`."
        )
        raise ValueError(msg)
    _conformal_rank(min(len(t) for t in training), settings.level)
    if settings.calibration == "per_slide":
        spots = pd.Series(slides).value_counts()
        try:
            _conformal_rank(int(spots.min()), settings.level)
        except ValueError as error:
            msg = f"Slide {spots.idxmin()!r}: {error} (per-slide calibration), or pass `interval_calibration='pooled'`."
            raise ValueError(msg) from None


def _conformal_rank(n: int, level: float) -> int:
    """The rank ``ceil((n + 1) level)`` of the conformal quantile of ``n`` scores; an error when above ``n``."""
    rank = math.ceil((n + 1) * level - 1e-9)
    if rank > n:
        needed = math.ceil(level / (1 - level) - 1e-9)
        msg = (
            f"{n} calibration spots are too few for intervals at level {level}: the conformal quantile needs at "
            f"least {needed} spots. Lower `level` or add training slides."
        )
        raise ValueError(msg)
    return rank


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ``ceil((n + 1) level)``-th smallest of the ``n`` scores (split conformal quantile)."""
    rank = _conformal_rank(len(scores), level)
    return np.partition(np.asarray(scores, dtype=np.float64), rank - 1, axis=0)[rank - 1]


@dataclass
class Calibration:
    """Per-gene conformal half-widths of one fitted model.

    Attributes
    ----------
    level, kind
        Nominal coverage and kind (:data:`KINDS`).
    quantile
        ``(n_genes,)`` half-width of each gene (``"constant"``), or its multiple of a spot's difficulty.
    n_spots, n_slides
        Calibration spots and slides.
    rule
        How the quantile was taken and the intervals are scaled (:data:`CALIBRATIONS`).
    """

    level: float
    kind: str
    quantile: np.ndarray
    n_spots: int
    n_slides: int
    rule: str = "pooled"

    def bounds(
        self, predicted: np.ndarray, difficulty: np.ndarray, slides: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lower (at least 0, as log-normalised expression is) and upper bounds around ``predicted``.

        ``difficulty`` and ``slides`` are those of the predicted spots.
        """
        half = self.quantile[None, :] * (difficulty[:, None] if self.kind == "adaptive" else 1.0)
        if self.rule == "shift":
            half = half * shift_factor(difficulty, slides)[:, None]
        return np.maximum(predicted - half, 0.0).astype(np.float32), (predicted + half).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """The ``uns[key]["intervals"]`` record of predictions."""
        return {
            "level": self.level,
            "kind": self.kind,
            "method": KINDS[self.kind],
            "calibration": (
                f"{self.n_spots} spots of {self.n_slides} training slides, inner grouped cross-validation; "
                f"{CALIBRATIONS[self.rule]}"
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain values and arrays (for a weights-only model file)."""
        return {
            "level": self.level,
            "kind": self.kind,
            "quantile": np.asarray(self.quantile, dtype=np.float64),
            "n_spots": self.n_spots,
            "n_slides": self.n_slides,
            "rule": self.rule,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Calibration:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            level=float(state["level"]),
            kind=str(state["kind"]),
            quantile=np.asarray(state["quantile"], dtype=np.float64),
            n_spots=int(state["n_spots"]),
            n_slides=int(state["n_slides"]),
            rule=str(state.get("rule", "pooled")),  # models saved before the rule was kept
        )


def shift_factor(difficulty: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Per spot, ``max(1, r)`` with ``r`` its slide's :func:`~histo2expr.tl._ood.distance_ratio` (``"shift"``)."""
    factor = np.ones(len(difficulty))
    for slide in dict.fromkeys(slides):
        on_slide = slides == slide
        factor[on_slide] = max(1.0, distance_ratio(difficulty[on_slide]))
    return factor


def predicted_log(inputs: _Inputs, fitted: _FoldFit, positions: np.ndarray) -> np.ndarray:
    """Predicted log-normalised expression of the spots at ``positions``."""
    return fitted.scaler.inverse_transform(fitted.method.predict(inputs.spots(positions)))


def neighbour_reference(
    inputs: _Inputs, fitted: _FoldFit, train: np.ndarray, seed: int
) -> NeighbourReference:
    """The reference of a model's training spots in its own embedding."""
    return NeighbourReference.build(fitted.method.embed(inputs.spots(train)), inputs.slides[train], seed=seed)


def calibrate(
    inputs: _Inputs,
    train: np.ndarray,
    genes: list[str],
    fit: Callable[[np.ndarray, list[str]], _FoldFit],
    settings: IntervalSettings,
    *,
    seed: int,
) -> Calibration:
    """Calibrate a model fitted on the spots ``train`` (positions into ``inputs``) predicting ``genes``.

    ``fit(positions, genes)`` fits the method on those spots alone; it is called once per inner fold.
    """
    slides = inputs.slides[train]
    n_slides = len(set(slides))
    residuals, residual_slides = [], []
    for inner in grouped_kfold(slides, min(settings.folds, n_slides), seed=seed):
        fit_part, calibration_part = train[inner.train], train[inner.test]
        fitted = fit(fit_part, genes)
        residual = np.abs(
            log_expression(inputs.table[calibration_part], genes)
            - predicted_log(inputs, fitted, calibration_part)
        )
        if settings.kind == "adaptive":
            reference = neighbour_reference(inputs, fitted, fit_part, seed)
            difficulty, _ = reference.scores(fitted.method.embed(inputs.spots(calibration_part)))
            residual = residual / np.maximum(difficulty, 1e-6)[:, None]
        residuals.append(residual)
        residual_slides.append(slides[inner.test])
    scores, by_slide = np.concatenate(residuals), np.concatenate(residual_slides)
    if settings.calibration == "per_slide":  # Mondrian by slide: coverage on every calibration slide
        quantile = np.max(
            [conformal_quantile(scores[by_slide == s], settings.level) for s in dict.fromkeys(by_slide)],
            axis=0,
        )
    else:  # "pooled", and "shift", whose scaling is that of the slides predicted
        quantile = conformal_quantile(scores, settings.level)
    return Calibration(
        level=settings.level,
        kind=settings.kind,
        quantile=quantile,
        n_spots=len(scores),
        n_slides=n_slides,
        rule=settings.calibration,
    )


@dataclass
class HeldOut:
    """Intervals (None without calibration) and out-of-distribution scores of held-out or new spots."""

    lower: np.ndarray | None
    upper: np.ndarray | None
    difficulty: np.ndarray
    p_value: np.ndarray


def held_out(
    inputs: _Inputs,
    fitted: _FoldFit,
    train: np.ndarray,
    test: np.ndarray,
    predicted: np.ndarray,
    fit: Callable[[np.ndarray, list[str]], _FoldFit],
    settings: IntervalSettings,
    *,
    seed: int,
) -> HeldOut:
    """Intervals of the spots ``test`` predicted (``predicted``) by a model ``fitted`` on the spots ``train``."""
    calibration = calibrate(inputs, train, fitted.genes, fit, settings, seed=seed)
    reference = neighbour_reference(inputs, fitted, train, seed)
    difficulty, p_value = reference.scores(fitted.method.embed(inputs.spots(test)))
    lower, upper = calibration.bounds(predicted, difficulty, inputs.slides[test])
    return HeldOut(lower, upper, difficulty, p_value)


def new_spots(
    trust: Mapping[str, Any] | None, embedding: np.ndarray, predicted: np.ndarray, slides: np.ndarray
) -> HeldOut | None:
    """Intervals (None without calibration) and out-of-distribution scores of new spots on ``slides``, from a model's ``trust``.

    None for a model without a neighbour reference (saved before it existed).
    """
    if not trust or not trust.get("reference"):
        return None
    difficulty, p_value = NeighbourReference.from_state_dict(trust["reference"]).scores(embedding)
    lower = upper = None
    if trust.get("calibration"):
        lower, upper = Calibration.from_state_dict(trust["calibration"]).bounds(predicted, difficulty, slides)
    return HeldOut(lower, upper, difficulty, p_value)


def standardized_bounds(
    bound: np.ndarray, predicted: np.ndarray, values: np.ndarray, slides: np.ndarray
) -> np.ndarray:
    """A bound of ``predicted`` on the scale of ``values``, ``predicted`` standardised per gene within each slide."""
    out = np.empty_like(values, dtype=np.float32)
    for slide in dict.fromkeys(slides):
        rows = slides == slide
        spread = predicted[rows].astype(np.float64).std(axis=0)
        offset = (bound[rows] - predicted[rows]) / np.where(spread > 0, spread, 1.0)
        out[rows] = values[rows] + np.where(spread > 0, offset, 0.0)
    return out


def score_intervals(
    truth: np.ndarray, spots: HeldOut, slides: np.ndarray, genes: list[str]
) -> tuple[pd.DataFrame, dict[str, pd.Series], dict[str, pd.Series]]:
    """How the intervals of held-out spots did, slide by slide, against the measured ``truth``.

    Returns one row per slide (index ``slide``: ``coverage`` and ``interval_width``, the means over the
    genes, and the shift columns of :func:`~histo2expr.tl._ood.slide_shift`), and each slide's coverage
    and mean width of every gene.
    """
    if spots.lower is None or spots.upper is None:
        msg = "Scoring intervals needs spots with intervals: the model was fitted without `intervals`."
        raise ValueError(msg)
    lower, upper = spots.lower, spots.upper
    coverage, width = {}, {}
    covered = (truth >= lower) & (truth <= upper)
    for slide in dict.fromkeys(slides):
        on_slide = slides == slide
        coverage[slide] = pd.Series(covered[on_slide].mean(axis=0), index=genes)
        width[slide] = pd.Series((upper - lower)[on_slide].mean(axis=0), index=genes)
    per_slide = (
        slide_shift(spots.p_value, spots.difficulty, slides).set_index("slide").drop(columns="n_spots")
    )
    per_slide.insert(0, "coverage", [coverage[s].mean() for s in per_slide.index])
    per_slide.insert(1, "interval_width", [width[s].mean() for s in per_slide.index])
    return per_slide, coverage, width
