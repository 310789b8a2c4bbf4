"""Read 10x Genomics Visium (Space Ranger output) into the histo2expr data model."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from histo2expr._validation import MPP_FIX, check_counts, check_slide_id, check_spot_spacing, plausible_mpp
from histo2expr.io._image import read_image_size, to_rgb_uint8
from histo2expr.io._slides import check_spots_inside, downscale_pixels, spatial_entry

logger = logging.getLogger(__name__)

#: Visium spots are 55 µm wide, 100 µm centre to centre.
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0

_SOURCE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


def _check_files(path: Path, counts_file: str) -> Path:
    """Raise naming the first missing Space Ranger file; return the tissue positions file."""
    if not path.is_dir():
        msg = f"{path} is not a folder; pass the Space Ranger output folder (`outs`) of one Visium library."
        raise FileNotFoundError(msg)
    spatial = path / "spatial"
    positions = next(
        (
            spatial / n
            for n in ("tissue_positions.csv", "tissue_positions_list.csv")
            if (spatial / n).is_file()
        ),
        None,
    )
    required = [path / counts_file, spatial / "scalefactors_json.json"]
    required += [spatial / "tissue_hires_image.png", spatial / "tissue_lowres_image.png"]
    missing = [str(p) for p in required if not p.is_file()]
    if positions is None:
        missing.append(str(spatial / "tissue_positions.csv (or tissue_positions_list.csv)"))
    if missing:
        msg = (
            f"{path} is not a complete Space Ranger output folder: {missing} missing. Expected "
            f"{counts_file} (a 10x HDF5 count matrix; set `counts_file=` for another name) and spatial/ with "
            "scalefactors_json.json, tissue_positions(.csv or _list.csv), tissue_hires_image.png and "
            "tissue_lowres_image.png."
        )
        raise FileNotFoundError(msg)
    return positions


def _library_id(counts: Path) -> str:
    with h5py.File(counts, "r") as handle:
        ids = handle.attrs.get("library_ids")
    if ids is None or len(ids) == 0:
        msg = f"{counts} records no library id (HDF5 attribute 'library_ids'); pass `library_id=`."
        raise KeyError(msg)
    first = ids[0]
    return first.decode() if isinstance(first, bytes) else str(first)


def _size_matches(size: tuple[int, int], expected: np.ndarray, scalef: float) -> bool:
    tolerance = np.maximum(1.0 / scalef + 1.0, 0.01 * expected)
    return bool((np.abs(np.asarray(size) - expected) <= tolerance).all())


def _source_image(path: Path, given: str | Path | None, expected: np.ndarray, scalef: float) -> Path | None:
    """The full-resolution image: ``given`` (checked), else the one image file in ``path`` that fits."""
    shape = f"{expected[1]:.0f} x {expected[0]:.0f} px (width x height)"
    if given is not None:
        given = Path(given)
        if not given.is_file():
            msg = f"`source_image_path` {given} does not exist; pass the full-resolution H&E of this library."
            raise FileNotFoundError(msg)
        height, width = read_image_size(given)
        if not _size_matches((height, width), expected, scalef):
            msg = (
                f"`source_image_path` {given} is {width} x {height} px, but the Space Ranger scale factors "
                f"imply a full-resolution image of about {shape}. Pass the image Space Ranger was run on."
            )
            raise ValueError(msg)
        return given
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SOURCE_SUFFIXES)
    if len(found) > 1:
        warnings.warn(
            f"Several images in {path} ({[p.name for p in found]}) could be the full-resolution image; none is "
            "used. Pass `source_image_path=`.",
            UserWarning,
            stacklevel=3,
        )
        return None
    if found:
        height, width = read_image_size(found[0])
        if _size_matches((height, width), expected, scalef):
            logger.info("Using %s as the full-resolution image.", found[0])
            return found[0]
        warnings.warn(
            f"{found[0]} is {width} x {height} px, not the {shape} of the full-resolution image; it is not used.",
            UserWarning,
            stacklevel=3,
        )
    return None


def read_visium(
    path: str | Path,
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    library_id: str | None = None,
    source_image_path: str | Path | None = None,
    patient: str | None = None,
    microns_per_pixel: float | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read one Visium library from its Space Ranger output folder.

    The counts, spot positions, images and scale factors are read with
    :func:`squidpy.read.visium`, then put into the histo2expr data model. Visium spots are
    55 µm wide, so the pixel size is ``55 / spot_diameter_fullres`` unless given.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder: ``counts_file`` and ``spatial/`` (``scalefactors_json.json``,
        ``tissue_positions.csv`` or ``tissue_positions_list.csv``, ``tissue_hires_image.png``,
        ``tissue_lowres_image.png``).
    counts_file
        10x HDF5 count matrix in ``path``.
    library_id
        Slide id; default: the library id recorded in ``counts_file``.
    source_image_path
        Full-resolution H&E image Space Ranger was run on. Default: the one image file
        (``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``, ``.png``) directly in ``path`` whose size fits
        the scale factors, if any; else none (patches are then cut from the hires image).
    patient
        Patient id; default: the library id.
    microns_per_pixel
        Pixel size of the full-resolution image, instead of the estimate from the spot diameter.
    hires_max_px
        Largest side of the stored ``"hires"`` image (downscaled further when larger).

    Returns
    -------
    AnnData with one row per spot (``obs_names`` ``"{library_id}_{barcode}"``). Sets the following fields:

    ``X``
        Raw counts, float32 CSR.
    ``obs['slide']``, ``obs['patient']``
        Library and patient ids (categorical).
    ``obs['in_tissue']``, ``obs['array_row']``, ``obs['array_col']``
        From the tissue positions file.
    ``obsm['spatial']``
        Spot centres (x, y) in full-resolution image pixels.
    ``uns['spatial'][library_id]``
        ``images`` (``'hires'``, ``'lowres'``), ``scalefactors`` (Space Ranger's plus
        ``microns_per_pixel`` and ``spot_spacing_fullres``) and ``metadata``
        (``source_image_path`` when known, ``microns_per_pixel_source``: ``"estimated from spot
        diameter"`` or ``"argument"``).
    """
    path = Path(path)
    positions = _check_files(path, counts_file)
    if microns_per_pixel is not None:
        plausible_mpp(microns_per_pixel, "`microns_per_pixel`", fix=MPP_FIX)
    library_id = check_slide_id(library_id if library_id is not None else _library_id(path / counts_file))
    from squidpy.read import visium

    adata = visium(path, counts_file=counts_file, library_id=library_id)
    entry = adata.uns["spatial"][library_id]
    scalefactors = dict(entry["scalefactors"])
    missing = [k for k in ("spot_diameter_fullres", "tissue_hires_scalef") if k not in scalefactors]
    if missing:
        msg = f"{path / 'spatial' / 'scalefactors_json.json'} lacks {missing}; it is not a Space Ranger scale factor file."
        raise KeyError(msg)
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    unplaced = np.isnan(coords).any(axis=1)
    if unplaced.any():
        msg = (
            f"{int(unplaced.sum())} barcodes of {counts_file} (e.g. {adata.obs_names[unplaced][0]}) are not in "
            f"{positions}; the count matrix and the spatial folder must come from the same Space Ranger run."
        )
        raise ValueError(msg)

    hires_file = path / "spatial" / "tissue_hires_image.png"
    hires = to_rgb_uint8(entry["images"]["hires"], source=hires_file)
    lowres = to_rgb_uint8(entry["images"]["lowres"], source=path / "spatial" / "tissue_lowres_image.png")
    hires_scalef = float(scalefactors["tissue_hires_scalef"])
    expected = np.asarray(hires.shape[:2], dtype=float) / hires_scalef
    source = _source_image(path, source_image_path, expected, hires_scalef)
    size = read_image_size(source) if source is not None else tuple(np.floor(expected).astype(int))
    in_tissue = (
        adata.obs["in_tissue"].to_numpy() == 1 if "in_tissue" in adata.obs else np.ones(len(coords), bool)
    )
    check_spots_inside(
        coords[in_tissue], adata.obs_names[in_tissue], slide=library_id, size=size, image=source or hires_file
    )

    spacing = SPOT_PITCH_UM / SPOT_DIAMETER_UM * float(scalefactors["spot_diameter_fullres"])
    check_spot_spacing(coords[in_tissue], spacing, slide=library_id, where=str(positions))
    hires, shrink = downscale_pixels(hires, max_px=hires_max_px)
    diameter = float(scalefactors["spot_diameter_fullres"])
    estimate = SPOT_DIAMETER_UM / diameter
    if microns_per_pixel is None:
        mpp, mpp_source = estimate, "estimated from spot diameter"
        plausible_mpp(
            mpp,
            f"The pixel size implied by spot_diameter_fullres = {diameter} px",
            fix=f"Check {path / 'spatial' / 'scalefactors_json.json'}, or pass `microns_per_pixel=`.",
        )
    else:
        mpp, mpp_source = float(microns_per_pixel), "argument"
        if abs(estimate / mpp - 1) > 0.1:
            warnings.warn(
                f"`microns_per_pixel={mpp}` differs by more than 10 % from {estimate:.4g}, the value implied by "
                f"the spot diameter of {diameter:.4g} px in the Space Ranger scale factors.",
                UserWarning,
                stacklevel=2,
            )
    new_entry = spatial_entry(
        hires,
        hires_scalef=hires_scalef * shrink,
        microns_per_pixel=mpp,
        microns_per_pixel_source=mpp_source,
        spot_diameter_fullres=float(scalefactors["spot_diameter_fullres"]),
        spot_spacing_fullres=spacing,
        source_image_path=source,
    )
    new_entry["images"]["lowres"] = lowres
    new_entry["scalefactors"] = scalefactors | new_entry["scalefactors"]
    new_entry["metadata"] = dict(entry.get("metadata", {})) | new_entry["metadata"]

    counts = sparse.csr_matrix(adata.X, dtype=np.float32)
    check_counts(counts, where=f"Count matrix {path / counts_file}")
    obs = adata.obs.copy()
    obs.index = library_id + "_" + obs.index.astype(str)
    obs.insert(0, "slide", pd.Categorical([library_id] * len(obs)))
    obs.insert(1, "patient", pd.Categorical([str(patient if patient is not None else library_id)] * len(obs)))
    out = AnnData(X=counts, obs=obs, var=adata.var.copy())
    if out.var_names.has_duplicates:
        duplicated = list(out.var_names[out.var_names.duplicated()].unique()[:5])
        warnings.warn(
            f"{counts_file} has duplicated gene names (e.g. {duplicated}); they are made unique with "
            "`AnnData.var_names_make_unique`.",
            UserWarning,
            stacklevel=2,
        )
        out.var_names_make_unique()
    out.obsm["spatial"] = coords
    out.uns["spatial"] = {library_id: new_entry}
    return out
