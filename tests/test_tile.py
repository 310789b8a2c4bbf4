"""Pseudo-spots on H&E-only slides, and virtual spatial transcriptomics end to end."""

from __future__ import annotations

import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import scipy.sparse as sp
import tifffile

import histo2expr as hx
from histo2expr.datasets._synthetic import SPOT_DIAMETER_UM
from histo2expr.pp._tile import otsu_tissue_mask

PATCH = {"encoder": "colour_texture", "patch_size": 32, "progress": False}


def write_slide(path, pixels, *, mpp, levels=3):
    """``pixels`` as a tiled pyramidal OME-TIFF of pixel size ``mpp``."""
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(pixels, subifds=levels - 1, metadata=metadata, **options)
        for level in range(1, levels):
            writer.write(pixels[:: 2**level, :: 2**level], subfiletype=1, **options)
    return path


@pytest.fixture(scope="module")
def cohort():
    adata = hx.datasets.synthetic(n_slides=4, seed=0, spots_per_side=8, n_genes=30)
    hx.pp.normalize(adata)
    return adata


@pytest.fixture(scope="module")
def new_slide(cohort):
    """An unseen slide of the cohort (S4), with its counts: the truth."""
    adata = cohort[cohort.obs["slide"] == "S4"].copy()
    adata.obs["slide"] = adata.obs["slide"].cat.remove_unused_categories()
    adata.uns["spatial"] = {"S4": cohort.uns["spatial"]["S4"]}
    return adata


@pytest.fixture(scope="module")
def model(cohort):
    training = cohort[cohort.obs["slide"] != "S4"].copy()
    hx.tl.embed_patches(training, **PATCH)
    return hx.tl.fit_histo2expr(training, method="ridge", genes=12, cv="leave_one_slide_out", progress=False)


def test_pseudo_spots_cover_the_tissue_on_a_lattice(new_slide):
    tiles = hx.pp.tile_slide(new_slide, spot_diameter_um=55, spacing_um=80)
    entry = tiles.uns["spatial"]["S4"]
    assert tiles.n_vars == 0 and sp.issparse(tiles.X) and tiles.X.dtype == np.float32
    assert list(tiles.obs["slide"].cat.categories) == ["S4"] and tiles.obs_names.is_unique
    assert tiles.obs_names[0] == f"S4_{tiles.obs['array_row'].iloc[0]}x{tiles.obs['array_col'].iloc[0]}"
    assert (
        entry["scalefactors"]["spot_diameter_fullres"] == 55
        and entry["scalefactors"]["spot_spacing_fullres"] == 80
    )
    assert new_slide.uns["spatial"]["S4"]["scalefactors"]["spot_spacing_fullres"] == 100  # input unchanged
    # hexagonal lattice: 6 neighbours at the pitch
    coords = tiles.obsm["spatial"]
    distance = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(distance, np.inf)
    np.testing.assert_allclose(distance.min(axis=1), 80, rtol=1e-6)
    assert np.bincount(np.isclose(distance, 80).sum(axis=1)).argmax() == 6
    # every kept spot is on tissue; the tissue mask agrees with where the counts are
    hires = entry["images"]["hires"]
    mask, threshold = otsu_tissue_mask(hires)
    assert 0.05 <= threshold < 0.5 and tiles.uns["tile_slide"]["params"]["saturation_threshold"] == threshold
    assert (tiles.obs["tissue_fraction"] >= 0.5).all()
    scale = entry["scalefactors"]["tissue_hires_scalef"]
    x, y = np.floor(new_slide.obsm["spatial"] * scale).astype(int).T
    assert mask[y, x].mean() > 0.95  # the real spots lie on the detected tissue
    assert 0.3 < mask.mean() < 0.9
    grid = hx.pp.tile_slide(new_slide, spot_diameter_um=100, layout="grid")
    steps = np.diff(np.unique(grid.obsm["spatial"][:, 0]))
    np.testing.assert_allclose(steps, 100)
    everything = hx.pp.tile_slide(new_slide, spot_diameter_um=100, layout="grid", tissue_mask=None)
    assert everything.n_obs > grid.n_obs and everything.uns["tile_slide"]["params"]["tissue_mask"] == "none"
    left_half = np.zeros((10, 10), dtype=bool)
    left_half[:, :5] = True
    half = hx.pp.tile_slide(new_slide, spot_diameter_um=100, layout="grid", tissue_mask=left_half)
    width = new_slide.uns["spatial"]["S4"]["images"]["hires"].shape[1] / scale
    assert (half.obsm["spatial"][:, 0] < width / 2).all() and half.n_obs == pytest.approx(
        everything.n_obs / 2, rel=0.15
    )


