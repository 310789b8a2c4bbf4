"""The retrieval gallery: exact and approximate (faiss IVF) index, state round trip (histo2expr.models.gallery)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from histo2expr.models.gallery import Gallery
from histo2expr.models.retrieval import cosine_topk, faiss_available

needs_faiss = pytest.mark.skipif(
    not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)"
)
#: Recall@20 the IVF index must reach on the clustered set below (measured: 0.99 to 1.00 over five seeds).
MIN_RECALL = 0.95


@pytest.fixture
def clustered(rng):
    """3,000 keys around 40 centres (cosine about 0.7 within a centre), 60 queries, 3 values per key."""
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    keys = centres[rng.integers(0, 40, 3000)] + 0.6 * rng.standard_normal((3000, 16)).astype(np.float32)
    queries = centres[rng.integers(0, 40, 60)] + 0.6 * rng.standard_normal((60, 16)).astype(np.float32)
    return keys, queries, rng.standard_normal((3000, 3)).astype(np.float32)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)]))


def exact_cosines(queries: np.ndarray, keys: np.ndarray, indices: np.ndarray) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return np.einsum("qd,qkd->qk", q.astype(np.float64), g[indices].astype(np.float64))


def test_exact_gallery_is_cosine_topk(clustered):
    keys, queries, values = clustered
    gallery = Gallery(keys, values, top_k=20)
    sims, idx = gallery.search(queries)
    expected = cosine_topk(queries, keys, 20)
    np.testing.assert_array_equal(idx, expected[1])
    np.testing.assert_array_equal(sims, expected[0])
    assert gallery.index == "exact" and gallery.ivf is None


@needs_faiss
def test_ivf_recall_and_exact_similarities(clustered):
    keys, queries, values = clustered
    gallery = Gallery(keys, values, top_k=20, index="ivf", n_lists=30, n_probe=4)
    sims, idx = gallery.search(queries)
    exact = cosine_topk(queries, keys, 20)[1]
    assert recall(idx, exact) >= MIN_RECALL
    np.testing.assert_allclose(sims, exact_cosines(queries, keys, idx), atol=1e-5)  # re-ranked exactly
    assert (np.diff(sims, axis=1) <= 0).all()
    assert gallery.predict(queries).shape == (60, 3)
    # scanning every list, only the 4-bit codes' ranking of the candidates is approximate
    gallery.ivf.n_probe = 30
    assert recall(gallery.search(queries)[1], exact) >= 0.99


@needs_faiss
def test_ivf_is_deterministic_with_a_seed(clustered):
    keys, queries, values = clustered
    first = Gallery(keys, values, top_k=10, index="ivf", n_lists=30, n_probe=2, seed=7).search(queries)
    second = Gallery(keys, values, top_k=10, index="ivf", n_lists=30, n_probe=2, seed=7).search(queries)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


@needs_faiss
def test_ivf_queries_with_too_few_candidates_are_searched_exactly(clustered):
    keys, queries, values = clustered
    keys, values = keys[:200], values[:200]
    gallery = Gallery(keys, values, top_k=15, index="ivf", n_lists=50, n_probe=1)  # lists of about 4 keys
    np.testing.assert_array_equal(gallery.search(queries)[1], cosine_topk(queries, keys, 15)[1])


@pytest.mark.parametrize("index", ["exact", pytest.param("ivf", marks=needs_faiss)])
def test_state_round_trip(clustered, tmp_path, index):
    keys, queries, values = clustered
    gallery = Gallery(keys, values, top_k=10, weighting="softmax", temperature=0.1, index=index, n_probe=3)
    torch.save(gallery.state_dict(), tmp_path / "gallery.pt")
    restored = Gallery.from_state_dict(torch.load(tmp_path / "gallery.pt", weights_only=True))
    assert restored.index == index and (restored.temperature, restored.weighting) == (0.1, "softmax")
    if index == "ivf":
        assert (restored.ivf.n_lists, restored.ivf.n_probe, restored.ivf.seed) == (55, 3, 0)
    np.testing.assert_array_equal(restored.search(queries)[1], gallery.search(queries)[1])
    np.testing.assert_array_equal(restored.predict(queries), gallery.predict(queries))


def test_ivf_without_faiss_says_how_to_install_it(clustered, monkeypatch):
    keys, _, values = clustered
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"pip install faiss-cpu.*index='exact'"):
        Gallery(keys, values, top_k=5, index="ivf")
    assert not faiss_available()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"index": "hnsw"}, ValueError, r"`index` must be one of \['exact', 'ivf'\]"),
        pytest.param(
            {"index": "ivf", "n_lists": 4000}, ValueError, "exceeds the 3000 gallery keys", marks=needs_faiss
        ),
        pytest.param({"index": "ivf", "n_probe": 0}, ValueError, "n_probe", marks=needs_faiss),
    ],
)
def test_argument_errors(clustered, kwargs, error, message):
    keys, _, values = clustered
    with pytest.raises(error, match=message):
        Gallery(keys, values, top_k=5, **kwargs)


@needs_faiss
def test_ivf_queries_of_another_width_are_an_error(clustered):
    keys, queries, values = clustered
    gallery = Gallery(keys, values, top_k=5, index="ivf", n_lists=10)
    with pytest.raises(ValueError, match="queries have 15 features but the gallery has 16"):
        gallery.search(queries[:, :15])


@needs_faiss
def test_ivf_refuses_exclusions(clustered):
    keys, _, values = clustered
    gallery = Gallery(keys, values, top_k=5, index="ivf", n_lists=10)
    with pytest.raises(ValueError, match=r"exclusions .*exclude_self.* need an exact gallery"):
        gallery.search(keys, exclude_self=True)
