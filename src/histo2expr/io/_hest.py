"""Read HEST-1k samples (the HEST-Library layout) into the histo2expr data model.

A HEST folder, as downloaded from https://huggingface.co/datasets/MahmoodLab/hest, holds per sample
``st/{id}.h5ad`` (counts, spot centres in full-resolution pixels, a downscaled image),
``wsis/{id}.tif`` (the pyramidal H&E), ``metadata/{id}.json`` (pixel size, spot geometry, organ,
technology, patient, ...) and optionally ``patches/{id}.h5`` (224 px patches at 0.5 µm/px) and
``tissue_seg/{id}_contours.geojson`` (tissue outlines). The layout and field names are those of
the HEST-Library (``hest.HESTData.read_HESTData`` and ``iter_hest``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_microns_per_pixel
from ._image import downscale_pixels
from ._slides import check_spots_inside, spatial_entry, spot_table
from ._wsi import slide_thumbnail
from ._wsi_image import open_slide_image

#: Where HEST-1k is downloaded from.
HEST_URL = "https://huggingface.co/datasets/MahmoodLab/hest"
#: Metadata fields copied into ``obs`` (as categoricals) when a sample's json has them.
OBS_FIELDS = (
    "dataset_title",
    "organ",
    "species",
    "st_technology",
    "oncotree_code",
    "disease_state",
    "tissue",
)
#: Metadata fields kept in ``uns["spatial"][id]["metadata"]["hest"]``.
KEPT_FIELDS = (
    *OBS_FIELDS,
    "patient",
    "preservation_method",
    "magnification",
    "pixel_size_um_embedded",
    "pixel_size_um_estimated",
    "spot_diameter",
    "inter_spot_dist",
    "fullres_px_width",
    "fullres_px_height",
    "license",
    "study_link",
    "hest_version_added",
)


def _download_hint(ids: Sequence[str]) -> str:
    patterns = [f"*{i}[_.]**" for i in ids]
    return (
        f"Download the samples from {HEST_URL} (after accepting its terms), e.g. "
        "`huggingface_hub.snapshot_download('MahmoodLab/hest', repo_type='dataset', local_dir=folder, "
        f"allow_patterns={patterns})`."
    )


def _sample_ids(folder: Path, ids: Sequence[str] | None) -> list[str]:
    if not folder.is_dir():
        msg = f"{folder} is not a folder; pass the HEST folder holding st/, wsis/ and metadata/."
        raise FileNotFoundError(msg)
    if ids is None:
        ids = sorted(p.name.removesuffix(".h5ad") for p in (folder / "st").glob("*.h5ad"))
        if not ids:
            msg = f"{folder / 'st'} holds no .h5ad file, so {folder} holds no HEST sample. {_download_hint(['TENX95'])}"
            raise FileNotFoundError(msg)
        return ids
    if isinstance(ids, str):
        ids = [ids]
    ids = [str(i) for i in ids]
    if not ids or len(set(ids)) != len(ids):
        msg = f"`ids` must be a non-empty list of distinct sample ids (e.g. ['TENX95', 'TENX99']), got {ids}."
        raise ValueError(msg)
    return ids


def _sample_files(folder: Path, sample: str) -> dict[str, Path]:
    files = {
        "st": folder / "st" / f"{sample}.h5ad",
        "wsi": folder / "wsis" / f"{sample}.tif",
        "metadata": folder / "metadata" / f"{sample}.json",
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        msg = f"HEST sample {sample!r} is incomplete: {missing} missing. {_download_hint([sample])}"
        raise FileNotFoundError(msg)
    return files


def _metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{path} is not valid JSON ({error}); download it again from {HEST_URL}."
        raise ValueError(msg) from error
    if not isinstance(meta, dict):
        msg = f"{path} holds a {type(meta).__name__}, not the JSON object of a HEST sample's metadata."
        raise ValueError(msg)
    return meta


def _present(meta: dict[str, Any], key: str) -> Any:
    """``meta[key]``, or None when absent, null, NaN or empty."""
    value = meta.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    return value


def _pixel_size(meta: dict[str, Any], path: Path) -> tuple[float, str]:
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        value = _present(meta, key)
        if value is not None:
            mpp = check_microns_per_pixel(
                value,
                where=f"{path} field {key!r}",
                fix=f"Correct it in {path} (micrometres per full-resolution pixel), or download the file again.",
            )
            return mpp, f"HEST metadata {key}"
    msg = (
        f"{path} has no pixel size (neither 'pixel_size_um_estimated' nor 'pixel_size_um_embedded'); "
        f"add it in micrometres per full-resolution pixel, or download the file again from {HEST_URL}."
    )
    raise KeyError(msg)


def _spot_diameter_px(meta: dict[str, Any], adata: AnnData, mpp: float, path: Path, sample: str) -> float:
    """Spot diameter in full-resolution pixels: metadata ``spot_diameter`` (µm), else the h5ad's scale factors."""
    value = _present(meta, "spot_diameter")
    if value is not None:
        diameter = float(value)
        if not np.isfinite(diameter) or diameter <= 0:
            msg = f"{path} field 'spot_diameter' is {value!r}; it must be the spot diameter in µm (55 for Visium)."
            raise ValueError(msg)
        return diameter / mpp
    factors = adata.uns.get("spatial", {}).get("ST", {}).get("scalefactors", {})
    if factors.get("spot_diameter_fullres"):
        return float(factors["spot_diameter_fullres"])
    msg = (
        f"HEST sample {sample!r} records no spot size ('spot_diameter' in {path}, or "
        "uns['spatial']['ST']['scalefactors']['spot_diameter_fullres'] in its h5ad); add 'spot_diameter' "
        "(µm) to the json."
    )
    raise KeyError(msg)


