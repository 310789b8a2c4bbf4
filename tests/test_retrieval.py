"""Exact chunked cosine top-k and aggregation of retrieved rows (histo2expr.models.retrieval)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

from histo2expr.models.retrieval import aggregate, cosine_topk

CHUNKS = [(4096, 65536), (37, 101), (16, 33), (5, 7), (3, 2), (1, 1)]


def brute_force(queries, gallery, k, excluded=None):
    """Reference: float64 cosine similarities, excluded pairs dropped, ties to the lower index."""
    q = np.asarray(queries, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    sims = q @ g.T
    if excluded is not None:
        sims[excluded] = -np.inf
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.fixture(params=["torch", "numpy"])
def block_product(request, monkeypatch):
    """Each CPU block product: a machine uses one of them (``cpu_block_product``)."""
    monkeypatch.setattr("histo2expr.models.retrieval.cpu_block_product", lambda: request.param)
    return request.param


@pytest.fixture
def data(rng):
    return rng.standard_normal((37, 8)).astype(np.float32), rng.standard_normal((101, 8)).astype(np.float32)


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), CHUNKS)
def test_matches_brute_force(data, block_product, query_chunk, gallery_chunk):
    queries, gallery = data
    before = queries.copy(), gallery.copy()
    sims, idx = cosine_topk(queries, gallery, 10, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    ref_sims, ref_idx = brute_force(queries, gallery, 10)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and sims.shape == idx.shape == (37, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_array_equal(queries, before[0])  # inputs are not normalised in place
    np.testing.assert_array_equal(gallery, before[1])


def test_torch_and_float64_inputs(data):
    queries, gallery = data
    expected = cosine_topk(queries, gallery, 5)
    q_tensor, g_tensor = torch.from_numpy(queries.copy()), torch.from_numpy(gallery.copy())
    for q, g in [(q_tensor, g_tensor), (queries.astype(np.float64), gallery.tolist())]:
        sims, idx = cosine_topk(q, g, 5, gallery_chunk=13)
        np.testing.assert_array_equal(idx, expected[1])
        np.testing.assert_allclose(sims, expected[0], atol=1e-6)
    # float32 CPU tensors are used without conversion: they must not be normalised in place
    np.testing.assert_array_equal(q_tensor.numpy(), queries)
    np.testing.assert_array_equal(g_tensor.numpy(), gallery)


def test_k_equal_to_gallery_size_returns_everything_sorted(data):
    queries, gallery = data
    _sims, idx = cosine_topk(queries, gallery, 101, gallery_chunk=40)
    np.testing.assert_array_equal(idx, brute_force(queries, gallery, 101)[1])


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(4096, 65536), (16, 33), (3, 2)])
def test_exclude_self(data, query_chunk, gallery_chunk):
    _, gallery = data
    _sims, idx = cosine_topk(
        gallery,
        gallery,
        10,
        exclude_self=True,
        query_chunk=query_chunk,
        gallery_chunk=gallery_chunk,
    )
    assert not (idx == np.arange(101)[:, None]).any()
    np.testing.assert_array_equal(idx, brute_force(gallery, gallery, 10, excluded=np.eye(101, dtype=bool))[1])
    # without exclusion every row finds itself first
    np.testing.assert_array_equal(cosine_topk(gallery, gallery, 1)[1][:, 0], np.arange(101))


def test_exclude_ids_of_a_query_subset(data):
    _, gallery = data
    names = np.array([f"spot{i}" for i in range(101)])
    subset = np.array([3, 50, 50, 99, 0])
    _, idx = cosine_topk(
        gallery[subset],
        gallery,
        4,
        query_ids=names[subset],
        gallery_ids=names,
        gallery_chunk=16,
    )
    excluded = subset[:, None] == np.arange(101)[None, :]
    np.testing.assert_array_equal(idx, brute_force(gallery[subset], gallery, 4, excluded=excluded)[1])
    assert not (idx == subset[:, None]).any()


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(4096, 65536), (7, 9)])
def test_group_exclusion(data, rng, query_chunk, gallery_chunk):
    queries, gallery = data
    query_slides = rng.choice(["A", "B", "C"], size=37)
    gallery_slides = rng.choice(["A", "B", "C", "D"], size=101)
    _, idx = cosine_topk(
        queries,
        gallery,
        8,
        query_groups=query_slides,
        gallery_groups=gallery_slides,
        query_chunk=query_chunk,
        gallery_chunk=gallery_chunk,
    )
    same_slide = query_slides[:, None] == gallery_slides[None, :]
    assert not np.take_along_axis(same_slide, idx, axis=1).any()
    np.testing.assert_array_equal(idx, brute_force(queries, gallery, 8, excluded=same_slide)[1])


def test_self_and_group_exclusion_together(data, rng):
    _, gallery = data
    slides = rng.integers(0, 3, size=101)
    _, idx = cosine_topk(
        gallery,
        gallery,
        6,
        exclude_self=True,
        query_groups=slides,
        gallery_groups=slides,
        gallery_chunk=20,
    )
    excluded = (slides[:, None] == slides[None, :]) | np.eye(101, dtype=bool)
    np.testing.assert_array_equal(idx, brute_force(gallery, gallery, 6, excluded=excluded)[1])


def test_zero_vectors_have_similarity_zero(data):
    queries, gallery = data
    gallery = gallery.copy()
    gallery[[4, 60]] = 0.0
    queries = np.vstack([np.zeros((1, 8), np.float32), queries])
    sims, idx = cosine_topk(queries, gallery, 101, gallery_chunk=16)
    assert np.isfinite(sims).all()
    np.testing.assert_array_equal(sims[0], 0.0)  # a zero query ties everywhere: lowest indices first
    np.testing.assert_array_equal(idx[0], np.arange(101))
    rows, cols = np.nonzero(np.isin(idx[1:], [4, 60]))
    np.testing.assert_array_equal(sims[1:][rows, cols], 0.0)


def exactly_tied_data(rng):
    """Rows whose normalised entries are 0, ±1/4, ±1/2 or 1: every dot product is exact in float32,
    whatever the summation order, so equal similarities are equal bit for bit on every device."""
    distinct = np.zeros((7, 16), dtype=np.float32)
    distinct[0, 0] = distinct[1, 5] = distinct[2, 10] = 1.0
    distinct[3, :4] = 1.0
    distinct[4, 4:8] = 3.0
    distinct[5, :4] = [1.0, -1.0, 1.0, -1.0]  # row 6 stays a zero vector
    gallery = distinct[rng.integers(0, 7, size=40)]
    queries = np.vstack([np.ones(16, np.float32), distinct[0], distinct[3], -distinct[5], distinct[6]])
    return queries, gallery


@pytest.mark.parametrize("gallery_chunk", [65536, 10, 4, 3])
def test_ties_go_to_the_lower_gallery_index(rng, block_product, gallery_chunk):
    queries, gallery = exactly_tied_data(rng)
    for k in (1, 5, 17, 40):
        sims, idx = cosine_topk(queries, gallery, k, gallery_chunk=gallery_chunk)
        ref_sims, ref_idx = brute_force(queries, gallery, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(sims, ref_sims)


def test_ties_with_exclusions(rng, block_product):
    queries, gallery = exactly_tied_data(rng)
    slides = np.arange(40) % 3
    query_slides = np.array([0, 1, 2, 0, 1])
    _, idx = cosine_topk(
        queries,
        gallery,
        9,
        query_groups=query_slides,
        gallery_groups=slides,
        gallery_chunk=7,
    )
    excluded = query_slides[:, None] == slides[None, :]
    np.testing.assert_array_equal(idx, brute_force(queries, gallery, 9, excluded=excluded)[1])


def test_identical_calls_are_deterministic(data):
    queries, gallery = data
    first = cosine_topk(queries, gallery, 7, gallery_chunk=9)
    second = cosine_topk(queries, gallery, 7, gallery_chunk=9)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


class _SliceRecorder:
    """Array-like that records which row blocks are read."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.array[key]


