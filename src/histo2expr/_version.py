"""The installed version of histo2expr: its git tag when it was installed (hatch-vcs), as scverse packages do."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histo2expr")
except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, never installed
    __version__ = "0.0.0"
