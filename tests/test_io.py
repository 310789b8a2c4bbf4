"""Readers of hx.io: legacy ST (her2st, STUtility), Visium, SpatialData slide images."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from PIL import Image
from scipy import sparse

import histo2expr as hx
from histo2expr.io._image import PAD_VALUE

PITCH = 20.0  # px per array unit of the synthetic sections: 200 µm / 20 px = 10 µm per px
IMAGE_SIZE = (240, 200)  # width, height


# --- tiny legacy ST layouts -----------------------------------------------------------------


def _grid(n_x: int = 4, n_y: int = 3) -> pd.DataFrame:
    x, y = np.meshgrid(np.arange(2, 2 + n_x), np.arange(2, 2 + n_y))
    spots = pd.DataFrame({"x": x.ravel(), "y": y.ravel()})
    spots["new_x"] = spots["x"] + 0.01
    spots["new_y"] = spots["y"] - 0.01
    spots["pixel_x"] = PITCH * spots["new_x"] + 3.0
    spots["pixel_y"] = PITCH * spots["new_y"] + 5.0
    spots["selected"] = 1
    return spots


def _counts(spots: pd.DataFrame, genes: list[str], rng: np.random.Generator) -> pd.DataFrame:
    ids = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    return pd.DataFrame(rng.poisson(3.0, (len(spots), len(genes))), index=ids, columns=genes)


def _write_tsv(frame: pd.DataFrame, path: Path, *, index: bool) -> None:
    text = frame.to_csv(sep="\t", index=index)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)


def _write_image(path: Path, *, mode: str = "RGB", size: tuple[int, int] = IMAGE_SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def _her2st_section(root: Path, slide: str, patient: str, counts: pd.DataFrame, spots: pd.DataFrame) -> None:
    data = root / "data"
    for sub in ("ST-cnts", "ST-spotfiles"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    _write_tsv(counts, data / "ST-cnts" / f"{slide}.tsv.gz", index=True)
    _write_tsv(spots, data / "ST-spotfiles" / f"{slide}_selection.tsv", index=False)
    _write_image(data / "ST-imgs" / patient / slide / f"HE_{slide}.jpg")


@pytest.fixture
def her2st_tiny(tmp_path: Path, rng: np.random.Generator) -> dict:
    """Two sections of two patients; genes overlap partly; A1 has one selected spot without counts
    and one counted spot that is not selected."""
    root = tmp_path / "her2st"
    spots_a1 = _grid()
    counts_a1 = _counts(spots_a1, ["g1", "g2", "g3"], rng)
    counts_a1 = counts_a1.drop(index="2x2")
    spots_a1.loc[spots_a1.index[-1], "selected"] = 0
    spots_a2 = _grid(3, 3)
    counts_a2 = _counts(spots_a2, ["g2", "g3", "g4"], rng)
    _her2st_section(root, "A1", "P1", counts_a1, spots_a1)
    _her2st_section(root, "A2", "P2", counts_a2, spots_a2)
    return {"root": root, "A1": counts_a1, "A2": counts_a2, "spots": spots_a1}


def _stutility(
    folder: Path, slide: str, rng: np.random.Generator, *, image: str = ".jpg", **kwargs
) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    spots = kwargs.get("spots", _grid())
    counts = kwargs.get("counts", _counts(spots, ["g1", "g2"], rng))
    _write_tsv(counts, folder / f"{slide}{kwargs.get('counts_suffix', '.tsv')}", index=True)
    _write_tsv(spots, folder / f"alignment_table_{slide}.tsv", index=False)
    _write_image(folder / f"{slide}{image}", mode=kwargs.get("mode", "RGB"))
    return counts


def test_her2st_layout_reads_data_model(
    her2st_tiny: dict,
    histo2expr_log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("HISTO2EXPR_CACHE_DIR", str(tmp_path / "cache"))
    adata = hx.io.read_legacy_st(her2st_tiny["root"], hires_max_px=100)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # the reader decodes no full-resolution image
    assert (
        "A1: 10 spots kept; dropped 1 selected spots without counts and 1 counted spots"
        in histo2expr_log.text
    )
    assert adata.n_obs == 10 + 9
    assert list(adata.obs["slide"].cat.categories) == ["A1", "A2"]
    assert adata.obs.loc["A1_3x2", "patient"] == "P1" and adata.obs.loc["A2_2x2", "patient"] == "P2"
    assert isinstance(adata.obs["patient"].dtype, pd.CategoricalDtype)
    assert adata.obs.loc["A1_3x4", ["array_row", "array_col"]].tolist() == [4, 3]
    assert "A1_2x2" not in adata.obs_names and "A1_5x4" not in adata.obs_names
    np.testing.assert_allclose(
        adata.obsm["spatial"][adata.obs_names.get_loc("A1_3x4")], [PITCH * 3.01 + 3, PITCH * 3.99 + 5]
    )
    assert sparse.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert list(adata.var_names) == ["g2", "g3"]
    expected = her2st_tiny["A2"].loc["4x3", ["g2", "g3"]].to_numpy()
    np.testing.assert_array_equal(adata[["A2_4x3"]].X.toarray().ravel(), expected)

    entry = adata.uns["spatial"]["A1"]
    assert entry["images"]["hires"].shape == (83, 100, 3) and entry["images"]["hires"].dtype == np.uint8
    factors = entry["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(100 / 240)
    assert factors["microns_per_pixel"] == pytest.approx(10.0, rel=1e-6)
    assert factors["spot_spacing_fullres"] == pytest.approx(PITCH, rel=1e-6)
    assert factors["spot_diameter_fullres"] == pytest.approx(10.0, rel=1e-6)
    assert entry["metadata"]["microns_per_pixel_source"] == "estimated from spot pitch"
    source = Path(entry["metadata"]["source_image_path"])
    assert source.is_absolute() and source.name == "HE_A1.jpg"


def test_genes_union_zero_fills_and_intersection_keeps_shared(her2st_tiny: dict) -> None:
    union = hx.io.read_legacy_st(her2st_tiny["root"], genes="union")
    assert list(union.var_names) == ["g1", "g2", "g3", "g4"]
    a1, a2 = union.obs["slide"] == "A1", union.obs["slide"] == "A2"
    assert union[a2, "g1"].X.sum() == 0 and union[a1, "g4"].X.sum() == 0
    assert union[a1, "g1"].X.sum() == her2st_tiny["A1"].drop(index="5x4")["g1"].sum() > 0
    inter = hx.io.read_legacy_st(her2st_tiny["root"], sections=["A2", "A1"])
    np.testing.assert_array_equal(inter.X.toarray(), union[inter.obs_names, ["g2", "g3"]].X.toarray())
    with pytest.raises(ValueError, match=r"`genes` must be one of \['intersection', 'union'\]"):
        hx.io.read_legacy_st(her2st_tiny["root"], genes="all")


def test_stutility_layout_patients_and_transposed_gz_counts(tmp_path: Path, rng: np.random.Generator) -> None:
    spots = _grid().drop(columns="selected")
    counts = _stutility(tmp_path, "S1", rng, spots=spots)
    _stutility(tmp_path, "S2", rng, counts=_counts(_grid(), ["g1", "g2"], rng).T, counts_suffix=".tsv.gz")
    adata = hx.io.read_legacy_st(tmp_path, patients={"S2": "patient 7"})
    assert adata.obs.groupby("slide", observed=True)["patient"].first().to_dict() == {
        "S1": "S1",
        "S2": "patient 7",
    }
    assert adata.n_obs == 24 and list(adata.var_names) == ["g1", "g2"]
    np.testing.assert_array_equal(adata[adata.obs["slide"] == "S1"].X.toarray(), counts.to_numpy())
    assert adata.uns["spatial"]["S2"]["scalefactors"]["microns_per_pixel"] == pytest.approx(10.0, rel=1e-6)


def test_microns_per_pixel_argument_is_recorded(tmp_path: Path, rng: np.random.Generator) -> None:
    _stutility(tmp_path, "S1", rng)
    adata = hx.io.read_legacy_st(tmp_path, microns_per_pixel=9.5)
    factors = adata.uns["spatial"]["S1"]["scalefactors"]
    assert factors["microns_per_pixel"] == 9.5 and factors["spot_diameter_fullres"] == pytest.approx(
        100 / 9.5
    )
    assert adata.uns["spatial"]["S1"]["metadata"]["microns_per_pixel_source"] == "argument"
    with pytest.warns(UserWarning, match="differs by more than 10 %"):
        hx.io.read_legacy_st(tmp_path, microns_per_pixel=5.0)


def test_sections_incomplete_skipped_or_refused(her2st_tiny: dict) -> None:
    image = next((her2st_tiny["root"] / "data" / "ST-imgs" / "P2" / "A2").iterdir())
    image.unlink()
    with pytest.warns(UserWarning, match=r"Skipping incomplete sections: A2 \(no image"):
        adata = hx.io.read_legacy_st(her2st_tiny["root"])
    assert list(adata.obs["slide"].cat.categories) == ["A1"]
    with pytest.raises(FileNotFoundError, match=r"'A2' lacks its image .*ST-imgs/\{patient\}/A2/\*\.jpg"):
        hx.io.read_legacy_st(her2st_tiny["root"], sections=["A2"])
    with pytest.raises(
        KeyError, match=r"\['B9'\] are not in this her2st dataset; its sections are \['A1', 'A2'\]"
    ):
        hx.io.read_legacy_st(her2st_tiny["root"], sections=["B9"])


def test_layout_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hx.io.read_legacy_st(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"it is empty.*her2st layout.*STUtility layout"):
        hx.io.read_legacy_st(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "S1.tsv").write_text("x\n")
    (other / "spots_S1.tsv").write_text("x\n")
    with pytest.raises(
        FileNotFoundError, match=r"holds \['S1.tsv', 'spots_S1.tsv'\].*alignment_table_\{S\}.tsv"
    ):
        hx.io.read_legacy_st(other)


def test_duplicate_genes_warn_and_duplicate_spots_fail(tmp_path: Path, rng: np.random.Generator) -> None:
    spots = _grid()
    counts = _counts(spots, ["g1", "g2", "g1"], rng)
    _stutility(tmp_path / "dup_genes", "S1", rng, counts=counts)
    with pytest.warns(UserWarning, match=r"duplicated gene names \(e.g. \['g1'\]\)"):
        adata = hx.io.read_legacy_st(tmp_path / "dup_genes")
    assert list(adata.var_names) == ["g1", "g2", "g1-1"]
    np.testing.assert_array_equal(adata[:, "g1-1"].X.toarray().ravel(), counts.iloc[:, 2].to_numpy())
    _stutility(tmp_path / "dup_spots", "S1", rng, counts=pd.concat([counts.iloc[:3], counts.iloc[:1]]))
    with pytest.raises(ValueError, match=r"lists spots \['2x2'\] more than once"):
        hx.io.read_legacy_st(tmp_path / "dup_spots")


@pytest.mark.parametrize(("value", "problem"), [(np.nan, "NaN"), (-1, "negative")])
def test_bad_counts_fail(tmp_path: Path, rng: np.random.Generator, value: float, problem: str) -> None:
    counts = _counts(_grid(), ["g1", "g2"], rng).astype(float)
    counts.iloc[2, 1] = value
    _stutility(tmp_path, "S1", rng, counts=counts)
    with pytest.raises(ValueError, match=f"S1.tsv contains {problem}"):
        hx.io.read_legacy_st(tmp_path)


def test_counts_and_spots_sharing_no_spot_fail(tmp_path: Path, rng: np.random.Generator) -> None:
    spots = _grid()
    counts = _counts(spots, ["g1"], rng)
    counts.index = [f"{i}x{i + 30}" for i in range(len(counts))]
    _stutility(tmp_path, "S1", rng, counts=counts, spots=spots)
    with pytest.raises(
        ValueError, match=r"S1.tsv and the spot file .*alignment_table_S1.tsv share no spot.*'0x30'.*'2x2'"
    ):
        hx.io.read_legacy_st(tmp_path)


def test_spots_outside_image_fail(tmp_path: Path, rng: np.random.Generator) -> None:
    spots = _grid()
    spots.loc[[0, 1], "pixel_x"] += IMAGE_SIZE[0]
    _stutility(tmp_path, "S1", rng, spots=spots)
    with pytest.raises(
        ValueError, match=r"2 of 12 spots of slide 'S1' lie outside its image .*S1.jpg \(240 x 200 px"
    ):
        hx.io.read_legacy_st(tmp_path)


@pytest.mark.parametrize(("mode", "warning"), [("L", "mode 'L'"), ("RGBA", "alpha channel")])
def test_grey_and_rgba_images_are_converted_with_a_warning(
    tmp_path: Path, rng: np.random.Generator, mode: str, warning: str
) -> None:
    _stutility(tmp_path, "S1", rng, image=".png", mode=mode)
    with pytest.warns(UserWarning, match=warning):
        adata = hx.io.read_legacy_st(tmp_path, hires_max_px=50)
    assert adata.uns["spatial"]["S1"]["images"]["hires"].shape == (42, 50, 3)
    with pytest.warns(UserWarning, match=warning):
        patch = hx.io.slide_images(adata)["S1"].image.read_region(-2, 0, 8, 8)
    assert patch.shape == (8, 8, 3) and patch.dtype == np.uint8 and (patch[:2] == PAD_VALUE).all()


def test_16_bit_image_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    _stutility(tmp_path, "S1", rng, image=".png", mode="I;16")
    with pytest.raises(ValueError, match="needs an 8-bit RGB H&E image"):
        hx.io.read_legacy_st(tmp_path)


@pytest.mark.parametrize("value", [1.5, 0.25])
def test_non_integer_counts_are_refused(tmp_path: Path, rng: np.random.Generator, value: float) -> None:
    counts = _counts(_grid(), ["g1", "g2"], rng).astype(float)
    counts.iloc[2, 1] = value  # e.g. log-normalised or scaled values saved as counts
    _stutility(tmp_path, "S1", rng, counts=counts)
    with pytest.raises(ValueError, match=r"S1.tsv contains non-integer values.*raw counts"):
        hx.io.read_legacy_st(tmp_path)


def test_swapped_pixel_columns_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    spots = _grid()
    spots[["pixel_x", "pixel_y"]] = spots[["pixel_y", "pixel_x"]].to_numpy()  # still inside the image
    _stutility(tmp_path, "S1", rng, spots=spots)
    with pytest.raises(ValueError, match=r"pixel_x and pixel_y columns look swapped.*Swap the two columns"):
        hx.io.read_legacy_st(tmp_path)


def test_scaled_pixel_coordinates_of_one_section_are_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    for slide in ("S1", "S2", "S3"):
        _stutility(tmp_path, slide, rng)
    scaled = _grid()
    scaled[["pixel_x", "pixel_y"]] *= 0.6  # e.g. coordinates of a smaller copy of the image
    _stutility(tmp_path, "S4", rng, spots=scaled)
    with pytest.raises(ValueError, match=r"sections \['S4 \(1.67x\)'\].*resized image.*microns_per_pixel="):
        hx.io.read_legacy_st(tmp_path)
    with pytest.warns(UserWarning, match="differs by more than 10 %"):  # the way out, with a warning
        assert hx.io.read_legacy_st(tmp_path, sections=["S4"], microns_per_pixel=10.0).n_obs == 12
    finer = _grid()  # a section scanned at twice the resolution: twice the pixels, same tissue
    finer[["pixel_x", "pixel_y"]] *= 2
    other = tmp_path / "other"
    for slide in ("S1", "S2"):
        _stutility(other, slide, rng)
    _stutility(other, "S3", rng, spots=finer)
    _write_image(other / "S3.jpg", size=(IMAGE_SIZE[0] * 2, IMAGE_SIZE[1] * 2))
    assert hx.io.read_legacy_st(other).n_obs == 36


@pytest.mark.parametrize("mpp", [float("inf"), float("nan"), 1e-6, 1e6, 0.0, -1.0, "half", [0.5]])
def test_implausible_microns_per_pixel_is_refused(tmp_path: Path, rng: np.random.Generator, mpp) -> None:
    _stutility(tmp_path, "S1", rng)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        hx.io.read_legacy_st(tmp_path, microns_per_pixel=mpp)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("spoil", "image", "match"),
    [
        (_truncated, ".jpg", "is cut off.*Copy the image again"),
        (_truncated, ".png", "is cut off.*Copy the image again"),
        (lambda path: path.write_bytes(b""), ".jpg", r"is empty \(0 bytes\)"),
        (lambda path: path.write_text("not an image"), ".jpg", "is not an image"),
        (
            lambda path: path.rename(path.with_suffix(".tif")),
            ".jpg",
            r"is a JPEG file named \.tif.*Rename it to S1\.jpg",
        ),
    ],
)
def test_damaged_images_are_refused_at_read_time(
    tmp_path: Path, rng: np.random.Generator, spoil, image: str, match: str
) -> None:
    _stutility(tmp_path, "S1", rng, image=image)
    spoil(tmp_path / f"S1{image}")
    with pytest.raises(ValueError, match=match):
        hx.io.read_legacy_st(tmp_path)


def test_cut_off_tiff_is_refused(tmp_path: Path) -> None:
    import tifffile

    from histo2expr.io._image import read_image_size

    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), dtype=np.uint8))
    _truncated(path)
    with pytest.raises(ValueError, match="cut off: its pixel data run past the end"):
        read_image_size(path)


# --- Visium ---------------------------------------------------------------------------------


@pytest.fixture
def visium_outs(tmp_path: Path, rng: np.random.Generator, write_10x_h5) -> Path:
    """A 400 x 300 px 'full-resolution' slide, 6 spots, Space Ranger v2 file names."""
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = [f"AAAC{i}-1" for i in range(6)]
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        rng.poisson(2.0, (6, 4)),
        barcodes,
        ["A", "B", "C", "D"],
        "lib1",
    )
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": [0, 0, 1, 1, 2, 2],
            "array_col": [0, 2, 1, 3, 0, 2],
            "pxl_row_in_fullres": [50, 50, 150, 150, 250, 250],
            "pxl_col_in_fullres": [60, 160, 110, 210, 60, 160],
        }
    )
    positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    factors = {
        "spot_diameter_fullres": 55.0,  # 1 µm per px: spots 100 px apart, as placed above
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.1,
        "fiducial_diameter_fullres": 170.0,
    }
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    _write_image(outs / "spatial" / "tissue_hires_image.png", size=(200, 150))
    _write_image(outs / "spatial" / "tissue_lowres_image.png", size=(40, 30))
    return outs


def test_read_visium_data_model(visium_outs: Path) -> None:
    adata = hx.io.read_visium(visium_outs, hires_max_px=100)
    assert adata.n_obs == 6 and list(adata.var_names) == ["A", "B", "C", "D"]
    assert adata.obs_names[0] == "lib1_AAAC0-1"
    assert (adata.obs["slide"] == "lib1").all() and (adata.obs["patient"] == "lib1").all()
    assert adata.obs.loc["lib1_AAAC3-1", ["array_row", "array_col"]].tolist() == [1, 3]
    np.testing.assert_allclose(adata.obsm["spatial"][3], [210, 150])
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    entry = adata.uns["spatial"]["lib1"]
    assert entry["images"]["hires"].shape == (75, 100, 3)
    factors = entry["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(0.25)
    assert factors["microns_per_pixel"] == pytest.approx(1.0) and factors[
        "spot_spacing_fullres"
    ] == pytest.approx(100)
    assert factors["fiducial_diameter_fullres"] == 170.0
    assert entry["metadata"]["microns_per_pixel_source"] == "estimated from spot diameter"
    assert "source_image_path" not in entry["metadata"]


def test_read_visium_source_image_found_given_or_refused(visium_outs: Path, tmp_path: Path) -> None:
    _write_image(visium_outs / "fullres.tif", size=(400, 300))
    adata = hx.io.read_visium(visium_outs, library_id="slideX", patient="P9", microns_per_pixel=1.05)
    entry = adata.uns["spatial"]["slideX"]
    assert entry["metadata"]["source_image_path"] == str((visium_outs / "fullres.tif").resolve())
    assert entry["metadata"]["microns_per_pixel_source"] == "argument"
    assert (adata.obs["patient"] == "P9").all()
    image = hx.io.slide_images(adata)["slideX"]
    assert image.image.shape == (300, 400) and image.coord_scale == 1.0
    wrong = tmp_path / "wrong.png"
    _write_image(wrong, size=(800, 600))
    with pytest.raises(ValueError, match=r"800 x 600 px, but .* about 400 x 300 px"):
        hx.io.read_visium(visium_outs, source_image_path=wrong)


def test_read_visium_refuses_bad_ids_pixel_sizes_and_scaled_positions(visium_outs: Path) -> None:
    with pytest.raises(ValueError, match="cannot be stored"):
        hx.io.read_visium(visium_outs, library_id="run1/lib1")
    with pytest.raises(ValueError, match="not a positive number of micrometres"):
        hx.io.read_visium(visium_outs, microns_per_pixel=float("inf"))
    with pytest.warns(UserWarning, match="differs by more than 10 %"):
        hx.io.read_visium(visium_outs, microns_per_pixel=0.6)
    positions = visium_outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(positions)
    table[["pxl_row_in_fullres", "pxl_col_in_fullres"]] //= 2  # e.g. positions in hires pixels
    table.to_csv(positions, index=False)
    with pytest.raises(ValueError, match=r"'lib1' are 50 px apart.*spacing of 100 px.*look scaled"):
        hx.io.read_visium(visium_outs)


def test_read_visium_names_missing_files(visium_outs: Path) -> None:
    (visium_outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scalefactors_json.json'\] missing"):
        hx.io.read_visium(visium_outs)


# --- SpatialData ----------------------------------------------------------------------------


def _spatialdata(*, with_obsm: bool, image_transform: object = None) -> tuple:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Scale

    pixels = np.arange(3 * 40 * 60, dtype=np.uint32).reshape(3, 40, 60) % 251
    image = Image2DModel.parse(
        pixels.astype(np.uint8),
        dims=("c", "y", "x"),
        scale_factors=[2],
        transformations={"global": image_transform or Scale([2.0, 2.0], axes=("x", "y"))},
    )
    centres = np.array([[20.0, 30.0], [60.0, 50.0], [100.0, 70.0]])  # global units = 2 image pixels
    shapes = ShapesModel.parse(centres, geometry=0, radius=np.full(3, 4.0), index=np.array([7, 8, 9]))
    table = AnnData(
        np.ones((3, 2), dtype=np.float32),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * 3), "spot_id": [9, 7, 8]}, index=["a", "b", "c"]
        ),
    )
    if with_obsm:
        table.obsm["spatial"] = centres[[2, 0, 1]]
    table.uns["spatial"] = {"spots": {"scalefactors": {"microns_per_pixel": 0.5}}}
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table}), pixels


@pytest.mark.parametrize("with_obsm", [True, False])
def test_spatialdata_slide_images_map_spots_to_image_pixels(with_obsm: bool) -> None:
    sdata, pixels = _spatialdata(with_obsm=with_obsm)
    slide = hx.io.slide_images(sdata, slide_key="region")["spots"]
    assert slide.image.shape == (40, 60) and slide.coord_scale == pytest.approx(0.5)
    np.testing.assert_allclose(slide.centres, [[50.0, 35.0], [10.0, 15.0], [30.0, 25.0]])
    np.testing.assert_array_equal(slide.spots, [0, 1, 2])
    assert slide.microns_per_pixel == pytest.approx(1.0) and slide.spot_diameter_px == pytest.approx(4.0)
    region = slide.image.read_region(35, 55, 10, 10)
    np.testing.assert_array_equal(region[:5, :5], np.moveaxis(pixels[:, 35:, 55:], 0, -1))
    assert (region[5:] == PAD_VALUE).all() and (region[:, 5:] == PAD_VALUE).all()


def test_spatialdata_translation_image_key_and_unsupported_transform() -> None:
    from spatialdata.transformations import Affine, Translation

    sdata, _ = _spatialdata(with_obsm=True, image_transform=Translation([10.0, 0.0], axes=("x", "y")))
    slide = hx.io.slide_images(sdata, slide_key="region", image_key={"spots": "he"})["spots"]
    np.testing.assert_allclose(slide.centres[0], [90.0, 70.0])
    with pytest.raises(KeyError, match=r"names no image element for slide 'spots' \(got 'nope'\)"):
        hx.io.slide_images(sdata, slide_key="region", image_key="nope")
    rotation = Affine(
        np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    sdata, _ = _spatialdata(with_obsm=True, image_transform=rotation)
    with pytest.raises(NotImplementedError, match="only a uniform positive scale plus translation"):
        hx.io.slide_images(sdata, slide_key="region")


def test_spatialdata_image_matched_by_name_largest_first() -> None:
    from spatialdata.models import Image2DModel

    sdata, _ = _spatialdata(with_obsm=True)
    small = np.zeros((3, 20, 30), dtype=np.uint8)
    sdata.images["other"] = Image2DModel.parse(small, dims=("c", "y", "x"))
    with pytest.raises(KeyError, match=r"No image element .* matches slide 'spots'.*\['he', 'other'\]"):
        hx.io.slide_images(sdata, slide_key="region")
    sdata.images["spots_hires_image"] = Image2DModel.parse(small, dims=("c", "y", "x"))
    sdata.images["spots_full_image"] = Image2DModel.parse(
        np.zeros((3, 50, 70), dtype=np.uint8), dims=("c", "y", "x")
    )
    slide = hx.io.slide_images(sdata, slide_key="region")["spots"]
    assert slide.image.name == "spots_full_image" and slide.image.shape == (50, 70)
    np.testing.assert_allclose(slide.centres[0], [100.0, 70.0])  # identity transformation


def test_anndata_slide_images_report_spots_and_centres() -> None:
    adata = AnnData(np.zeros((3, 1), dtype=np.float32))
    adata.obs["slide"] = pd.Categorical(["s1", "s2", "s1"])
    adata.obsm["spatial"] = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    hires = np.zeros((10, 10, 3), dtype=np.uint8)
    for slide in ("s1", "s2"):
        adata.uns.setdefault("spatial", {})[slide] = {
            "images": {"hires": hires},
            "scalefactors": {"tissue_hires_scalef": 0.1},
        }
    with pytest.warns(UserWarning, match="no full-resolution image path"):
        images = hx.io.slide_images(adata)
    np.testing.assert_array_equal(images["s1"].spots, [0, 2])
    np.testing.assert_allclose(images["s1"].centres, [[1.0, 2.0], [5.0, 6.0]])


# --- real data: her2st ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def her2st(her2st_path: Path) -> AnnData:
    return hx.io.read_legacy_st(her2st_path)


@pytest.mark.realdata
def test_her2st_spots_genes_and_scale(her2st: AnnData) -> None:
    per_slide = her2st.obs["slide"].value_counts()
    assert sorted(per_slide.index) == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert 1190 <= her2st.n_obs <= 1193 and her2st.n_vars >= 13891
    assert her2st.obs.groupby("slide", observed=True)["patient"].first().to_dict() == {
        "B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C", "C6": "C"
    }  # fmt: skip
    for slide, entry in her2st.uns["spatial"].items():
        factors = entry["scalefactors"]
        assert factors["microns_per_pixel"] == pytest.approx(0.69, abs=0.01), slide
        assert factors["spot_spacing_fullres"] == pytest.approx(290, abs=5), slide
        assert max(entry["images"]["hires"].shape) == 2000


@pytest.mark.realdata
def test_her2st_spots_land_on_tissue(her2st: AnnData) -> None:
    images = hx.io.slide_images(her2st)
    # One section of each patient: reading a section decodes its JPEG into a 264 MB cache file.
    for slide in ["B4", "C3"]:
        image = images[slide]
        lazy = image.image
        height, width = lazy.shape
        centres = np.rint(her2st[her2st.obs["slide"] == slide].obsm["spatial"]).astype(int)
        spots = np.mean([lazy.read_region(y - 32, x - 32, 64, 64).mean() for x, y in centres])
        corners = np.mean(
            [lazy.read_region(t, left, 64, 64).mean() for t in (0, height - 64) for left in (0, width - 64)]
        )
        swapped = np.mean([lazy.read_region(x - 32, y - 32, 64, 64).mean() for x, y in centres])
        assert spots < corners - 10, (slide, spots, corners)
        assert spots < swapped, (slide, spots, swapped)  # (x, y) is not (row, column)
