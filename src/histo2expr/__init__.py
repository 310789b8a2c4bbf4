"""histo2expr: predict spatial gene expression from H&E images, scverse-style."""

from __future__ import annotations

from . import datasets, get, io, metrics, models, patches, pl, pp, splits, tl
from ._settings import settings as settings  # hx.settings, as scanpy.settings
from ._version import __version__ as __version__

__all__ = ["datasets", "get", "io", "metrics", "models", "patches", "pl", "pp", "splits", "tl"]