def _hires(adata: AnnData, image: Any, max_px: int) -> tuple[np.ndarray, float]:
    """The h5ad's downscaled image (when it has one) or a thumbnail of the WSI, long side at most ``max_px``."""
    entry = adata.uns.get("spatial", {}).get("ST", {})
    stored = entry.get("images", {}).get("downscaled_fullres")
    scale = entry.get("scalefactors", {}).get("tissue_downscaled_fullres_scalef")
    if stored is not None and scale:
        from ._image import to_rgb_uint8

        pixels, shrink = downscale_pixels(
            to_rgb_uint8(np.asarray(stored), source="HEST downscaled_fullres"), max_px=max_px
        )
        return pixels, float(scale) * shrink
    return slide_thumbnail(image, max_px=max_px)


def _patient(meta: dict[str, Any], sample: str) -> str:
    """The patient, qualified by the data set (HEST groups folds by dataset_title and patient).

    Samples without a patient are one patient per data set, as in HEST-Benchmark's splits.
    """
    dataset = _present(meta, "dataset_title")
    patient = _present(meta, "patient")
    if dataset is None:
        return str(patient) if patient is not None else sample
    return f"{dataset} | {patient if patient is not None else 'patient unknown'}"


def _tissue_contours(path: Path, coords: np.ndarray) -> np.ndarray | None:
    """Whether each spot centre lies in the tissue outlines of a HEST ``_contours.geojson``."""
    import geopandas as gpd
    import shapely

    if "hole" in path.read_text():
        warnings.warn(
            f"{path} is in the deprecated HEST contour format; it is not used. Download the current "
            f"tissue_seg/ folder from {HEST_URL}.",
            UserWarning,
            stacklevel=4,
        )
        return None
    outlines = gpd.read_file(path)
    if outlines.empty:
        return np.zeros(len(coords), dtype=bool)
    tissue = shapely.union_all(outlines.geometry.to_numpy())
    return shapely.contains_xy(tissue, coords[:, 0], coords[:, 1])


