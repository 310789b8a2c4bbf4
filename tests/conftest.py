"""Shared fixtures: an isolated cache, the real her2st cohort when present."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
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


@pytest.fixture(autouse=True, scope="session")
def _one_compute_thread() -> None:
    """Tiny test models run fastest on one thread; tests of the thread policy set their own."""
    import histo2expr as hx

    hx.settings.n_threads = 1


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
def histo2expr_log(caplog: pytest.LogCaptureFixture):
    """``caplog`` with the messages of the package logger, which does not pass them on to the root logger."""
    import logging

    logger = logging.getLogger("histo2expr")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


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


class TokenCNN(nn.Module):
    """A timm-like backbone: a 4 x 4 feature map of 6 features for 32 px patches, pooled by its mean.

    Seeded: every instance has the same weights.
    """

    num_features = 6

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 8, stride=8)
        with torch.no_grad():
            for parameter in self.conv.parameters():
                parameter.copy_(torch.rand(parameter.shape, generator=generator) - 0.5)

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def forward_head(self, features):
        return features.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.fixture(scope="session")
def token_cnn() -> type[TokenCNN]:
    """The TokenCNN class (tests build fresh instances)."""
    return TokenCNN


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


# --- HEST-1k samples in the layout of the HEST-Library (st/, wsis/, metadata/, patches/, tissue_seg/) ----


def _write_hest_sample(
    folder: Path,
    sample: str,
    *,
    patient: str | None = "P1",
    dataset_title: str = "Study A",
    genes: tuple[str, ...] = ("GENE1", "GENE2", "GENE3", "GENE4"),
    mpp: float = 2.0,
    grid: tuple[int, int] = (4, 3),
    size: tuple[int, int] = (320, 260),
    seed: int = 0,
    patches: bool = True,
    contours: bool = True,
) -> dict:
    """One HEST sample: a tiled pyramidal LZW TIFF as HEST's ``tiff_save`` writes it (resolution in cm),
    the h5ad of ``HESTData.save`` (obsm['spatial'] in full-resolution px, uns['spatial']['ST'] with the
    downscaled image), the metadata json with HEST-1k's fields, a patch file and tissue contours.

    Spots sit on a Visium-like grid: 100 µm apart, 55 µm wide, ``mpp`` µm per pixel.
    """
    import json

    import anndata as ad
    import h5py
    import pandas as pd
    import tifffile
    from scipy import sparse

    rng = np.random.default_rng(seed)
    width, height = size
    for sub in ("st", "wsis", "metadata", "patches", "tissue_seg"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "lzw"}
    with tifffile.TiffWriter(folder / "wsis" / f"{sample}.tif") as tif:
        tif.write(pixels, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **options)
        tif.write(pixels[::2, ::2], subfiletype=1, **options)
    pitch = 100.0 / mpp
    cols, rows = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]))
    x = 40 + pitch * cols.ravel()
    y = 40 + pitch * rows.ravel()
    barcodes = [f"{sample}-BC{i:03d}-1" for i in range(len(x))]
    counts = rng.poisson(5.0, (len(x), len(genes)))
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            "pxl_col_in_fullres": x,
            "pxl_row_in_fullres": y,
            "array_col": cols.ravel() * 2,
            "array_row": rows.ravel(),
            "total_counts": counts.sum(1),
        },
        index=barcodes,
    )
    st = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=list(genes))
    )
    st.obsm["spatial"] = np.column_stack([x, y])
    scalef = 0.25
    st.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": pixels[::4, ::4].copy()},
            "scalefactors": {"tissue_downscaled_fullres_scalef": scalef, "spot_diameter_fullres": 55.0 / mpp},
        }
    }
    st.write_h5ad(folder / "st" / f"{sample}.h5ad")
    meta = {
        "dataset_title": dataset_title,
        "id": sample,
        "image_filename": f"{sample}.tif",
        "organ": "Breast",
        "disease_state": "Cancer",
        "oncotree_code": "IDC",
        "species": "Homo sapiens",
        "patient": patient,
        "st_technology": "Visium",
        "inter_spot_dist": 100.0,
        "spot_diameter": 55.0,
        "spots_under_tissue": len(x),
        "preservation_method": "FFPE",
        "nb_genes": len(genes),
        "pixel_size_um_embedded": mpp,
        "pixel_size_um_estimated": mpp,
        "magnification": "5x",
        "fullres_px_width": width,
        "fullres_px_height": height,
        "tissue": "Breast",
        "license": "CC BY 4.0",
        "hest_version_added": "v1_0_0",
    }
    (folder / "metadata" / f"{sample}.json").write_text(json.dumps(meta))
    if patches:
        with h5py.File(folder / "patches" / f"{sample}.h5", "w") as handle:
            handle["img"] = rng.integers(0, 256, (len(x), 8, 8, 3), dtype=np.uint8)
            handle["barcode"] = np.array([[b.encode()] for b in barcodes])
            handle["coords"] = np.column_stack([x - 4, y - 4]).astype(np.int64)
            handle["coords"].attrs["patch_size_target"] = 224
            handle["coords"].attrs["pixel_size"] = mpp
    if contours:
        import geopandas as gpd
        from shapely.geometry import box

        tissue = gpd.GeoDataFrame({"tissue_id": [0]}, geometry=[box(0, 0, width / 2, height)])
        (folder / "tissue_seg" / f"{sample}_contours.geojson").write_text(tissue.to_json())
    return {"x": x, "y": y, "counts": counts, "barcodes": barcodes, "meta": meta, "pixels": pixels}


@pytest.fixture
def write_hest_sample():
    """Writer of one HEST sample (see ``_write_hest_sample``) into a folder."""
    return _write_hest_sample


@pytest.fixture
def hest_folder(tmp_path: Path) -> Path:
    """Three HEST samples: two of patient P1 of study A (one without tissue outlines), one of a study without patients."""
    folder = tmp_path / "hest_data"
    _write_hest_sample(folder, "TENX1", seed=1)
    _write_hest_sample(folder, "TENX2", seed=2, contours=False, genes=("GENE1", "GENE2", "GENE3", "GENE5"))
    _write_hest_sample(folder, "MEND3", seed=3, patient=None, dataset_title="Study B", patches=False)
    return folder


# --- 10x Genomics files ---------------------------------------------------------------------


def _write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str], library_id: str
) -> None:
    """A feature-barcode matrix in the 10x HDF5 format of Space Ranger (features x barcodes, CSC by barcode)."""
    import h5py
    from scipy import sparse

    matrix = sparse.csc_matrix(np.asarray(counts).T.astype(np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.attrs["library_ids"] = np.array([library_id.encode()])
        handle.attrs["software_version"] = "spaceranger-3.0.0"
        group = handle.create_group("matrix")
        group["barcodes"] = np.array([b.encode() for b in barcodes])
        group["data"], group["indices"], group["indptr"] = matrix.data, matrix.indices, matrix.indptr
        group["shape"] = np.array(matrix.shape, dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        features["name"] = np.array([g.encode() for g in genes])
        features["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        features["genome"] = np.array([b"GRCh38"] * len(genes))
        features["_all_tag_keys"] = np.array([b"genome"])


@pytest.fixture
def write_10x_h5():
    """Writer of a 10x HDF5 feature-barcode matrix (``_write_10x_h5``)."""
    return _write_10x_h5