def test_gallery_is_streamed_in_chunks(tmp_path, data):
    queries, gallery = data
    memmap = np.memmap(tmp_path / "gallery.f32", dtype=np.float32, mode="w+", shape=gallery.shape)
    memmap[:] = gallery
    memmap.flush()
    recorder = _SliceRecorder(
        np.memmap(tmp_path / "gallery.f32", dtype=np.float32, mode="r", shape=gallery.shape)
    )
    _sims, idx = cosine_topk(queries, recorder, 10, gallery_chunk=30)
    np.testing.assert_array_equal(idx, brute_force(queries, gallery, 10)[1])
    assert recorder.reads == [(0, 30), (30, 60), (60, 90), (90, 101)]  # each block read once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(data):
    queries, gallery = data
    cpu = cosine_topk(queries, gallery, 10, gallery_chunk=16)
    gpu = cosine_topk(queries, gallery, 10, gallery_chunk=16, device="cuda")
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 102}, "exceeds the gallery size"),
        ({"k": 0}, "positive integer"),
        ({"k": 2.5}, "positive integer"),
        ({"k": 5, "query_chunk": 0}, "query_chunk"),
        ({"k": 101, "exclude_self": True, "queries": "gallery"}, "eligible"),
        ({"k": 5, "exclude_self": True}, "pass `query_ids` and `gallery_ids`"),
        ({"k": 5, "query_groups": np.zeros(37)}, "Pass both `query_groups` and `gallery_groups`"),
        ({"k": 5, "query_ids": np.arange(37), "gallery_ids": np.arange(100)}, "one label per gallery row"),
    ],
)
def test_argument_errors(data, kwargs, message):
    queries, gallery = data
    kwargs = dict(kwargs)
    if kwargs.pop("queries", None) == "gallery":
        queries = gallery
    with pytest.raises(ValueError, match=message):
        cosine_topk(queries, gallery, **kwargs)


