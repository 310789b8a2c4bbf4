"""10x Genomics layouts: Visium (mtx, Space Ranger 1 positions, CytAssist), Visium HD bins, Xenium with its H&E."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import io as scipy_io
from scipy import sparse

import histo2expr as hx

# --- Visium: Matrix Market counts, Space Ranger 1 positions, CytAssist image ------------------------


def _png(path: Path, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _write_mtx(folder: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """Space Ranger's filtered_feature_bc_matrix/ folder (Matrix Market, features x barcodes, gzipped)."""
    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy_io.mmwrite(handle, sparse.coo_matrix(counts.T.astype(np.int64)))
    features = "".join(f"ENSG{i:05d}\t{g}\tGene Expression\n" for i, g in enumerate(genes))
    (folder / "features.tsv.gz").write_bytes(gzip.compress(features.encode()))
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress("".join(f"{b}\n" for b in barcodes).encode()))


@pytest.fixture
def visium_sr1(tmp_path: Path) -> dict:
    """A Space Ranger 1 run of a CytAssist slide without a microscope image: mtx counts, positions list without
    header, the CytAssist image (400 x 300 px) as the full-resolution image."""
    outs = tmp_path / "V1_Breast" / "outs"
    barcodes = [f"AAAC{i}-1" for i in range(6)]
    counts = np.random.default_rng(0).poisson(3.0, (6, 3))
    _write_mtx(outs / "filtered_feature_bc_matrix", counts, barcodes, ["A", "B", "C"])
    rows = [
        f"{b},1,{r},{c},{y},{x}\n"
        for b, r, c, y, x in zip(
            barcodes,
            [0, 0, 1, 1, 2, 2],
            [0, 2, 1, 3, 0, 2],
            [50, 50, 150, 150, 250, 250],
            [60, 160, 110, 210, 60, 160],
            strict=True,
        )
    ]
    rows.append("TTTT9-1,0,5,5,10,10\n")  # a spot off tissue, in the positions file only
    (outs / "spatial").mkdir(parents=True)
    (outs / "spatial" / "tissue_positions_list.csv").write_text("".join(rows))
    # 1 µm per px: 55 µm spots 100 px apart, as placed above
    factors = {"spot_diameter_fullres": 55.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    _png(outs / "spatial" / "tissue_hires_image.png", (200, 150))
    _png(outs / "spatial" / "tissue_lowres_image.png", (40, 30))
    cytassist = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(outs / "spatial" / "cytassist_image.tiff", cytassist, photometric="rgb")
    return {"outs": outs, "counts": counts, "cytassist": cytassist}


def test_read_visium_mtx_counts_space_ranger_1_positions_and_cytassist_image(visium_sr1: dict) -> None:
    adata = hx.io.read_visium(visium_sr1["outs"])
    assert adata.obs["slide"].iloc[0] == "V1_Breast"  # no library id in mtx files: the run's folder name
    assert list(adata.var_names) == ["A", "B", "C"] and adata.n_obs == 6
    np.testing.assert_array_equal(adata.X.toarray(), visium_sr1["counts"])
    np.testing.assert_allclose(adata.obsm["spatial"][3], [210, 150])  # x = pxl_col, y = pxl_row
    assert adata.obs["array_col"].tolist() == [0, 2, 1, 3, 0, 2]
    entry = adata.uns["spatial"]["V1_Breast"]
    assert entry["metadata"]["source_image_path"].endswith("cytassist_image.tiff")
    image = hx.io.slide_images(adata)["V1_Breast"].image
    np.testing.assert_array_equal(image.read_region(10, 20, 5, 6), visium_sr1["cytassist"][10:15, 20:26])


def test_read_visium_layout_errors(visium_sr1: dict) -> None:
    outs = visium_sr1["outs"]
    with pytest.raises(
        FileNotFoundError, match=r"filtered_feature_bc_matrix\.h5 or filtered_feature_bc_matrix/"
    ):
        hx.io.read_visium(outs, counts_file="raw_feature_bc_matrix")
    (outs / "spatial" / "tissue_positions_list.csv").write_text("AAAC0-1,1,0,0,50\n")
    with pytest.raises(ValueError, match="has 5 columns; a Space Ranger positions file has 6"):
        hx.io.read_visium(outs)
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"tissue_positions.csv \(or tissue_positions_list.csv\)"):
        hx.io.read_visium(outs)


