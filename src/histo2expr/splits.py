"""Leak-free cross-validation splits: whole slides (or patients) on one side only.

A :class:`Fold` holds integer spot indices; every function checks that no group
(slide or patient) appears on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from ._validation import check_obs_key

if TYPE_CHECKING:
    from sklearn.model_selection import BaseCrossValidator

__all__ = [
    "Fold",
    "check_disjoint",
    "grouped_kfold",
    "inner_validation_split",
    "inner_validation_splits",
    "leave_one_patient_out",
    "leave_one_slide_out",
    "make_folds",
]


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold.

    Attributes
    ----------
    name
        Name of the held-out group(s), e.g. the held-out slide.
    train, test
        Integer indices of the training and held-out spots.
    """

    name: str
    train: np.ndarray
    test: np.ndarray


def _labels(groups: Sequence | np.ndarray | pd.Series) -> np.ndarray:
    labels = np.asarray(pd.Series(groups).astype(str))
    if labels.ndim != 1 or labels.size == 0:
        msg = "Expected a non-empty one-dimensional sequence of group labels (one per spot)."
        raise ValueError(msg)
    return labels


def _folds(labels: np.ndarray, splitter: BaseCrossValidator) -> list[Fold]:
    """The folds of a scikit-learn group splitter, groups numbered in order of first appearance."""
    codes, groups = pd.factorize(labels)
    return [
        Fold("+".join(sorted(str(g) for g in groups[np.unique(codes[test])])), train, test)
        for train, test in splitter.split(labels, groups=codes)
    ]


def _leave_one_group_out(labels: np.ndarray, what: str) -> list[Fold]:
    uniques = list(dict.fromkeys(labels))
    if len(uniques) < 2:
        msg = (
            f"Cross-validation needs at least two {what}s, but every spot belongs to {what} "
            f"{uniques[0]!r}. Add {what}s, or fit without `cv` (cv=None) and evaluate on another dataset."
        )
        raise ValueError(msg)
    from sklearn.model_selection import LeaveOneGroupOut

    # groups held out in order of first appearance (LeaveOneGroupOut takes them by sorted code)
    return _folds(labels, LeaveOneGroupOut())


def leave_one_slide_out(slides: Sequence | np.ndarray | pd.Series) -> list[Fold]:
    """One fold per slide: that slide held out, all others for training.

    Parameters
    ----------
    slides
        Slide label of every spot.
    """
    return _leave_one_group_out(_labels(slides), "slide")


def leave_one_patient_out(patients: Sequence | np.ndarray | pd.Series) -> list[Fold]:
    """One fold per patient: all slides of that patient held out together.

    Recommended whenever a patient contributes several (serial) sections, which
    would otherwise leak their shared biology from training into testing.

    Parameters
    ----------
    patients
        Patient label of every spot.
    """
    return _leave_one_group_out(_labels(patients), "patient")


def grouped_kfold(groups: Sequence | np.ndarray | pd.Series, n_splits: int, *, seed: int = 0) -> list[Fold]:
    """``n_splits`` folds of whole groups: scikit-learn's ``GroupKFold`` with the groups shuffled by ``seed``.

    Parameters
    ----------
    groups
        Group (slide or patient) label of every spot.
    n_splits
        Number of folds; at least 2 and at most the number of groups.
    seed
        Seed of the group shuffle.
    """
    from sklearn.model_selection import GroupKFold

    labels = _labels(groups)
    n_groups = len(set(labels))
    if not 2 <= n_splits <= n_groups:
        msg = (
            f"`cv={n_splits}` folds need between 2 and the number of groups ({n_groups}); "
            "lower the number of folds or use leave-one-out."
        )
        raise ValueError(msg)
    return _folds(labels, GroupKFold(n_splits, shuffle=True, random_state=seed))


def make_folds(
    adata: AnnData,
    cv: str | int,
    *,
    slide_key: str = "slide",
    patient_key: str | None = None,
    seed: int = 0,
) -> list[Fold]:
    """Folds of ``adata`` for ``cv``.

    Parameters
    ----------
    adata
        Dataset with a slide column (and a patient column for patient-level CV).
    cv
        ``"leave_one_slide_out"``, ``"leave_one_patient_out"`` or an integer number of
        grouped folds (by patient when ``patient_key`` is given, else by slide).
    slide_key, patient_key
        Columns of ``adata.obs``.
    seed
        Seed of the grouped k-fold shuffle.
    """
    slides = check_obs_key(adata, slide_key, what="slide")
    if cv == "leave_one_slide_out":
        folds = leave_one_slide_out(slides)
    elif cv == "leave_one_patient_out":
        if patient_key is None:
            msg = "`cv='leave_one_patient_out'` needs `patient_key=`, the column of `adata.obs` with the patient."
            raise ValueError(msg)
        folds = leave_one_patient_out(check_obs_key(adata, patient_key, what="patient"))
    elif isinstance(cv, int | np.integer) and not isinstance(cv, bool):
        groups = slides if patient_key is None else check_obs_key(adata, patient_key, what="patient")
        folds = grouped_kfold(groups, int(cv), seed=seed)
    else:
        msg = f"`cv` must be 'leave_one_slide_out', 'leave_one_patient_out' or an int, got {cv!r}."
        raise ValueError(msg)
    slide_labels = np.asarray(slides.astype(str))
    for fold in folds:
        check_disjoint(slide_labels, fold)
        if patient_key is not None:
            check_disjoint(np.asarray(adata.obs[patient_key].astype(str)), fold)
    return folds


