"""Shared fixtures: an isolated cache, the real her2st cohort when present."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

HER2ST = Path(
    os.environ.get(
        "HISTO2EXPR_HER2ST", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
    )
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep decoded images and synthetic cohorts out of the user's cache."""
    os.environ["HISTO2EXPR_CACHE_DIR"] = str(tmp_path_factory.mktemp("histo2expr-cache"))


@pytest.fixture(scope="session")
def her2st_path() -> Path:
    """Path of the real her2st cohort; the test is skipped when it is absent."""
    if not (HER2ST / "data" / "ST-cnts").is_dir():
        pytest.skip(
            f"real-data test: the her2st cohort is not at {HER2ST.resolve()} "
            "(set HISTO2EXPR_HER2ST to its folder to run it)"
        )
    return HER2ST.resolve()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@contextmanager
def _torch_threads(n: int):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and the CPU is shared with other jobs."""
    with _torch_threads(1):
        yield


@pytest.fixture
def two_torch_threads():
    """Two threads: results must not depend on the order in which threads add up their parts."""
    with _torch_threads(2):
        yield


class TinyEncoder(nn.Module):
    """A few-parameter CNN for end-to-end tests: seconds on a CPU."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="session")
def tiny_encoder() -> type[TinyEncoder]:
    """The TinyEncoder class (tests build fresh instances)."""
    return TinyEncoder


@pytest.fixture(scope="session")
def patch_spots():
    """Factory: a tiny synthetic cohort as 32 px patches, returned as ``(spots(positions), slides, source)``.

    ``spots`` builds an end-to-end SpotSet of the given positions with standardised log-CP10k targets.
    """
    import histo2expr as hx
    from histo2expr.models import SpotSet
    from histo2expr.patches import PatchSource

    def make(n_slides: int, n_genes: int):
        adata = hx.datasets.synthetic(n_slides=n_slides, spots_per_side=6, n_genes=n_genes)
        source = PatchSource(adata, patch_size=32)
        counts = np.asarray(adata.X.todense())
        expression = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
        targets = ((expression - expression.mean(0)) / (expression.std(0) + 1e-6)).astype(np.float32)
        slides = adata.obs["slide"].to_numpy().astype(str)
        coords = np.asarray(adata.obsm["spatial"], dtype=float)

        def spots(positions):
            return SpotSet(
                coords=coords[positions],
                groups=slides[positions],
                patches=source,
                indices=positions,
                targets=targets[positions],
            )

        return spots, slides, source

    return make


@pytest.fixture
def round_trip():
    """Rebuild a fitted method from its state dict after a ``torch.save`` / ``torch.load(weights_only=True)``."""
    import io

    import torch

    def rebuild(method, **kwargs):
        buffer = io.BytesIO()
        torch.save(method.state_dict(), buffer)
        buffer.seek(0)
        return type(method).from_state_dict(torch.load(buffer, weights_only=True), **kwargs)

    return rebuild


def _snapshot(adata):
    """Everything a failed call must leave as it was."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return {
        "X": x.copy(),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        "layers": sorted(adata.layers),
        "uns": sorted(adata.uns),
    }


def assert_same(adata, before):
    """``adata`` holds what :func:`_snapshot` recorded."""
    now = _snapshot(adata)
    np.testing.assert_array_equal(now["X"], before["X"])
    pd.testing.assert_frame_equal(now["obs"], before["obs"])
    pd.testing.assert_frame_equal(now["var"], before["var"])
    assert sorted(now["obsm"]) == sorted(before["obsm"]) and now["layers"] == before["layers"]
    for key, value in before["obsm"].items():
        np.testing.assert_array_equal(now["obsm"][key], value)
    assert now["uns"] == before["uns"]


@pytest.fixture
def refuses():
    """``refuses(adata, call, error, match)``: ``call(adata)`` raises a clear error and leaves ``adata`` as it was."""

    def check(adata, call, error, match):
        before = _snapshot(adata)
        with pytest.raises(error, match=match):
            call(adata)
        assert_same(adata, before)

    return check


@pytest.fixture
def unchanged_on_failure():
    """``unchanged_on_failure(adata, call, errors)``: the result of ``call(adata)``, or None after a clear error
    (one of ``errors``, with a message) that left ``adata`` as it was."""

    def check(adata, call, errors):
        before = _snapshot(adata)
        try:
            return call(adata)
        except errors as error:
            assert len(str(error)) > 20, f"an unclear error: {error!r}"
            assert_same(adata, before)
            return None

    return check