def test_read_visium_space_ranger_2_positions_with_header(visium_sr1: dict, write_10x_h5) -> None:
    outs = visium_sr1["outs"]
    listed = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    listed.columns = [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    listed.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        visium_sr1["counts"],
        list(listed["barcode"][:6]),
        ["A", "B", "C"],
        "lib7",
    )
    adata = hx.io.read_visium(outs)
    assert adata.obs["slide"].iloc[0] == "lib7"  # the HDF5 file is preferred and names the library
    assert adata.uns["spatial"]["lib7"]["metadata"]["software_version"] == "spaceranger-3.0.0"
    np.testing.assert_allclose(adata.obsm["spatial"][3], [210, 150])


# --- Visium HD ------------------------------------------------------------------------------------


MICRONS_PER_PIXEL = 0.5  # of the microscope image


def _visium_hd(root: Path, write_10x_h5, *, image_size: tuple[int, int] = (200, 160)) -> dict:
    """A Space Ranger 3 Visium HD run: binned_outputs/square_008um and square_016um, feature_slice.h5 with its
    layout metadata, and the microscope image (``image_size`` px at 0.5 µm/px)."""
    import h5py

    outs = root / "HD_run" / "outs"
    width, height = image_size
    written = {}
    for bin_um in (8, 16):
        side = bin_um / MICRONS_PER_PIXEL
        n_cols, n_rows = int(180 // side), int(140 // side)
        rows, cols = np.divmod(np.arange(n_cols * n_rows), n_cols)
        barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        counts = np.random.default_rng(bin_um).poisson(bin_um / 4, (len(barcodes), 3))
        folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, ["G1", "G2", "G3"], "HD_run")
        positions = pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": (rows + 0.5) * side + 5,
                "pxl_col_in_fullres": (cols + 0.5) * side + 5,
            }
        )
        (folder / "spatial").mkdir(parents=True)
        positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        factors = {
            "spot_diameter_fullres": side,
            "bin_size_um": float(bin_um),
            "microns_per_pixel": MICRONS_PER_PIXEL,
            "regist_target_img_scalef": 0.25,
            "tissue_lowres_scalef": 0.1,
            "fiducial_diameter_fullres": 100.0,
            "tissue_hires_scalef": 0.25,
        }
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
        _png(folder / "spatial" / "tissue_hires_image.png", (50, 40), seed=1)
        _png(folder / "spatial" / "tissue_lowres_image.png", (20, 16), seed=2)
        written[bin_um] = {"counts": counts, "positions": positions}
    (outs / "spatial").mkdir(parents=True)
    (outs / "spatial" / "scalefactors_json.json").write_text(
        (outs / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json").read_text()
    )
    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    with h5py.File(outs / "feature_slice.h5", "w") as handle:
        handle.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout)})
    microscope = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    (outs / "microscope_image").mkdir()
    tifffile.imwrite(outs / "microscope_image" / "he.tif", microscope, photometric="rgb", tile=(64, 64))
    return {"outs": outs, "microscope": microscope, **written}


