"""Read 10x Genomics Visium HD (Space Ranger 3+ output) into the histo2expr data model: one bin size, bins as spots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_microns_per_pixel
from ._image import downscale_pixels, read_image_size, to_rgb_uint8
from ._slides import check_spots_inside, spatial_entry, spot_table
from ._visium import _size_matches

#: Folder of the binned outputs of Space Ranger for Visium HD.
BINNED_OUTPUTS = "binned_outputs"
_SOURCE_SUFFIXES = (".tif", ".tiff", ".btf", ".jpg", ".jpeg", ".png")


def _bin_folder(path: Path, bin_size: int) -> Path:
    name = f"square_{bin_size:03d}um"
    folder = path / BINNED_OUTPUTS / name
    if folder.is_dir():
        return folder
    available = sorted(p.name for p in (path / BINNED_OUTPUTS).glob("square_*um")) if path.is_dir() else []
    msg = f"{path} has no {BINNED_OUTPUTS}/{name}/ (bins of {bin_size} µm); " + (
        f"it has {available}: pass `bin_size=` with one of them."
        if available
        else "pass the Visium HD `outs` folder."
    )
    raise FileNotFoundError(msg)


def _bin_scalefactors(folder: Path, bin_size: int) -> dict[str, Any]:
    path = folder / "spatial" / "scalefactors_json.json"
    if not path.is_file():
        msg = f"{path} is missing; the {folder.name} bins of a Visium HD run need their scale factors."
        raise FileNotFoundError(msg)
    factors = json.loads(path.read_text())
    missing = [k for k in ("microns_per_pixel", "bin_size_um", "tissue_hires_scalef") if k not in factors]
    if missing:
        msg = f"{path} lacks {missing}; it is not the scale factor file of Visium HD bins."
        raise KeyError(msg)
    if float(factors["bin_size_um"]) != float(bin_size):
        msg = f"{path} is for {factors['bin_size_um']} µm bins, not {bin_size} µm; the folder is mislabelled."
        raise ValueError(msg)
    return factors


def _microscope_image(
    path: Path, given: str | Path | None, expected: np.ndarray, scalef: float
) -> Path | None:
    """The full-resolution microscope image: ``given``, else the one file of ``microscope_image/`` or ``*tissue_image.*``."""
    shape = f"{expected[1]:.0f} x {expected[0]:.0f} px (width x height)"
    if given is not None:
        candidates, told = [Path(given)], True
        if not candidates[0].is_file():
            msg = f"`source_image_path` {given} does not exist; pass the microscope H&E of this run."
            raise FileNotFoundError(msg)
    else:
        folder = path / "microscope_image"
        candidates = sorted(folder.iterdir()) if folder.is_dir() else sorted(path.glob("*tissue_image.*"))
        candidates, told = [p for p in candidates if p.suffix.lower() in _SOURCE_SUFFIXES], False
    if len(candidates) != 1:
        if candidates:
            warnings.warn(
                f"Several images ({[p.name for p in candidates]}) could be the microscope image of {path}; none is "
                "used. Pass `source_image_path=`.",
                UserWarning,
                stacklevel=3,
            )
        return None
    height, width = read_image_size(candidates[0])
    if _size_matches((height, width), expected, scalef):
        return candidates[0]
    msg = f"{candidates[0]} is {width} x {height} px, but the scale factors imply a microscope image of about {shape}."
    if told:
        raise ValueError(f"`source_image_path` {msg} Pass the image Space Ranger was run on.")
    warnings.warn(f"{msg} It is not used.", UserWarning, stacklevel=3)
    return None


def read_visium_hd(
    path: str | Path,
    *,
    bin_size: int = 16,
    source_image_path: str | Path | None = None,
    slide: str | None = None,
    patient: str | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read one Visium HD run at one bin size, each bin a spot, with the microscope H&E at full resolution.

    The bins are read with spatialdata-io's ``visium_hd`` reader (``pip install "histo2expr[io]"``); their
    pixel size is Space Ranger's ``microns_per_pixel`` of the microscope image, and a bin is a spot
    of diameter (side) ``bin_size`` µm. 8 µm bins are cell-sized; 16 µm bins average a few cells
    and are the closer analogue of a Visium spot for patch-level models.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder: ``binned_outputs/square_{bin_size:03d}um/`` (counts
        ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet``,
        ``spatial/scalefactors_json.json``, hires and lowres images) and the ``feature_slice.h5``.
    bin_size
        Bin side in µm: 2, 8 or 16 (those Space Ranger wrote).
    source_image_path
        The microscope H&E Space Ranger was run on. Default: the one image in ``microscope_image/``
        or the ``*tissue_image.*`` file of ``path`` when its size fits the scale factors; else none,
        and patches are cut from the hires image (with a warning). The CytAssist image is not used:
        it is registered to the microscope image by a projective transformation, not a scale.
    slide
        Slide id; default the folder name of the run (the folder holding ``outs``).
    patient
        Patient id; default the slide id.
    hires_max_px
        Largest side of the stored ``"hires"`` image.

    Returns
    -------
    AnnData with one row per bin under tissue of the filtered matrix (``obs_names``
    ``"{slide}_{barcode}"``):

    ``X``
        Raw counts, float32 CSR.
    ``obs['slide']``, ``obs['patient']``, ``obs['in_tissue']``, ``obs['array_row']``, ``obs['array_col']``
        Ids and the bin's position on the bin grid.
    ``obsm['spatial']``
        Bin centres (x, y) in pixels of the microscope image.
    ``uns['spatial'][slide]``
        ``images['hires']``, ``scalefactors`` (Space Ranger's, with ``microns_per_pixel``,
        ``spot_diameter_fullres`` and ``spot_spacing_fullres`` = the bin side in pixels),
        ``metadata`` (``source_image_path``, ``bin_size_um``).
    """
    try:
        from spatialdata_io import visium_hd
    except ImportError as error:
        msg = f'read_visium_hd reads the bins with spatialdata-io, which is not installed: `pip install "histo2expr[io]"` ({error}).'
        raise ImportError(msg) from error
    path = Path(path)
    if not isinstance(bin_size, int) or isinstance(bin_size, bool) or bin_size <= 0:
        msg = f"`bin_size` must be a bin side in whole micrometres (2, 8 or 16), got {bin_size!r}."
        raise ValueError(msg)
    folder = _bin_folder(path, bin_size)
    factors = _bin_scalefactors(folder, bin_size)
    mpp = check_microns_per_pixel(
        factors["microns_per_pixel"],
        where=f"{folder / 'spatial' / 'scalefactors_json.json'} field 'microns_per_pixel'",
        fix="Check that the file comes from Space Ranger for Visium HD.",
    )
    slide = str(slide) if slide is not None else (path.parent.name if path.name == "outs" else path.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spatialdata-io's notes on images it does not find
        sdata = visium_hd(
            path,
            bin_size=bin_size,
            load_segmentations_only=False,
            fullres_image_file=source_image_path,
            load_all_images=False,
        )
    table = sdata.tables[folder.name]
    coords = np.asarray(table.obsm["spatial"], dtype=np.float64)
    hires_file = folder / "spatial" / "tissue_hires_image.png"
    hires_name = next(name for name in sdata.images if name.endswith("_hires_image"))
    hires = to_rgb_uint8(np.moveaxis(np.asarray(sdata.images[hires_name].data), 0, -1), source=hires_file)
    hires_scalef = float(factors["tissue_hires_scalef"])
    expected = np.asarray(hires.shape[:2], dtype=float) / hires_scalef
    source = _microscope_image(path, source_image_path, expected, hires_scalef)
    size = read_image_size(source) if source is not None else tuple(np.floor(expected).astype(int))
    check_spots_inside(coords, table.obs_names, slide=slide, size=size, image=source or hires_file)
    hires, shrink = downscale_pixels(hires, max_px=hires_max_px)
    side_px = bin_size / mpp
    entry = spatial_entry(
        hires,
        hires_scalef=hires_scalef * shrink,
        microns_per_pixel=mpp,
        microns_per_pixel_source="Space Ranger microns_per_pixel",
        spot_diameter_fullres=side_px,
        spot_spacing_fullres=side_px,
        source_image_path=source,
    )
    entry["scalefactors"] = factors | entry["scalefactors"]
    entry["metadata"]["bin_size_um"] = int(bin_size)
    obs = pd.DataFrame(
        {c: table.obs[c].to_numpy() for c in ("in_tissue", "array_row", "array_col") if c in table.obs},
        index=table.obs_names.astype(str),
    )
    return spot_table(
        table.X,
        var=pd.DataFrame(index=table.var_names.astype(str)),
        obs=obs,
        slide=slide,
        patient=str(patient if patient is not None else slide),
        coords=coords,
        entry=entry,
        source=folder / "filtered_feature_bc_matrix.h5",
    )