def _check_patches(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as handle:
        missing = [name for name in ("img", "barcode", "coords") if name not in handle]
        if missing:
            msg = f"{path} lacks the datasets {missing} of a HEST patch file (img, barcode, coords)."
            raise ValueError(msg)
        return int(handle["barcode"].shape[0])


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _read_sample(folder: Path, sample: str, *, hires_max_px: int) -> AnnData:
    import anndata as ad

    files = _sample_files(folder, sample)
    meta = _metadata(files["metadata"])
    mpp, mpp_source = _pixel_size(meta, files["metadata"])
    adata = ad.read_h5ad(files["st"])
    if "spatial" not in adata.obsm:
        msg = f"{files['st']} has no obsm['spatial'] (spot centres in full-resolution pixels); download it again."
        raise KeyError(msg)
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.isfinite(coords).all():
        msg = f"obsm['spatial'] of {files['st']} must be finite (x, y) pixel positions, one row per spot."
        raise ValueError(msg)
    image = open_slide_image(files["wsi"])
    height, width = image.shape
    declared = (_present(meta, "fullres_px_width"), _present(meta, "fullres_px_height"))
    if None not in declared and (int(declared[0]), int(declared[1])) != (width, height):
        msg = (
            f"{files['wsi']} is {width} x {height} px but {files['metadata']} records {int(declared[0])} x "
            f"{int(declared[1])} px (fullres_px_width x fullres_px_height): the image is not this sample's "
            "full-resolution H&E. Download wsis/ and metadata/ of the same HEST version again."
        )
        raise ValueError(msg)
    check_spots_inside(coords, adata.obs_names, slide=sample, size=(height, width), image=files["wsi"])
    diameter_px = _spot_diameter_px(meta, adata, mpp, files["metadata"], sample)
    spacing = _present(meta, "inter_spot_dist")
    hires, hires_scalef = _hires(adata, image, hires_max_px)
    entry = spatial_entry(
        hires,
        hires_scalef=hires_scalef,
        microns_per_pixel=mpp,
        microns_per_pixel_source=mpp_source,
        spot_diameter_fullres=diameter_px,
        spot_spacing_fullres=None if spacing is None else float(spacing) / mpp,
        source_image_path=files["wsi"],
        source_image_level=0,
    )
    entry["metadata"]["hest"] = {k: _plain(meta[k]) for k in KEPT_FIELDS if _present(meta, k) is not None}

    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    for field in OBS_FIELDS:
        value = _present(meta, field)
        obs[field] = "unknown" if value is None else str(value)
    for column in ("in_tissue", "array_row", "array_col"):
        if column in adata.obs:
            obs[column] = adata.obs[column].to_numpy()
    contours = folder / "tissue_seg" / f"{sample}_contours.geojson"
    if contours.is_file():
        inside = _tissue_contours(contours, coords)
        if inside is not None:
            obs["in_tissue_contours"] = inside
            entry["metadata"]["tissue_contours_path"] = str(contours.resolve())
    patches = folder / "patches" / f"{sample}.h5"
    if patches.is_file():
        entry["metadata"]["hest_patches_path"] = str(patches.resolve())
        entry["metadata"]["hest_patches"] = _check_patches(patches)
    return spot_table(
        adata.X,
        var=pd.DataFrame(index=adata.var_names.astype(str)),
        obs=obs,
        slide=sample,
        patient=_patient(meta, sample),
        coords=coords,
        entry=entry,
        source=files["st"],
    )


def read_hest(
    folder: str | Path, ids: str | Sequence[str] | None = None, *, hires_max_px: int = 2000
) -> AnnData:
    """Read HEST-1k samples into one AnnData of the histo2expr data model.

    The H&E is read lazily from the pyramidal ``wsis/{id}.tif`` (region by region, never whole);
    the stored ``"hires"`` image is the h5ad's downscaled image. Get HEST-1k (or a subset) from
    https://huggingface.co/datasets/MahmoodLab/hest with ``huggingface_hub.snapshot_download``
    (see the docs' data page).

    Parameters
    ----------
    folder
        The HEST folder, with ``st/{id}.h5ad``, ``wsis/{id}.tif`` and ``metadata/{id}.json`` per
        sample, and optionally ``patches/{id}.h5`` and ``tissue_seg/{id}_contours.geojson``.
    ids
        Sample ids (e.g. ``["TENX95", "TENX99"]``); default: every ``st/*.h5ad``.
    hires_max_px
        Largest side of the stored ``"hires"`` image of each sample.

    Returns
    -------
    AnnData with one row per spot (``obs_names`` ``"{id}_{barcode}"``), the genes shared by all
    samples (inner join), and

    ``X``
        Raw counts, float32 CSR.
    ``obs['slide']``
        The sample id.
    ``obs['patient']``
        ``"{dataset_title} | {patient}"`` from the metadata; samples without a patient count as one
        patient per data set (``"... | patient unknown"``), as HEST-Benchmark's splits do.
    ``obs['dataset_title']``, ``obs['organ']``, ``obs['species']``, ``obs['st_technology']``, ``obs['oncotree_code']``, ``obs['disease_state']``, ``obs['tissue']``
        From the metadata (``"unknown"`` when absent), categorical.
    ``obs['in_tissue']``, ``obs['array_row']``, ``obs['array_col']``
        From the h5ad, when present.
    ``obs['in_tissue_contours']``
        Whether the spot centre lies in the HEST tissue segmentation, when ``tissue_seg/`` has it.
    ``obsm['spatial']``
        Spot centres (x, y) in full-resolution pixels of the WSI.
    ``uns['spatial'][id]``
        ``images['hires']``; ``scalefactors`` (``microns_per_pixel`` from ``pixel_size_um_estimated``,
        ``spot_diameter_fullres`` from ``spot_diameter``, ``spot_spacing_fullres`` from
        ``inter_spot_dist``, ``tissue_hires_scalef``); ``metadata`` (``source_image_path``,
        ``hest`` with the sample's metadata fields, ``hest_patches_path`` and
        ``tissue_contours_path`` when present).

    Examples
    --------
    >>> adata = hx.io.read_hest("hest_data", ids=["TENX95", "TENX99"])  # doctest: +SKIP
    """
    import anndata as ad

    folder = Path(folder)
    samples = [_read_sample(folder, sample, hires_max_px=hires_max_px) for sample in _sample_ids(folder, ids)]
    if any(
        "in_tissue_contours" in s.obs for s in samples
    ):  # missing (not False) for samples without outlines
        for sample in samples:
            sample.obs["in_tissue_contours"] = sample.obs.get(
                "in_tissue_contours", pd.Series(pd.NA, index=sample.obs_names)
            ).astype("boolean")
    if len(samples) == 1:
        adata = samples[0]
    else:
        shared = set.intersection(*(set(s.var_names) for s in samples))
        if not shared:
            msg = f"The samples {[s.obs['slide'].iloc[0] for s in samples]} share no gene; read them separately."
            raise ValueError(msg)
        adata = ad.concat(samples, join="inner", merge="same", uns_merge="unique")
    for column in ("slide", "patient", *OBS_FIELDS):
        adata.obs[column] = adata.obs[column].astype("category")
    return adata