@pytest.mark.parametrize("bin_um", [8, 16])
def test_read_visium_hd_bins_as_spots(tmp_path: Path, write_10x_h5, bin_um: int) -> None:
    pytest.importorskip(
        "spatialdata_io", reason='Visium HD is read with spatialdata-io: pip install "histo2expr[io]"'
    )
    run = _visium_hd(tmp_path, write_10x_h5)
    adata = hx.io.read_visium_hd(run["outs"], bin_size=bin_um)
    written = run[bin_um]
    assert adata.n_obs == len(written["positions"]) and adata.obs["slide"].iloc[0] == "HD_run"
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"])
    expected = written["positions"][["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_allclose(adata.obsm["spatial"], expected)
    factors = adata.uns["spatial"]["HD_run"]["scalefactors"]
    assert factors["microns_per_pixel"] == MICRONS_PER_PIXEL
    assert factors["spot_diameter_fullres"] == factors["spot_spacing_fullres"] == bin_um / MICRONS_PER_PIXEL
    image = hx.io.slide_images(adata)["HD_run"]
    assert image.coord_scale == 1.0 and image.spot_diameter_px == bin_um / MICRONS_PER_PIXEL
    np.testing.assert_array_equal(image.image.read_region(3, 4, 5, 6), run["microscope"][3:8, 4:10])


def test_read_visium_hd_errors(tmp_path: Path, write_10x_h5) -> None:
    pytest.importorskip(
        "spatialdata_io", reason='Visium HD is read with spatialdata-io: pip install "histo2expr[io]"'
    )
    run = _visium_hd(tmp_path, write_10x_h5, image_size=(120, 160))  # narrower than the bins reach
    with pytest.raises(FileNotFoundError, match=r"it has \['square_008um', 'square_016um'\]"):
        hx.io.read_visium_hd(run["outs"], bin_size=2)
    with pytest.raises(ValueError, match=r"he.tif is 120 x 160 px, but the scale factors imply"):
        hx.io.read_visium_hd(run["outs"], source_image_path=run["outs"] / "microscope_image" / "he.tif")
    with warnings.catch_warnings(
        record=True
    ) as caught:  # found, does not fit: not used, the spots checked on hires
        warnings.simplefilter("always")
        adata = hx.io.read_visium_hd(run["outs"])
    assert any("It is not used" in str(w.message) for w in caught)
    assert "source_image_path" not in adata.uns["spatial"]["HD_run"]["metadata"]
    factors = run["outs"] / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    factors.write_text(json.dumps({**json.loads(factors.read_text()), "microns_per_pixel": 0}))
    with pytest.raises(ValueError, match="'microns_per_pixel' is 0"):
        hx.io.read_visium_hd(run["outs"])


# --- Xenium with its post-run H&E -------------------------------------------------------------------

XENIUM_PX = 0.2125  # µm per Xenium morphology pixel
HE_MPP = 0.5  # µm per H&E pixel


def _alignment_matrix(angle_deg: float = 3.0, offset: tuple[float, float] = (120.0, -40.0)) -> np.ndarray:
    """H&E pixels -> Xenium pixels: scale 0.5 / 0.2125, a small rotation and a shift (as Xenium Explorer exports)."""
    theta = np.deg2rad(angle_deg)
    scale = HE_MPP / XENIUM_PX
    return np.array(
        [
            [scale * np.cos(theta), -scale * np.sin(theta), offset[0]],
            [scale * np.sin(theta), scale * np.cos(theta), offset[1]],
            [0.0, 0.0, 1.0],
        ]
    )


@pytest.fixture
def xenium_run(tmp_path: Path) -> dict:
    """A Xenium output folder (transcripts.parquet with the Xenium columns, experiment.xenium), the H&E as a
    pyramidal OME-TIFF (600 x 400 px at 0.5 µm) and the alignment CSV of Xenium Explorer."""
    rng = np.random.default_rng(0)
    run = tmp_path / "output-XETG00001__0011__Region_1"
    run.mkdir()
    (run / "experiment.xenium").write_text(json.dumps({"pixel_size": XENIUM_PX, "run_name": "demo"}))
    matrix = _alignment_matrix()
    # Transcripts placed at known H&E positions: 50 in the pseudo-spot of row 1, column 2 (55 µm = 110 px pitch),
    # and background everywhere on the image; some low quality, some control probes.
    centre = np.array([(2 + 0.5) * 110, (1 + 0.5) * 110])
    in_spot = centre + rng.uniform(-30, 30, (50, 2))
    background = rng.uniform([0, 0], [600, 400], (400, 2))
    he = np.vstack([in_spot, background])
    names = ["EPCAM"] * 50 + list(rng.choice(["EPCAM", "PTPRC", "ACTA2"], 400))
    qv = np.full(len(he), 30.0, dtype=np.float32)
    qv[50:100] = 10.0  # below Q20: dropped
    names[100:120] = ["NegControlProbe_00001"] * 20
    xenium_px = he @ matrix[:2, :2].T + matrix[:2, 2]
    microns = xenium_px * XENIUM_PX
    transcripts = pd.DataFrame(
        {
            "transcript_id": np.arange(len(he), dtype=np.uint64),
            "cell_id": ["UNASSIGNED"] * len(he),
            "overlaps_nucleus": np.zeros(len(he), dtype=np.uint8),
            "feature_name": names,
            "x_location": microns[:, 0].astype(np.float32),
            "y_location": microns[:, 1].astype(np.float32),
            "z_location": np.full(len(he), 5.0, dtype=np.float32),
            "qv": qv,
            "fov_name": ["A1"] * len(he),
            "nucleus_distance": np.zeros(len(he), dtype=np.float32),
        }
    )
    transcripts.to_parquet(run / "transcripts.parquet", index=False)
    pixels = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    he_path = tmp_path / "Xenium_HE.ome.tif"
    with tifffile.TiffWriter(he_path, ome=True) as writer:
        options = {"tile": (128, 128), "photometric": "rgb"}
        writer.write(
            pixels,
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": HE_MPP, "PhysicalSizeY": HE_MPP},
            **options,
        )
        writer.write(pixels[::2, ::2], subfiletype=1, **options)
    alignment = tmp_path / "Xenium_HE_imagealignment.csv"
    pd.DataFrame(matrix).to_csv(alignment, header=False, index=False)
    return {
        "run": run,
        "he": he_path,
        "alignment": alignment,
        "transcripts": transcripts,
        "he_xy": he,
        "pixels": pixels,
    }


def test_read_xenium_pools_transcripts_on_the_he(xenium_run: dict) -> None:
    adata = hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], xenium_run["alignment"])
    assert adata.obs["slide"].iloc[0] == "output-XETG00001__0011__Region_1"
    assert "NegControlProbe_00001" not in adata.var_names
    assert set(adata.var_names) == {"EPCAM", "PTPRC", "ACTA2"}
    factors = adata.uns["spatial"][adata.obs["slide"].iloc[0]]["scalefactors"]
    assert factors["microns_per_pixel"] == pytest.approx(HE_MPP)
    assert factors["spot_diameter_fullres"] == pytest.approx(110) and factors[
        "spot_spacing_fullres"
    ] == pytest.approx(110)
    # Expected counts, computed here from the H&E positions the transcripts were placed at.
    kept = (xenium_run["transcripts"]["qv"] >= 20) & ~xenium_run["transcripts"][
        "feature_name"
    ].str.startswith("NegControl")
    xy = xenium_run["he_xy"][kept.to_numpy()]
    col, row = np.floor(xy[:, 0] / 110).astype(int), np.floor(xy[:, 1] / 110).astype(int)
    inside = (col < 5) & (row < 3) & (((xy - (np.column_stack([col, row]) + 0.5) * 110) ** 2).sum(1) <= 55**2)
    assert adata.obs["n_transcripts"].sum() == inside.sum()
    spot = "output-XETG00001__0011__Region_1_r1_c2"
    assert adata.obs.loc[spot, "n_transcripts"] >= 50
    assert adata[spot, "EPCAM"].X.toarray().item() >= 50
    np.testing.assert_allclose(adata[spot].obsm["spatial"], [[275, 165]])
    image = hx.io.slide_images(adata)[adata.obs["slide"].iloc[0]]
    np.testing.assert_array_equal(image.image.read_region(7, 9, 4, 4), xenium_run["pixels"][7:11, 9:13])


