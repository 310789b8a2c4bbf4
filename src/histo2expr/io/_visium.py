"""Read 10x Genomics Visium (Space Ranger output) into the histo2expr data model."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import cast

import numpy as np
from anndata import AnnData

from histo2expr._validation import MPP_FIX, check_microns_per_pixel, check_slide_id, check_spot_spacing
from histo2expr.io._image import downscale_pixels, read_image_size, to_rgb_uint8
from histo2expr.io._slides import check_spots_inside, spatial_entry, spot_table
from histo2expr.io._spaceranger import counts_present, library_id_of, positions_file, read_space_ranger

logger = logging.getLogger(__name__)

#: Count matrices looked for by default: the 10x HDF5 file, then the Matrix Market folder.
_COUNTS = ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")
#: The CytAssist image, the full-resolution image of runs without a microscope image.
_CYTASSIST_IMAGE = Path("spatial") / "cytassist_image.tiff"

#: Visium spots are 55 µm wide, 100 µm centre to centre.
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0

_SOURCE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")


def _check_files(path: Path, counts_file: str | None) -> tuple[Path, Path]:
    """Raise naming the missing Space Ranger files; return the counts (file or folder) and the positions file."""
    if not path.is_dir():
        msg = f"{path} is not a folder; pass the Space Ranger output folder (`outs`) of one Visium library."
        raise FileNotFoundError(msg)
    spatial = path / "spatial"
    positions = positions_file(spatial)
    if counts_file is None:  # the HDF5 file, else the Matrix Market folder
        counts_file = next((n for n in _COUNTS if counts_present(path / n)), _COUNTS[0])
    required = [spatial / "scalefactors_json.json"]
    required += [spatial / "tissue_hires_image.png", spatial / "tissue_lowres_image.png"]
    missing = [str(p) for p in required if not p.is_file()]
    if not counts_present(path / counts_file):
        missing.insert(0, str(path / counts_file))
    if positions is None:
        missing.append(str(spatial / "tissue_positions.csv (or tissue_positions_list.csv)"))
    if missing:
        msg = (
            f"{path} is not a complete Space Ranger output folder: {missing} missing. Expected the counts "
            f"({' or '.join(_COUNTS)}/ with matrix.mtx.gz; set `counts_file=` for another name) and spatial/ "
            "with scalefactors_json.json, tissue_positions.csv (Space Ranger 2+) or tissue_positions_list.csv "
            "(Space Ranger 1), tissue_hires_image.png and tissue_lowres_image.png."
        )
        raise FileNotFoundError(msg)
    return path / counts_file, cast("Path", positions)  # None is refused above


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
    if not found and (path / _CYTASSIST_IMAGE).is_file():  # a CytAssist run without a microscope image
        found = [path / _CYTASSIST_IMAGE]
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
    counts_file: str | None = None,
    library_id: str | None = None,
    source_image_path: str | Path | None = None,
    patient: str | None = None,
    microns_per_pixel: float | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read one Visium library from its Space Ranger output folder.

    Every layout Space Ranger writes is read: counts as ``filtered_feature_bc_matrix.h5`` or as the
    ``filtered_feature_bc_matrix/`` Matrix Market folder (read with scanpy), spot positions as
    ``tissue_positions_list.csv`` (Space Ranger 1, no header) or ``tissue_positions.csv`` (Space
    Ranger 2 and later, with a header). Visium spots are 55 µm wide, so the pixel size is
    ``55 / spot_diameter_fullres`` unless given.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder: the counts and ``spatial/`` (``scalefactors_json.json``,
        ``tissue_positions.csv`` or ``tissue_positions_list.csv``, ``tissue_hires_image.png``,
        ``tissue_lowres_image.png``).
    counts_file
        Counts in ``path``: a 10x HDF5 file or a Matrix Market folder. Default:
        ``filtered_feature_bc_matrix.h5``, else ``filtered_feature_bc_matrix/``.
    library_id
        Slide id; default: the library id recorded in the HDF5 counts, else the name of the
        Space Ranger folder (the folder holding ``outs``).
    source_image_path
        Full-resolution H&E image Space Ranger was run on. Default: the one image file
        (``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``, ``.png``) directly in ``path`` whose size fits
        the scale factors, else, for a CytAssist run without a microscope image,
        ``spatial/cytassist_image.tiff`` when its size fits; else none (patches are then cut from
        the hires image).
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
    counts, positions = _check_files(path, counts_file)
    if microns_per_pixel is not None:
        check_microns_per_pixel(microns_per_pixel, where="`microns_per_pixel`", fix=MPP_FIX)
    if library_id is None:
        library_id = library_id_of(counts) or (path.parent.name if path.name == "outs" else path.name)
    library_id = check_slide_id(library_id)
    adata = read_space_ranger(path, counts, positions, library_id=library_id)
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
            f"{int(unplaced.sum())} barcodes of {counts.name} (e.g. {adata.obs_names[unplaced][0]}) are not in "
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
        check_microns_per_pixel(
            mpp,
            where=f"the scale factors (estimated from spot_diameter_fullres = {diameter:g} px)",
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

    return spot_table(
        adata.X,
        var=adata.var,
        obs=adata.obs,
        slide=library_id,
        patient=str(patient if patient is not None else library_id),
        coords=coords,
        entry=new_entry,
        source=counts,
    )