def test_tile_slide_bad_input(new_slide, tmp_path):
    blank = write_slide(tmp_path / "blank.ome.tif", np.full((600, 800, 3), 240, np.uint8), mpp=1.0)
    with pytest.raises(ValueError, match=r"No tissue found.*threshold 0\.050.*tissue_mask=None"):
        hx.pp.tile_slide(blank)
    assert hx.pp.tile_slide(blank, tissue_mask=None).n_obs > 0
    with pytest.raises(ValueError, match=r"`layout` must be one of \['hex', 'grid'\]"):
        hx.pp.tile_slide(new_slide, layout="square")
    with pytest.raises(ValueError, match="aspect ratio"):
        hx.pp.tile_slide(new_slide, tissue_mask=np.ones((10, 30), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        hx.pp.tile_slide(new_slide, tissue_mask=np.ones((10, 10)))
    with pytest.raises(ValueError, match="read_wsi"):
        hx.pp.tile_slide(new_slide, mpp=0.5)
    with pytest.raises(ValueError, match="positive number"):
        hx.pp.tile_slide(new_slide, spot_diameter_um=0)
    with pytest.raises(ValueError, match="smaller than one"):
        hx.pp.tile_slide(new_slide, spot_diameter_um=5000)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        hx.pp.tile_slide(new_slide, min_tissue_fraction=0)
    with pytest.raises(TypeError, match=r"geometry=model.patches"):
        hx.pp.tile_slide(new_slide, geometry=object())
    two = new_slide.copy()
    two.uns["spatial"] = {**two.uns["spatial"], "S2": two.uns["spatial"]["S4"]}
    with pytest.raises(ValueError, match="slide="):
        hx.pp.tile_slide(two)
    assert hx.pp.tile_slide(two, slide="S2").obs["slide"].iloc[0] == "S2"


def test_virtual_spatial_transcriptomics_end_to_end(model, new_slide, tmp_path):
    import scanpy as sc
    import squidpy as sq

    pixels = tifffile.imread(new_slide.uns["spatial"]["S4"]["metadata"]["source_image_path"])
    slide = hx.io.read_wsi(write_slide(tmp_path / "he.ome.tif", pixels, mpp=1.0))
    tiles = hx.pp.tile_slide(slide, spot_diameter_um=55, spacing_um=55, geometry=model.patches)
    hx.tl.embed_patches(tiles, mpp=model.patches["mpp"], **PATCH)
    hx.tl.predict_expression(tiles, model)
    virtual = hx.get.predicted_adata(tiles)
    assert list(virtual.var_names) == model.genes and virtual.n_obs == tiles.n_obs
    np.testing.assert_array_equal(virtual.X, tiles.obsm["histo2expr_pred"].to_numpy())
    assert np.isfinite(virtual.X).all() and "X_histo2expr_pred" in virtual.obsm and "spatial" in virtual.uns
    np.testing.assert_allclose(virtual.var["cv_pcc"], [model.cv_gene_pcc[g] for g in model.genes])
    marker = virtual.uns["predicted_expression"]
    assert marker["predicted"] and marker["method"] == "ridge" and marker["source_key"] == "histo2expr_pred"
    assert (
        marker["cv_protocol"] == "leave_one_slide_out"
        and "training slides' sequencing depth" in marker["scale"]
    )
    assert "histo2expr_pred_similarity" not in virtual.obs  # ridge retrieves nothing
    # the virtual map agrees with the measured counts: nearest pseudo-spot of every real spot
    nearest = np.argmin(
        np.linalg.norm(new_slide.obsm["spatial"][:, None] - virtual.obsm["spatial"][None], axis=2), axis=1
    )
    truth = new_slide[:, model.genes].X.toarray()
    pcc = [np.corrcoef(truth[:, g], virtual.X[nearest, g])[0, 1] for g in range(len(model.genes))]
    assert np.nanmean(pcc) > 0.2
    sq.gr.spatial_neighbors(virtual, coord_type="grid", n_neighs=6)
    degree = np.asarray(virtual.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    assert np.median(degree) == 6
    sdata = hx.io.to_spatialdata(virtual)
    assert sdata.tables["table"].n_vars == len(model.genes) and len(sdata.shapes["he_spots"]) == virtual.n_obs
    sc.pp.neighbors(virtual, n_neighbors=6, use_rep="X", method="gauss", transformer="sklearn")
    # leiden installs with histo2expr: scanpy's igraph flavour, and its default (leidenalg)
    sc.tl.leiden(virtual, resolution=0.5, flavor="igraph", n_iterations=2, random_state=0)
    assert virtual.obs["leiden"].nunique() >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy announces igraph as its future default
        sc.tl.leiden(virtual, resolution=0.5, key_added="leidenalg")
    assert virtual.obs["leidenalg"].nunique() >= 2


def test_retrieval_confidence_and_a_model_of_another_scale(cohort, new_slide, tmp_path, one_torch_thread):
    training = cohort[cohort.obs["slide"].isin(["S1", "S2"])].copy()
    hx.tl.embed_patches(training, **PATCH)
    bleep = hx.tl.fit_histo2expr(
        training, method="bleep", genes=8, epochs=2, top_k=5, projection_dim=16, progress=False
    )
    # the slide scanned at twice the resolution (0.5 µm/px): the model's patches are at 1 µm/px
    pixels = tifffile.imread(new_slide.uns["spatial"]["S4"]["metadata"]["source_image_path"])
    fine = np.repeat(np.repeat(pixels[:400, :400], 2, axis=0), 2, axis=1)
    path = write_slide(tmp_path / "fine.ome.tif", fine, mpp=0.5)
    with pytest.warns(UserWarning, match=r"mpp=1.*resamples"):
        tiles = hx.pp.tile_slide(path, spot_diameter_um=100, tissue_mask=None, geometry=bleep.patches)
    native = tiles.copy()
    hx.tl.embed_patches(native, **PATCH)
    with pytest.raises(ValueError, match=r"Re-embed with .*mpp=1"):
        hx.tl.predict_expression(native, bleep)
    hx.tl.embed_patches(tiles, mpp=1.0, **PATCH)
    hx.tl.predict_expression(tiles, bleep)
    virtual = hx.get.predicted_adata(tiles)
    similarity = virtual.obs["histo2expr_pred_similarity"].to_numpy()
    assert similarity.shape == (tiles.n_obs,) and np.all((similarity > -1) & (similarity <= 1 + 1e-6))
    np.testing.assert_allclose(
        similarity, bleep.method.confidence(None, embedding=virtual.obsm["X_histo2expr_pred"])
    )
    assert virtual.var["cv_pcc"].isna().all()  # fitted without cv
    # the model records its training spots' size and spacing, and tile_slide lays spots out with them
    assert bleep.patches["spot_diameter_um"] == pytest.approx(SPOT_DIAMETER_UM)
    assert bleep.patches["spot_spacing_um"] > bleep.patches["spot_diameter_um"]
    sized = hx.pp.tile_slide(path, tissue_mask=None, geometry=bleep.patches, spot_diameter_um=None)
    assert sized.uns["tile_slide"]["params"]["spot_diameter_um"] == pytest.approx(SPOT_DIAMETER_UM)
    assert sized.uns["tile_slide"]["params"]["spacing_um"] == pytest.approx(bleep.patches["spot_spacing_um"])


def _virtual_slide(path, size=50_000, tile=512, tissue=(24_576, 26_624)):
    """A ``size`` x ``size`` px pyramidal OME-TIFF (0.5 µm/px), levels 0 and 1 written tile by tile.

    The slide is glass (242 grey) except a square of H&E-coloured tissue spanning ``tissue`` px on
    both axes (aligned to the tiles of levels 0 and 1, which repeat two pre-compressed tiles); each
    level is a quarter of the previous, levels 2 and 3 are small arrays. 7.5 GB of pixels, a few MB
    on disk.
    """
    colour = (190, 110, 180)
    glass = zlib.compress(np.full((tile, tile, 3), 242, np.uint8).tobytes())
    stained = np.empty((tile, tile, 3), np.uint8)
    stained[..., :] = colour
    stained = zlib.compress(stained.tobytes())

    def tiles(n: int, step: int):
        low, high = tissue[0] / step, tissue[1] / step
        for row in range(-(-n // tile)):
            for col in range(-(-n // tile)):
                y, x = (row + 0.5) * tile, (col + 0.5) * tile
                yield stained if low <= y < high and low <= x < high else glass

    options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    metadata = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        writer.write(
            tiles(size, 1), shape=(size, size, 3), dtype=np.uint8, subifds=3, metadata=metadata, **options
        )
        writer.write(
            tiles(-(-size // 4), 4),
            shape=(-(-size // 4),) * 2 + (3,),
            dtype=np.uint8,
            subfiletype=1,
            **options,
        )
        for step in (16, 64):
            n = -(-size // step)
            pixels = np.full((n, n, 3), 242, np.uint8)
            pixels[tissue[0] // step : tissue[1] // step, tissue[0] // step : tissue[1] // step] = colour
            writer.write(pixels, subfiletype=1, **options)
    return path


def test_a_large_slide_is_tiled_and_embedded_in_bounded_memory(tmp_path, one_torch_thread):
    path = _virtual_slide(tmp_path / "large.ome.tif")
    tracemalloc.start()
    try:
        slide = hx.io.read_wsi(path)
        tiles = hx.pp.tile_slide(slide, spot_diameter_um=200)
        hx.tl.embed_patches(tiles, mpp=4.0, batch_size=32, **PATCH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert slide.uns["spatial"]["large"]["images"]["hires"].shape == (2000, 2000, 3)
    # the tissue square is 2,048 px = 1 mm wide: about (1024 / 200)^2 spots of 200 µm, all on it
    assert 15 <= tiles.n_obs <= 50
    assert ((tiles.obsm["spatial"] > 24_576 - 200) & (tiles.obsm["spatial"] < 26_624 + 200)).all()
    assert np.isfinite(tiles.obsm["X_histo"]).all()
    centre = int(np.argmin(np.linalg.norm(tiles.obsm["spatial"] - 25_600, axis=1)))
    patch = hx.patches.PatchSource(tiles, patch_size=32, mpp=4.0)[centre]
    assert (patch == (190, 110, 180)).all()  # the tissue, read from the right place of level 0
    print(f"peak traced memory: {peak / 2**20:.0f} MiB")
    assert peak < 200 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB for a 7.5 GB slide"