def test_read_xenium_misaligned_or_bad_inputs_name_the_fix(xenium_run: dict, tmp_path: Path) -> None:
    inverse = np.linalg.inv(_alignment_matrix())  # Xenium -> H&E: the wrong direction
    with pytest.raises(
        ValueError, match=r"implies 0\.09\d* µm per H&E pixel, but Xenium_HE.ome.tif records 0\.5 µm"
    ):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], inverse)
    shifted = _alignment_matrix(offset=(5000.0, 5000.0))  # another image's alignment
    with pytest.raises(ValueError, match=r"transcripts fall outside the H&E .* do not overlap"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], shifted)
    with pytest.raises(ValueError, match="cannot be inverted"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], np.diag([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="3 x 3 matrix"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], np.eye(2))
    with pytest.raises(ValueError, match="must be at least `spot_diameter_um`"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], xenium_run["alignment"], spot_spacing_um=20)
    with pytest.raises(ValueError, match="`spot_diameter_um` must be a positive number"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], xenium_run["alignment"], spot_diameter_um=0)
    (xenium_run["run"] / "experiment.xenium").write_text(json.dumps({"pixel_size": 0}))
    with pytest.raises(ValueError, match="'pixel_size' is 0"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], xenium_run["alignment"])
    (xenium_run["run"] / "experiment.xenium").unlink()
    with pytest.raises(FileNotFoundError, match=r"experiment\.xenium is missing"):
        hx.io.read_xenium_he(xenium_run["run"], xenium_run["he"], xenium_run["alignment"])
    with pytest.raises(FileNotFoundError, match=r"transcripts\.parquet is missing"):
        hx.io.read_xenium_he(tmp_path, xenium_run["he"], xenium_run["alignment"])


def test_benchmark_finds_visium_runs_with_mtx_counts(visium_sr1: dict) -> None:
    from histo2expr import cli

    root = visium_sr1["outs"].parents[1]  # the folder holding V1_Breast/outs
    assert cli._detect_reader(root) == "visium"
    adata = cli.read_cohort(root)
    assert adata.obs["slide"].unique().tolist() == ["V1_Breast"] and adata.n_obs == 6