def check_disjoint(groups: np.ndarray, fold: Fold) -> None:
    """Raise if any group label has spots on both sides of ``fold``."""
    shared = np.intersect1d(groups[fold.train], groups[fold.test])
    if shared.size:
        msg = (
            f"Fold {fold.name!r} has groups {sorted(shared)[:5]} on both the training and the held-out side; "
            "that would leak the held-out slides into training. Use leave_one_patient_out when slides share patients."
        )
        raise ValueError(msg)


def inner_validation_split(
    groups: Sequence | np.ndarray | pd.Series,
    *,
    fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Split training spots into fit and validation parts for early stopping.

    By whole groups (slides) when there are at least two: the validation part is
    ``max(1, round(fraction * n_groups))`` groups chosen with ``seed``, so early
    stopping sees a slide the model did not fit, as the held-out slide will be.
    With a single training group, a ``fraction`` of its spots is held out at random.
    The first of :func:`inner_validation_splits`.

    Parameters
    ----------
    groups
        Slide label of every *training* spot (never the held-out slide's).
    fraction
        Share of groups (or spots) used for validation, in (0, 0.5].
    seed
        Seed of the choice.

    Returns
    -------
    ``(fit_indices, validation_indices, how)`` — positions into ``groups``; ``how``
    is ``"by slide"`` or ``"by spot"``.
    """
    return inner_validation_splits(groups, 1, fraction=fraction, seed=seed)[0]


def inner_validation_splits(
    groups: Sequence | np.ndarray | pd.Series,
    n_splits: int,
    *,
    fraction: float = 0.2,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``n_splits`` fit / validation splits of training spots whose validation parts rotate (ensemble members).

    The groups (slides; the spots when there is a single group) are put in one order drawn with
    ``seed`` and split ``i`` validates on the next ``n_val`` of them after split ``i - 1``'s,
    wrapping around: the first ``n_groups // n_val`` splits validate on disjoint slides, and more
    splits than that start the rotation again. ``n_val`` is as in :func:`inner_validation_split`,
    whose split is the first one here.

    Parameters
    ----------
    groups
        Slide label of every *training* spot (never the held-out slide's).
    n_splits
        Number of splits, at least 1.
    fraction
        Share of groups (or spots) used for validation, in (0, 0.5].
    seed
        Seed of the order.

    Returns
    -------
    One ``(fit_indices, validation_indices, how)`` per split — positions into ``groups``; ``how``
    is ``"by slide"`` or ``"by spot"``.
    """
    if not 0 < fraction <= 0.5:
        msg = f"`fraction` must be in (0, 0.5], got {fraction}."
        raise ValueError(msg)
    if isinstance(n_splits, bool) or not isinstance(n_splits, int | np.integer) or n_splits < 1:
        msg = f"`n_splits` must be a positive integer, got {n_splits!r}."
        raise ValueError(msg)
    labels = _labels(groups)
    rng = np.random.default_rng(seed)
    uniques = np.array(list(dict.fromkeys(labels)))
    if len(uniques) >= 2:
        n_val = min(max(1, round(fraction * len(uniques))), len(uniques) - 1)
        first = rng.choice(uniques, size=n_val, replace=False)
        order = np.concatenate([first, rng.permutation(np.setdiff1d(uniques, first))])
        units, how = labels, "by slide"
    else:
        n = len(labels)
        if n < 2:
            msg = "The inner validation split needs at least two training spots."
            raise ValueError(msg)
        order = rng.permutation(n)
        n_val = min(max(1, round(fraction * n)), n - 1)
        units, how = np.arange(n), "by spot"
    masks = [np.isin(units, _rotated(order, i, n_val)) for i in range(n_splits)]
    return [(np.flatnonzero(~mask), np.flatnonzero(mask), how) for mask in masks]


def _rotated(order: np.ndarray, split: int, size: int) -> np.ndarray:
    """The ``size`` entries of ``order`` that split number ``split`` validates on (wrapping around)."""
    return order[(split * size + np.arange(size)) % len(order)]
