"""`import histo2expr` (and the CLI's parser) stay light: the heavy libraries load on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# torch, timm and lightning take seconds to import; spatialdata, squidpy and scanpy pull in dask,
# numba and friends; matplotlib, onnxruntime and faiss are needed only by the functions that use them.
HEAVY = (
    "torch",
    "timm",
    "lightning",
    "pytorch_lightning",
    "spatialdata",
    "squidpy",
    "scanpy",
    "matplotlib",
    "onnxruntime",
    "faiss",
)


def imported_heavy_modules(statement: str) -> list[str]:
    """The HEAVY modules in sys.modules after ``statement``, run in a fresh interpreter."""
    code = (
        f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import histo2expr",
        "import histo2expr as hx; from histo2expr import cli; cli._parser(); hx.io, hx.pp, hx.tl, hx.pl, hx.models",
    ],
)
def test_import_does_not_load_heavy_libraries(statement):
    assert imported_heavy_modules(statement) == []


def test_the_check_sees_heavy_imports():
    assert "torch" in imported_heavy_modules("from histo2expr.models import build_encoder")
