"""Property-based tests (hypothesis): for any input, a clear error that leaves the AnnData as it was,
or the correct result. Few examples each, derandomised, so that the suite stays fast and repeatable."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import histo2expr as hx
from histo2expr.io._image import read_image_size
from histo2expr.models.graphs import spatial_knn

#: Clear errors: what histo2expr raises for bad input.
CLEAR = (ValueError, TypeError, KeyError, FileNotFoundError)
#: Few examples, no deadline (the CPU is shared), the same examples on every run.
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- pp.normalize: any count matrix -----------------------------------------------------------------

counts_matrices = st.integers(1, 6).flatmap(
    lambda n: arrays(
        np.float64,
        st.tuples(st.integers(0, 8), st.just(n)),
        elements=st.one_of(
            st.integers(0, 50).map(float),
            st.sampled_from([np.nan, np.inf, -1.0, 0.5, 1e9]),
        ),
    )
)


@FAST
@given(counts=counts_matrices, sparse=st.booleans(), target_sum=st.sampled_from([1e4, 1e6, 1, np.nan, -5]))
def test_normalize_gives_log1p_of_the_scaled_counts_or_a_clear_error(
    counts, sparse, target_sum, unchanged_on_failure
):
    adata = AnnData(X=sp.csr_matrix(counts) if sparse else counts.copy())
    done = unchanged_on_failure(adata, lambda a: hx.pp.normalize(a, target_sum=target_sum, copy=True), CLEAR)
    valid = (
        counts.size > 0
        and np.isfinite(counts).all()
        and (counts >= 0).all()
        and (counts == np.round(counts)).all()
        and (counts.sum(axis=1) > 0).all()
        and np.isfinite(target_sum)
        and target_sum > 0
    )
    assert (done is not None) == valid
    if done is not None:
        x = done.X.toarray() if sp.issparse(done.X) else done.X
        np.testing.assert_allclose(np.expm1(x.astype(np.float64)).sum(axis=1), target_sum, rtol=1e-4)
        hx._validation.check_log_normalised(done)  # what normalize makes passes the check


# --- fit / predict: features, genes and slide ids -------------------------------------------------------


@pytest.fixture(scope="module")
def small_cohort():
    adata = hx.datasets.synthetic(n_slides=3, seed=1, spots_per_side=6, n_genes=12)
    hx.pp.normalize(adata)
    rng = np.random.default_rng(0)
    programmes = np.asarray(adata.X.todense())[:, :4]
    adata.obsm["X_histo"] = (
        programmes @ rng.standard_normal((4, 6)) + 0.1 * rng.standard_normal((adata.n_obs, 6))
    ).astype(np.float32)
    adata.uns["X_histo"] = {"encoder": {"name": "random"}, "patches": {"patch_size": 32}}
    return adata


def _fit(adata, **kwargs):
    return hx.tl.fit_histo2expr(adata, method="ridge", **{"genes": 5, "progress": False, **kwargs})


features_edits = st.sampled_from(["none", "nan", "inf", "float16", "float64", "int", "3d", "rows", "scale"])


@FAST
@given(edit=features_edits, scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6]))
def test_fit_on_any_features_is_correct_or_a_clear_error(small_cohort, edit, scale, unchanged_on_failure):
    adata = small_cohort.copy()
    features = adata.obsm["X_histo"].astype(np.float64)
    if edit == "nan":
        features[3, 2] = np.nan
    elif edit == "inf":
        features[0, 0] = np.inf
    elif edit in ("float16", "float64"):
        features = features.astype(edit)
    elif edit == "int":
        features = np.round(features * 100).astype(np.int64)
    elif edit == "3d":
        features = features[:, :, None]
    elif edit == "scale":
        features = features * scale
    adata.obsm["X_histo"] = features
    model = unchanged_on_failure(adata, _fit, CLEAR)
    assert (model is None) == (edit in ("nan", "inf", "3d"))
    if model is not None:
        prediction = hx.tl.predict_expression(adata, model, copy=True).obsm["histo2expr_pred"].to_numpy()
        assert np.isfinite(prediction).all()
        if edit == "scale":  # features are standardised: their unit does not matter
            reference = _fit(small_cohort.copy())
            expected = (
                hx.tl.predict_expression(small_cohort, reference, copy=True)
                .obsm["histo2expr_pred"]
                .to_numpy()
            )
            np.testing.assert_allclose(prediction, expected, rtol=1e-3, atol=1e-3)


@FAST
@given(names=st.lists(st.text(max_size=6), min_size=3, max_size=3, unique=True))
def test_any_slide_ids_fit_or_are_refused_clearly(small_cohort, names, unchanged_on_failure):
    adata = small_cohort.copy()
    adata.obs["slide"] = adata.obs["slide"].cat.rename_categories(
        dict(zip(["S1", "S2", "S3"], names, strict=True))
    )
    done = unchanged_on_failure(
        adata, lambda a: _fit(a, cv="leave_one_slide_out", refit=False) or True, CLEAR
    )
    storable = all(n not in ("", ".", "..") and "/" not in n for n in names)
    assert bool(done) == storable
    if storable:
        assert list(adata.uns["histo2expr"]["folds"]["slide"]) == names


@FAST
@given(
    genes=st.lists(st.integers(0, 11), min_size=0, max_size=6),
    kind=st.sampled_from([list, tuple, np.asarray, pd.Index, pd.Series]),
)
def test_any_gene_list_fits_or_is_refused_clearly(small_cohort, genes, kind, unchanged_on_failure):
    adata = small_cohort.copy()
    names = kind([adata.var_names[i] for i in genes]) if genes else kind([])
    model = unchanged_on_failure(adata, lambda a: _fit(a, genes=names), CLEAR)
    valid = len(genes) > 0 and len(set(genes)) == len(genes)
    assert (model is not None) == valid
    if model is not None:
        assert model.genes == [adata.var_names[i] for i in genes]


@FAST
@given(
    transform=st.sampled_from(["scale", "negate", "swap", "shift", "log2", "counts"]),
    factor=st.floats(0.1, 10),
)
def test_any_expression_matrix_fits_only_when_it_is_log_normalised(
    small_cohort, transform, factor, unchanged_on_failure
):
    adata = small_cohort.copy()
    x = adata.X.toarray()
    if transform == "scale":
        adata.X = x * factor
    elif transform == "negate":
        adata.X = -x
    elif transform == "shift":
        adata.X = x + factor
    elif transform == "log2":  # a legitimate log-normalisation, with its base recorded
        adata.X = x / np.log(2)
        adata.uns["log1p"] = {"base": 2}
    elif transform == "counts":
        adata.X = adata.layers["counts"].copy()
    else:
        adata.X = np.log1p(x)
    model = unchanged_on_failure(adata, _fit, CLEAR)
    legitimate = transform == "log2" or (transform == "scale" and abs(factor - 1) < 1e-3)
    assert (model is not None) == legitimate


# --- spatial neighbours: any orientation, scale and offset of the coordinates ------------------------------


@FAST
@given(
    seed=st.integers(0, 2**16),
    angle=st.sampled_from([0, 1, 2, 3]),
    mirror=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    offset=st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)),
)
def test_spatial_neighbours_do_not_depend_on_orientation_scale_or_offset(seed, angle, mirror, scale, offset):
    points = np.random.default_rng(seed).uniform(0, 1000, (24, 2))
    groups = np.repeat(["a", "b"], 12)
    distances = np.sort(np.linalg.norm(points[:, None] - points[None], axis=2), axis=1)
    assume(np.diff(distances[:, :6], axis=1).min() > 1e-6 * distances.max())  # no ties among the nearest
    rotated = points @ np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), angle).T
    if mirror:
        rotated[:, 0] = -rotated[:, 0]
    moved = rotated * scale + np.asarray(offset)
    np.testing.assert_array_equal(spatial_knn(points, groups, k=4), spatial_knn(moved, groups, k=4))


# --- readers: any orientation and scale of the spot coordinates, any damage to the image -----------------


def _legacy_section(folder: Path, *, pitch: float, mirror_x: bool, swap: bool, offset: float) -> pd.DataFrame:
    x, y = np.meshgrid(np.arange(1, 6), np.arange(1, 5))
    spots = pd.DataFrame({"x": x.ravel(), "y": y.ravel()})
    width = 8 * pitch + 2 * offset
    px = (width - offset - pitch * spots["x"]) if mirror_x else (offset + pitch * spots["x"])
    py = offset + pitch * spots["y"]
    spots["pixel_x"], spots["pixel_y"] = (py, px) if swap else (px, py)
    spots["selected"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    spots.to_csv(folder / "alignment_table_S1.tsv", sep="\t", index=False)
    ids = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    counts = pd.DataFrame(
        np.random.default_rng(0).poisson(3, (len(spots), 3)), index=ids, columns=["a", "b", "c"]
    )
    with gzip.open(folder / "S1.tsv.gz", "wt") as handle:
        handle.write(counts.to_csv(sep="\t"))
    side = int(np.ceil(width))
    Image.fromarray(np.full((side, side, 3), 200, dtype=np.uint8)).save(folder / "S1.png")
    return spots


@settings(FAST, max_examples=15)
@given(
    pitch=st.floats(12, 60),
    mirror_x=st.booleans(),
    swap=st.booleans(),
    offset=st.floats(0, 40),
)
def test_legacy_reader_reads_any_orientation_and_scale_or_refuses_swapped_axes(
    tmp_path_factory, pitch, mirror_x, swap, offset
):
    folder = tmp_path_factory.mktemp("legacy")
    spots = _legacy_section(folder, pitch=pitch, mirror_x=mirror_x, swap=swap, offset=offset)
    if swap:
        with pytest.raises(ValueError, match="look swapped"):
            hx.io.read_legacy_st(folder)
        return
    adata = hx.io.read_legacy_st(folder)
    assert adata.uns["spatial"]["S1"]["scalefactors"]["microns_per_pixel"] == pytest.approx(200 / pitch)
    np.testing.assert_allclose(adata.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy())


def _image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@settings(FAST, max_examples=30)
@given(
    fmt=st.sampled_from([("JPEG", ".jpg"), ("PNG", ".png"), ("TIFF", ".tif")]),
    named=st.sampled_from([".jpg", ".png", ".tif"]),
    keep=st.floats(0, 1),
    garbage=st.binary(max_size=16),
)
def test_image_size_of_any_file_is_right_or_a_clear_error(tmp_path_factory, fmt, named, keep, garbage):
    data = _image_bytes(fmt[0])
    damaged = keep < 1 or garbage
    data = garbage + data[: int(len(data) * keep)] if damaged else data
    path = tmp_path_factory.mktemp("image") / f"slide{named}"
    path.write_bytes(data)
    try:
        size = read_image_size(path)
    except ValueError as error:
        assert str(path) in str(error) and ("again" in str(error) or "Rename" in str(error))
        return
    assert size == (40, 30)
    assert not garbage and named == fmt[1]
