"""Folds fitted once and shared by the cross-validations of one method under several schemes.

Two cross-validations of one AnnData with the same parameters but ``cv`` and ``patient_key`` that
train a fold on the same spots fit the same model: a fold's fit depends on its training spots and the
seed, not on the scheme that made the fold. E.g. leave-one-patient-out's fold of a patient with one
slide is leave-one-slide-out's fold of that slide. Inside :func:`sharing_fold_fits`,
:func:`histo2expr.tl.fit_histo2expr` keeps the folds it fits and takes a fold fitted by an earlier
cross-validation instead of fitting it again, with identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

#: The folds fitted inside :func:`sharing_fold_fits`, by key (AnnData, fit parameters, training spots).
_FOLD_FITS: ContextVar[dict[Hashable, Any] | None] = ContextVar("fold_fits", default=None)


@contextmanager
def sharing_fold_fits() -> Iterator[None]:
    """Cross-validations inside the block fit each fold they share once; the fits are dropped at its end."""
    token = _FOLD_FITS.set({})
    try:
        yield
    finally:
        _FOLD_FITS.reset(token)


def fit_once(key: Hashable | None, fit: Callable[[], T]) -> tuple[T, bool]:
    """``fit()``, or inside :func:`sharing_fold_fits` the result of an earlier call with ``key``; and whether it was.

    ``key=None`` (a fit that cannot be identified) and calls outside the block always fit.
    """
    fits = _FOLD_FITS.get()
    if key is None or fits is None:
        return fit(), False
    if key in fits:
        return fits[key], True
    fits[key] = fitted = fit()
    return fitted, False
