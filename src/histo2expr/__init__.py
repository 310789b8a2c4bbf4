"""histo2expr: predict spatial gene expression from H&E images, scverse-style."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets, get, io, metrics, models, patches, pl, pp, splits, tl
from ._settings import settings as settings  # hx.settings, as scanpy.settings

try:
    __version__ = version("histo2expr")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["datasets", "get", "io", "metrics", "models", "patches", "pl", "pp", "splits", "tl"]