def test_too_few_eligible_after_group_exclusion_names_the_query(data):
    queries, gallery = data
    gallery_slides = np.array(["A"] * 95 + ["B"] * 6)
    query_slides = np.array(["B"] * 36 + ["A"])
    with pytest.raises(ValueError, match=r"query 36 has only 6 eligible of 101 .*own group.*at most 6"):
        cosine_topk(queries, gallery, 7, query_groups=query_slides, gallery_groups=gallery_slides)
    _, idx = cosine_topk(queries, gallery, 6, query_groups=query_slides, gallery_groups=gallery_slides)
    np.testing.assert_array_equal(np.sort(idx[36]), np.arange(95, 101))


def test_shape_and_value_errors(data):
    queries, gallery = data
    with pytest.raises(ValueError, match="queries have 7 features but the gallery has 8"):
        cosine_topk(queries[:, :7], gallery, 3)
    with pytest.raises(ValueError, match="2-D"):
        cosine_topk(queries[0], gallery, 3)
    bad = gallery.copy()
    bad[77, 2] = np.nan
    with pytest.raises(ValueError, match="gallery row 77 contains NaN"):
        cosine_topk(queries, bad, 3, gallery_chunk=16)
    bad = queries.copy()
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match="queries row 5 contains NaN or infinite"):
        cosine_topk(bad, gallery, 3)


# --- aggregate ---------------------------------------------------------------------------------


@pytest.fixture
def retrieved():
    values = np.array([[0.0, 10.0], [2.0, 20.0], [4.0, 40.0], [6.0, 60.0]], dtype=np.float32)
    indices = np.array([[1, 3], [0, 0], [2, 1]])
    sims = np.array([[0.9, 0.5], [0.3, 0.3], [0.8, 0.1]], dtype=np.float32)
    return values, indices, sims


