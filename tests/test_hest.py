"""hx.io.read_hest on samples written in the HEST-Library layout (st/, wsis/, metadata/, patches/, tissue_seg/)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import histo2expr as hx
from histo2expr.io._wsi_image import TiffImage


def test_read_hest_cohort_data_model(hest_folder: Path) -> None:
    adata = hx.io.read_hest(hest_folder, hires_max_px=50)
    assert list(adata.obs["slide"].cat.categories) == ["MEND3", "TENX1", "TENX2"]
    assert adata.n_obs == 36
    assert list(adata.var_names) == ["GENE1", "GENE2", "GENE3"]  # genes shared by all samples
    assert adata.X.dtype == np.float32 and adata.X.format == "csr"
    patients = adata.obs.groupby("slide", observed=True)["patient"].first().to_dict()
    assert patients == {
        "MEND3": "Study B | patient unknown",
        "TENX1": "Study A | P1",
        "TENX2": "Study A | P1",
    }
    for column in ("organ", "species", "st_technology", "oncotree_code", "dataset_title"):
        assert adata.obs[column].dtype == "category"
    assert set(adata.obs["st_technology"]) == {"Visium"}
    entry = adata.uns["spatial"]["TENX1"]
    factors = entry["scalefactors"]
    assert factors["microns_per_pixel"] == 2.0
    assert factors["spot_diameter_fullres"] == pytest.approx(27.5)
    assert factors["spot_spacing_fullres"] == pytest.approx(50.0)
    assert max(entry["images"]["hires"].shape[:2]) == 50
    assert factors["tissue_hires_scalef"] == pytest.approx(0.25 * 50 / 80)
    assert entry["metadata"]["microns_per_pixel_source"] == "HEST metadata pixel_size_um_estimated"
    assert entry["metadata"]["hest"]["oncotree_code"] == "IDC"
    assert entry["metadata"]["hest_patches"] == 12
    assert "hest_patches_path" not in adata.uns["spatial"]["MEND3"]["metadata"]


def test_read_hest_counts_positions_and_lazy_image(tmp_path: Path, write_hest_sample) -> None:
    written = write_hest_sample(tmp_path / "hest", "TENX7", seed=4)
    adata = hx.io.read_hest(tmp_path / "hest", ids="TENX7")
    assert adata.obs_names[0] == f"TENX7_{written['barcodes'][0]}"
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"])
    np.testing.assert_allclose(adata.obsm["spatial"], np.column_stack([written["x"], written["y"]]))
    assert adata.obs["in_tissue_contours"].tolist() == list(written["x"] < 160)  # the outline covers x < 160
    image = hx.io.slide_images(adata)["TENX7"]
    assert isinstance(image.image, TiffImage)
    assert image.image.shape == (260, 320) and image.coord_scale == 1.0 and image.microns_per_pixel == 2.0
    np.testing.assert_array_equal(image.image.read_region(30, 50, 20, 25), written["pixels"][30:50, 50:75])


def test_read_hest_feeds_the_patch_layer_and_round_trips_h5ad(hest_folder: Path, tmp_path: Path) -> None:
    adata = hx.io.read_hest(hest_folder, ids=["TENX1", "TENX2"])
    assert adata.obs["in_tissue_contours"].dtype == "boolean"  # TENX2 has no outlines: missing, not False
    assert adata.obs.loc[adata.obs["slide"] == "TENX2", "in_tissue_contours"].isna().all()
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=16, progress=False)
    assert adata.obsm["X_histo"].shape[0] == 24 and np.isfinite(adata.obsm["X_histo"]).all()
    adata.write_h5ad(tmp_path / "hest.h5ad")


def _edit_metadata(folder: Path, sample: str, **fields) -> None:
    path = folder / "metadata" / f"{sample}.json"
    meta = json.loads(path.read_text())
    for key, value in fields.items():
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"pixel_size_um_estimated": 0}, ValueError, "'pixel_size_um_estimated' is 0, not a positive number"),
        ({"pixel_size_um_estimated": -0.5}, ValueError, "not a positive number"),
        ({"pixel_size_um_estimated": 2500.0}, ValueError, "2500 µm, outside the 0.02-20 µm"),
        ({"pixel_size_um_estimated": "abc"}, ValueError, "not a positive number"),
        (
            {"pixel_size_um_estimated": ..., "pixel_size_um_embedded": ...},
            KeyError,
            "has no pixel size",
        ),
        ({"spot_diameter": -55}, ValueError, "spot diameter in µm"),
        ({"fullres_px_width": 999}, ValueError, "records 999 x 260 px"),
    ],
)
def test_read_hest_bad_metadata_names_the_fix(hest_folder: Path, fields, error, message) -> None:
    _edit_metadata(hest_folder, "TENX1", **fields)
    with pytest.raises(error, match=message) as info:
        hx.io.read_hest(hest_folder, ids=["TENX1"])
    assert "TENX1" in str(info.value)


def test_read_hest_falls_back_to_the_embedded_pixel_size(hest_folder: Path) -> None:
    _edit_metadata(hest_folder, "TENX1", pixel_size_um_estimated=None)
    adata = hx.io.read_hest(hest_folder, ids=["TENX1"])
    assert adata.uns["spatial"]["TENX1"]["metadata"]["microns_per_pixel_source"].endswith(
        "pixel_size_um_embedded"
    )


def test_read_hest_missing_files_name_the_download(hest_folder: Path, tmp_path: Path) -> None:
    (hest_folder / "metadata" / "TENX2.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"TENX2\.json'\] missing.*snapshot_download"):
        hx.io.read_hest(hest_folder)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        hx.io.read_hest(hest_folder, ids=["NOPE9"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no HEST sample"):
        hx.io.read_hest(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hx.io.read_hest(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="distinct sample ids"):
        hx.io.read_hest(hest_folder, ids=["TENX1", "TENX1"])
    (hest_folder / "metadata" / "TENX1.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hx.io.read_hest(hest_folder, ids=["TENX1"])


def test_read_hest_image_not_covering_the_spots_fails(tmp_path: Path, write_hest_sample) -> None:
    write_hest_sample(tmp_path / "hest", "SMALL", size=(150, 260))  # spots reach x = 190 px
    with pytest.raises(ValueError, match=r"3 of 12 spots of slide 'SMALL' lie outside its image"):
        hx.io.read_hest(tmp_path / "hest")


def test_read_hest_bad_optional_files(hest_folder: Path) -> None:
    import h5py

    with h5py.File(hest_folder / "patches" / "TENX1.h5", "w") as handle:
        handle["img"] = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"lacks the datasets \['barcode', 'coords'\]"):
        hx.io.read_hest(hest_folder, ids=["TENX1"])
    (hest_folder / "patches" / "TENX1.h5").unlink()
    path = hest_folder / "tissue_seg" / "TENX1_contours.geojson"
    path.write_text(path.read_text().replace("tissue_id", "hole"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adata = hx.io.read_hest(hest_folder, ids=["TENX1"])
    assert any("deprecated HEST contour format" in str(w.message) for w in caught)
    assert "in_tissue_contours" not in adata.obs
