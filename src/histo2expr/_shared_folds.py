"""Folds fitted once and shared by the cross-validations of one method under several schemes.

Two cross-validations of one AnnData with the same parameters but ``cv`` and ``patient_key`` that
train a fold on the same spots fit the same model: a fold's fit depends on its training spots and the
seed, not on the scheme that made the fold. E.g. leave-one-patient-out's fold of a patient with one
slide is leave-one-slide-out's fold of that slide. Inside :func:`sharing_fold_fits`,
:func:`histo2expr.tl.fit_histo2expr` keeps the folds it fits and takes a fold fitted by an earlier
cross-validation, or handed to the block (fitted in another process, on a copy of the AnnData),
instead of fitting it again, with identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

#: The data of the fits inside :func:`sharing_fold_fits` and its fits, by key (fit parameters, training spots).
_FOLD_FITS: ContextVar[tuple[object, dict[Hashable, Any]] | None] = ContextVar("fold_fits", default=None)


@contextmanager
def sharing_fold_fits(data: object, fits: Mapping[Hashable, Any] | None = None) -> Iterator[None]:
    """Cross-validations of ``data`` inside the block fit each fold they share once; the fits are dropped at its end.

    ``fits``: folds fitted before, by the key :func:`fit_once` gets for them (fitted on ``data`` or a
    copy of it, e.g. in another process), taken instead of fitting them again.
    """
    token = _FOLD_FITS.set((data, dict(fits or {})))
    try:
        yield
    finally:
        _FOLD_FITS.reset(token)


def fit_once(data: object, key: Hashable | None, fit: Callable[[], T]) -> tuple[T, bool]:
    """``fit()`` on ``data``, or inside :func:`sharing_fold_fits` of ``data`` the fit with ``key`` there; and whether it was.

    ``key=None`` (a fit that cannot be identified), calls outside the block and fits of other data
    always fit.
    """
    block = _FOLD_FITS.get()
    if key is None or block is None or block[0] is not data:
        return fit(), False
    fits = block[1]
    if key in fits:
        return fits[key], True
    fits[key] = fitted = fit()
    return fitted, False