def test_aggregate_mean(retrieved):
    values, indices, sims = retrieved
    out = aggregate(values, indices, sims, query_chunk=2)
    np.testing.assert_allclose(out, [[4.0, 40.0], [0.0, 10.0], [3.0, 30.0]])
    assert out.dtype == np.float32
    assert aggregate(values.astype(np.float64), indices).dtype == np.float64
    np.testing.assert_allclose(aggregate(torch.from_numpy(values), torch.from_numpy(indices)), out)
    np.testing.assert_allclose(aggregate(scipy.sparse.csr_matrix(values), indices), out)


def test_aggregate_softmax_by_hand(retrieved):
    values, indices, sims = retrieved
    out = aggregate(values, indices, sims, weighting="softmax", temperature=0.5, query_chunk=1)
    w = np.exp(np.array([0.9, 0.5]) / 0.5)
    w /= w.sum()
    np.testing.assert_allclose(out[0], w[0] * values[1] + w[1] * values[3], rtol=1e-6)
    np.testing.assert_allclose(out[1], values[0])  # same row twice: weights do not matter
    w = np.exp(np.array([0.8, 0.1]) / 0.5)
    w /= w.sum()
    np.testing.assert_allclose(out[2], w[0] * values[2] + w[1] * values[1], rtol=1e-6)


def test_aggregate_softmax_limits(retrieved):
    values, indices, sims = retrieved
    sharp = aggregate(values, indices, sims, weighting="softmax", temperature=1e-6)
    np.testing.assert_allclose(sharp, values[indices[:, 0]])  # temperature -> 0: the top-1 row
    assert np.isfinite(sharp).all()
    flat = aggregate(values, indices, sims, weighting="softmax", temperature=1e6)
    np.testing.assert_allclose(flat, aggregate(values, indices), rtol=1e-5)  # large: the mean
    large = aggregate(values, indices, sims * 1000, weighting="softmax", temperature=1e-3)
    assert np.isfinite(large).all()  # exp(1e6) would overflow without the max subtraction


def test_aggregate_from_memmap_and_cosine_topk(tmp_path, data, rng):
    queries, gallery = data
    expression = rng.random((101, 5)).astype(np.float32)
    memmap = np.memmap(tmp_path / "expr.f32", dtype=np.float32, mode="w+", shape=expression.shape)
    memmap[:] = expression
    sims, idx = cosine_topk(queries, gallery, 4)
    out = aggregate(memmap, idx, sims, weighting="softmax", temperature=0.1, query_chunk=5)
    w = np.exp(sims / 0.1)
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("qk,qkg->qg", w, expression[idx]), rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"weighting": "softmax", "temperature": 1.0}, "needs the `similarities`"),
        (("sims",), {"weighting": "softmax"}, "positive, finite `temperature`"),
        (("sims",), {"weighting": "softmax", "temperature": 0.0}, "positive, finite `temperature`"),
        (("sims",), {"weighting": "median"}, "'mean' or 'softmax'"),
        (("sims[:, :1]",), {"weighting": "softmax", "temperature": 1.0}, "shape of `indices`"),
    ],
)
def test_aggregate_argument_errors(retrieved, args, kwargs, message):
    values, indices, sims = retrieved
    args = [{"sims": sims, "sims[:, :1]": sims[:, :1]}[a] for a in args]
    with pytest.raises(ValueError, match=message):
        aggregate(values, indices, *args, **kwargs)


def test_aggregate_data_errors(retrieved):
    values, indices, _ = retrieved
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        aggregate(values, indices + 1)
    with pytest.raises(ValueError, match="2-D integer"):
        aggregate(values, indices.astype(float))
    with pytest.raises(ValueError, match="reshape a single gene"):
        aggregate(values[:, 0], indices)
    bad = values.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="`values` row 3 contains NaN"):
        aggregate(bad, indices)
    aggregate(bad, indices[1:2])  # row 3 is not retrieved: no error
