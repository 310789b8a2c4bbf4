"""Whole-slide images: reading by region and level, pixel size from metadata, SpatialData out."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile

import histo2expr as hx
from histo2expr.io._wsi_image import OpenSlideImage, TiffImage, open_slide_image
from histo2expr.patches import PatchSource


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """A synthetic H&E image (1 µm/px), 1050 x 1050 px."""
    adata = hx.datasets.synthetic(n_slides=1, spots_per_side=8, n_genes=10)
    return tifffile.imread(adata.uns["spatial"]["S1"]["metadata"]["source_image_path"])


def write_pyramid(path, pixels, *, mpp=None, ome=True, levels=3, tile=128, compression="zlib"):
    """A tiled pyramidal TIFF (OME with SubIFDs, or resolution tags) with each level half the previous."""
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    metadata = {"axes": "YXS"}
    if mpp is not None and ome:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    resolution = (
        {} if mpp is None or ome else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    with tifffile.TiffWriter(path, ome=ome) as writer:
        writer.write(pixels, subifds=levels - 1, metadata=metadata, **resolution, **options)
        for level in range(1, levels):
            writer.write(pixels[:: 2**level, :: 2**level], subfiletype=1, **options)
    return path


def test_tiff_pyramid_is_read_by_region_and_level(tmp_path, pixels):
    path = write_pyramid(tmp_path / "slide.ome.tif", pixels, mpp=0.5)
    image = open_slide_image(path)
    assert isinstance(image, TiffImage) and image.shape == pixels.shape[:2]
    assert image.level_shapes == [(1050, 1050), (525, 525), (263, 263)]
    np.testing.assert_array_equal(image.read_region(100, 200, 50, 70), pixels[100:150, 200:270])
    edge = image.read_region(1030, -5, 40, 20)  # outside the image: white
    np.testing.assert_array_equal(edge[:20, 5:], pixels[1030:, :15])
    assert (edge[20:] == 255).all() and (edge[:, :5] == 255).all()
    coarse = image.at_level(1)
    np.testing.assert_array_equal(coarse.read_region(10, 10, 20, 20), pixels[::2, ::2][10:30, 10:30])
    # pickles as its path (DataLoader workers), reads the same afterwards
    clone = pickle.loads(pickle.dumps(image))
    assert clone._level_pixels is None
    np.testing.assert_array_equal(clone.read_region(5, 5, 8, 8), pixels[5:13, 5:13])
    image.close()


def test_read_wsi_takes_the_pixel_size_from_the_file(tmp_path, pixels):
    ome = hx.io.read_wsi(write_pyramid(tmp_path / "a.ome.tif", pixels, mpp=0.5))
    entry = ome.uns["spatial"]["a"]
    assert ome.n_obs == 0 and list(ome.obs["slide"].cat.categories) == ["a"]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)
    assert entry["metadata"]["microns_per_pixel_source"] == "file"
    assert entry["metadata"]["source_image_level"] == 0
    tags = hx.io.read_wsi(write_pyramid(tmp_path / "b.tif", pixels, mpp=0.25, ome=False), level=1)
    assert tags.uns["spatial"]["b"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)  # level 1
    hires = tags.uns["spatial"]["b"]["images"]["hires"]
    assert (
        hires.shape == (525, 525, 3) and tags.uns["spatial"]["b"]["scalefactors"]["tissue_hires_scalef"] == 1
    )
    small = hx.io.read_wsi(tmp_path / "a.ome.tif", hires_max_px=300)
    assert max(small.uns["spatial"]["a"]["images"]["hires"].shape) == 300
    assert small.uns["spatial"]["a"]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(
        300 / 1050, rel=1e-3
    )
    with pytest.warns(UserWarning, match="overrides"):
        given = hx.io.read_wsi(tmp_path / "a.ome.tif", mpp=0.7)
    assert given.uns["spatial"]["a"]["metadata"]["microns_per_pixel_source"] == "argument"


def test_plain_images_and_their_dpi(tmp_path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(tmp_path / "he.png", dpi=(50800, 50800))  # 0.5 µm per pixel
    png = hx.io.read_wsi(tmp_path / "he.png")
    assert png.uns["spatial"]["he"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5, rel=1e-3)
    Image.fromarray(pixels).save(tmp_path / "he.jpg", dpi=(72, 72))  # a software default, not a scale
    with pytest.raises(ValueError, match="72 dpi"):
        hx.io.read_wsi(tmp_path / "he.jpg")
    jpg = hx.io.read_wsi(tmp_path / "he.jpg", mpp=1.0)
    assert isinstance(
        hx.io.slide_images(hx.pp.tile_slide(jpg, tissue_mask=None))["he"].image, hx.io._image.LazyImage
    )


def test_read_wsi_bad_input(tmp_path, pixels):
    with pytest.raises(FileNotFoundError):
        hx.io.read_wsi(tmp_path / "missing.svs")
    (tmp_path / "slide.czi").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"not a slide format.*OME-TIFF"):
        hx.io.read_wsi(tmp_path / "slide.czi")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 60)
    with pytest.raises(ValueError, match=r"Could not read broken\.tif.*corrupted"):
        hx.io.read_wsi(tmp_path / "broken.tif")
    plain = write_pyramid(tmp_path / "plain.tif", pixels, levels=2, ome=False)
    with pytest.raises(ValueError, match=r"pixel size of plain\.tif is unknown.*mpp="):
        hx.io.read_wsi(plain)
    with pytest.raises(ValueError, match=r"level=5.*2 level"):
        hx.io.read_wsi(plain, mpp=0.5, level=5)
    with pytest.raises(ValueError, match="not a positive number of micrometres"):
        hx.io.read_wsi(plain, mpp=-1)
    tifffile.imwrite(
        tmp_path / "deep.tif", np.zeros((64, 64, 3), np.uint16), tile=(32, 32), photometric="rgb"
    )
    with pytest.raises(ValueError, match="8-bit RGB"):
        hx.io.read_wsi(tmp_path / "deep.tif", mpp=0.5)


def test_openslide_is_optional_and_reads_vendor_formats(tmp_path, pixels, monkeypatch):
    import sys

    aperio = "Aperio Image Library v12.0.0\r\n1050x1050 (128x128) JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990"
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as writer:
        for level, description in ((1, aperio), (4, "Aperio Image Library v12.0.0\r\nlevel")):
            writer.write(
                pixels[::level, ::level],
                tile=(128, 128),
                photometric="rgb",
                compression="jpeg",
                description=description,
                metadata=None,
            )
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r'pip install "histo2expr\[wsi\]"'):
        hx.io.read_wsi(path)
    monkeypatch.undo()
    pytest.importorskip("openslide", reason="the histo2expr[wsi] extra (openslide) is not installed")
    slide = hx.io.read_wsi(path)
    assert slide.uns["spatial"]["slide"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.499)
    image = open_slide_image(path)
    assert isinstance(image, OpenSlideImage) and image.level_shapes == [(1050, 1050), (263, 263)]
    region = image.read_region(300, 300, 64, 64).astype(int)
    assert np.abs(region - pixels[300:364, 300:364]).mean() < 6  # JPEG
    assert (image.read_region(-10, -10, 5, 5) == 255).all()
    clone = pickle.loads(pickle.dumps(image))
    np.testing.assert_array_equal(clone.read_region(300, 300, 64, 64), region)


def test_tiled_slides_feed_the_patch_source(tmp_path, pixels):
    """A tiled slide gives the same patches as the same pixels stored in strips."""
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, pixels, photometric="rgb", resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    tiled = write_pyramid(tmp_path / "tiled.ome.tif", pixels, mpp=1.0)
    patches = []
    for path in (strips, tiled):
        tiles = hx.pp.tile_slide(path, spot_diameter_um=100)
        source = PatchSource(tiles, patch_size=32, mpp=2.0)
        patches.append(source.read(np.arange(len(source))))
    np.testing.assert_array_equal(*patches)
    assert isinstance(hx.io.slide_images(tiles)["tiled"].image, TiffImage)


def test_to_spatialdata_is_lazy_and_multiscale(tmp_path, pixels):
    import dask.array as da
    from spatialdata.transformations import get_transformation

    tiles = hx.pp.tile_slide(write_pyramid(tmp_path / "s.ome.tif", pixels, mpp=0.5), spot_diameter_um=110)
    sdata = hx.io.to_spatialdata(tiles)
    tree = sdata.images["s_image"]
    scales = [tree[f"scale{k}"]["image"] for k in range(3)]
    assert [s.shape for s in scales] == [(3, 1050, 1050), (3, 525, 525), (3, 263, 263)]
    assert isinstance(scales[0].data, da.Array)
    np.testing.assert_array_equal(
        np.moveaxis(scales[0].data[:, 40:60, 70:90].compute(), 0, 2), pixels[40:60, 70:90]
    )
    assert get_transformation(tree["scale1"]["image"], "s").to_affine_matrix(("x",), ("x",))[0, 0] == 2
    circles = sdata.shapes["s_spots"]
    assert len(circles) == tiles.n_obs
    np.testing.assert_allclose(circles["radius"], 110 / 0.5 / 2)
    np.testing.assert_allclose(
        np.column_stack([circles.geometry.x, circles.geometry.y]), tiles.obsm["spatial"]
    )
    table = sdata.tables["table"]
    assert (
        table.uns["spatialdata_attrs"]["region"] == "s_spots"
        and (table.obs["spot_id"] == np.arange(len(table))).all()
    )
    # the SpatialData is itself a valid histo2expr input: same patches
    np.testing.assert_array_equal(
        PatchSource(sdata, patch_size=16).read([0, 5]), PatchSource(tiles, patch_size=16).read([0, 5])
    )
    only_image = hx.io.to_spatialdata(hx.io.read_wsi(tmp_path / "s.ome.tif"))
    assert list(only_image.images) == ["s_image"] and not only_image.tables
