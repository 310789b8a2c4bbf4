"""H&E-only whole-slide images into the histo2expr data model: a slide with its image and scale, no spots yet.

The physical pixel size comes from the file (OpenSlide ``openslide.mpp-x``, OME ``PhysicalSizeX``,
TIFF resolution tags with a unit, JPEG / PNG resolution) or from the ``mpp`` argument; the
downscaled ``hires`` image is made from a low-resolution pyramid level, strip by strip, so the
full-resolution pixels are never held in memory. :func:`histo2expr.pp.tile_slide` then places
pseudo-spots on the tissue.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._validation import PLAUSIBLE_MPP, check_microns_per_pixel, check_slide_id
from ._image import ArrayImage, LazyImage, downscale_pixels, no_pixel_limit
from ._slides import downscale_image, spatial_entry
from ._wsi_image import (
    OPENSLIDE_SUFFIXES,
    PLAIN_SUFFIXES,
    TIFF_SUFFIXES,
    PyramidImage,
    import_openslide,
    open_slide_image,
    suffix_of,
)

#: Relative difference tolerated between the file's pixel size and the ``mpp`` argument, or x and y.
_MPP_TOLERANCE = 0.02
#: Bytes of full-resolution pixels read at a time while the hires image is made.
_STRIP_BYTES = 64 * 2**20
#: Micrometres per unit of OME ``PhysicalSizeXUnit``.
_OME_UNITS = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    root = ET.fromstring(xml)
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    values = []
    for axis in ("X", "Y"):
        size = float(pixels.attrib.get(f"PhysicalSize{axis}", pixels.attrib["PhysicalSizeX"]))
        unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in _OME_UNITS:
            return None
        values.append(size * _OME_UNITS[unit])
    return values[0], values[1]


def _tiff_mpp(path: Path) -> tuple[tuple[float, float] | None, str]:
    """Pixel size (x, y) in µm of a TIFF's full-resolution level, and where it was looked for."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            found = _ome_mpp(tif.ome_metadata)
            if found is not None:
                return found, "OME PhysicalSizeX"
        page = tif.series[0].levels[0].keyframe
        tags = page.tags
        if "XResolution" not in tags or "ResolutionUnit" not in tags:
            return None, "OME PhysicalSizeX, TIFF XResolution / ResolutionUnit"
        unit = int(tags["ResolutionUnit"].value)
        per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # µm per inch, per centimetre
        if per_unit is None:
            return None, "TIFF ResolutionUnit (it is 'none')"
        values = []
        for name in ("XResolution", "YResolution"):
            numerator, denominator = tags[name if name in tags else "XResolution"].value
            if not numerator or not denominator:
                return None, "TIFF XResolution (it is 0)"
            values.append(per_unit * denominator / numerator)
    return (values[0], values[1]), "TIFF XResolution / ResolutionUnit"


def _file_mpp(path: Path) -> tuple[tuple[float, float] | None, str]:
    """Pixel size (x, y) in µm at full resolution from the file's metadata, and the fields read."""
    suffix = suffix_of(path)
    if suffix in OPENSLIDE_SUFFIXES:
        openslide = import_openslide(path)
        with openslide.OpenSlide(str(path)) as slide:
            props = slide.properties
            if openslide.PROPERTY_NAME_MPP_X not in props:
                return None, "openslide.mpp-x"
            x = float(props[openslide.PROPERTY_NAME_MPP_X])
            return (x, float(props.get(openslide.PROPERTY_NAME_MPP_Y, x))), "openslide.mpp-x / mpp-y"
    if suffix in TIFF_SUFFIXES:
        return _tiff_mpp(path)
    from PIL import Image

    with no_pixel_limit(), Image.open(path) as image:
        dpi = image.info.get("dpi")
    if not dpi or not dpi[0]:
        return None, "image resolution (dpi)"
    return (25400.0 / float(dpi[0]), 25400.0 / float(dpi[1] or dpi[0])), "image resolution (dpi)"


def _reader_errors() -> tuple[type[Exception], ...]:
    """What tifffile, Pillow and OpenSlide raise on a file they cannot parse."""
    import struct

    import tifffile

    errors: tuple[type[Exception], ...] = (tifffile.TiffFileError, OSError, EOFError, IndexError, KeyError)
    try:
        import openslide
    except (ImportError, OSError):
        return (*errors, struct.error)
    return (*errors, struct.error, openslide.OpenSlideError)


def _resolve_mpp(path: Path, mpp: float | None, downsample: float) -> tuple[float, str]:
    """Micrometres per pixel of the chosen level, and its source (``"file"`` or ``"argument"``)."""
    found, fields = _file_mpp(path)
    implausible = None
    if found is not None:
        x, y = found
        if not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in found):
            implausible, found = x, None
        elif abs(x / y - 1) > _MPP_TOLERANCE:
            warnings.warn(
                f"{path.name} has non-square pixels ({x:.4g} x {y:.4g} µm); their mean is used as the pixel size.",
                UserWarning,
                stacklevel=3,
            )
    file_mpp = None if found is None else float(np.mean(found))
    if mpp is not None:
        check_microns_per_pixel(
            mpp, where="`mpp`", fix="Pass the scanner's micrometres per full-resolution pixel."
        )
        if file_mpp is not None and abs(mpp / file_mpp - 1) > _MPP_TOLERANCE:
            warnings.warn(
                f"`mpp={mpp}` overrides the pixel size {file_mpp:.4g} µm recorded in {path.name} ({fields}).",
                UserWarning,
                stacklevel=3,
            )
        return float(mpp) * downsample, "argument"
    if file_mpp is None:
        why = (
            f"its {fields} say {implausible:.4g} µm per pixel, which is no microscope's scale (a software "
            "default such as 72 dpi)"
            if implausible is not None
            else f"it records none ({fields} looked for)"
        )
        msg = (
            f"The physical pixel size of {path.name} is unknown: {why}. Pass it as `mpp=` in micrometres per "
            "full-resolution pixel (the scanner's value; about 0.25 at 40x and 0.5 at 20x)."
        )
        raise ValueError(msg)
    return file_mpp * downsample, "file"


def _reduce(image: ArrayImage, factor: int) -> np.ndarray:
    """The image shrunk by an integer ``factor`` (block means), read in strips of rows."""
    height, width = image.shape
    out_h, out_w = -(-height // factor), -(-width // factor)
    rows = max(1, _STRIP_BYTES // (3 * factor * factor * out_w)) * factor
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for top in range(0, out_h * factor, rows):
        strip = image.read_region(top, 0, rows, out_w * factor).astype(np.float32)
        blocks = strip.reshape(rows // factor, factor, out_w, factor, 3).mean(axis=(1, 3))
        stop = min(out_h, (top + rows) // factor)
        out[top // factor : stop] = np.rint(blocks[: stop - top // factor]).astype(np.uint8)
    return out


def slide_thumbnail(image: ArrayImage, *, max_px: int = 2000) -> tuple[np.ndarray, float]:
    """The image downscaled so that its long side is at most ``max_px``, without holding it whole.

    A pyramid is read at its coarsest level that is still at least ``max_px`` on the long side,
    in strips of rows that are averaged in blocks, then resized (Lanczos) to the exact size;
    JPEG and PNG are decoded by Pillow at reduced size where possible.

    Returns
    -------
    The ``(h, w, 3)`` uint8 image and its scale (thumbnail pixels per pixel of ``image``).
    """
    width = image.shape[1]
    if isinstance(image, LazyImage) and suffix_of(image.path) in PLAIN_SUFFIXES:
        return downscale_image(image.path, max_px=max_px)
    source = image
    coarser = None  # a coarser level of a pyramid, opened here
    if isinstance(image, PyramidImage):
        usable = [
            k for k in range(image.level, len(image.level_shapes)) if max(image.level_shapes[k]) >= max_px
        ]
        if usable and usable[-1] != image.level:
            source = coarser = image.at_level(usable[-1])
    src_h, src_w = source.shape
    factor = max(1, int(max(src_h, src_w) // max_px))
    reduced = _reduce(source, factor) if factor > 1 else source.read_region(0, 0, src_h, src_w)
    reduced = reduced[: max(1, round(src_h / factor)), : max(1, round(src_w / factor))]
    if coarser is not None:
        coarser.close()
    thumbnail, _ = downscale_pixels(reduced, max_px=max_px)
    return thumbnail, thumbnail.shape[1] / width


def read_wsi(
    path: str | Path,
    *,
    mpp: float | None = None,
    level: int | None = None,
    slide: str | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read an H&E whole-slide image (no spots, no counts) into the histo2expr data model.

    Pixels are never loaded whole: vendor formats (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.bif``,
    ...) are read by region through OpenSlide (``pip install "histo2expr[wsi]"``), tiled and pyramidal
    TIFF and OME-TIFF through tifffile (only the tiles a patch touches are decoded), JPEG, PNG and
    TIFFs stored in strips memory-mapped (decoded once into the cache when compressed). Place
    pseudo-spots on the tissue with :func:`histo2expr.pp.tile_slide`, then use
    :func:`~histo2expr.tl.embed_patches` and :func:`~histo2expr.tl.predict_expression` as for any
    dataset.

    Parameters
    ----------
    path
        The slide file.
    mpp
        Micrometres per full-resolution (level 0) pixel. Read from the file when ``None``
        (OpenSlide ``openslide.mpp-x``, OME ``PhysicalSizeX``, TIFF ``XResolution`` with
        ``ResolutionUnit``, JPEG / PNG dpi); values outside 0.02-20 µm are taken as software
        defaults, not a scale. Required when the file records none; overrides the file (with a
        warning when they differ).
    level
        Pyramid level that serves as full resolution (default 0). A coarser level makes every
        later step cheaper, e.g. level 1 (about 0.5 µm/px) of a 40x slide for a model trained
        at 0.5-1 µm/px. Spot coordinates are pixels of this level.
    slide
        Slide id; default the file name without its extension.
    hires_max_px
        Long side of the downscaled image stored in ``uns``.

    Returns
    -------
    AnnData with no spots and no genes, and

    ``.uns["spatial"][slide]``
        ``images["hires"]``, ``scalefactors`` (``tissue_hires_scalef``, ``microns_per_pixel``) and
        ``metadata`` (``source_image_path``, ``source_image_level``, ``microns_per_pixel_source``:
        ``"file"`` or ``"argument"``).
    ``.obs["slide"]``
        An empty categorical whose one category is ``slide``.

    Examples
    --------
    >>> slide = hx.io.read_wsi("new_slide.svs")  # doctest: +SKIP
    >>> tiles = hx.pp.tile_slide(slide, spot_diameter_um=55)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Slide file {path} does not exist."
        raise FileNotFoundError(msg)
    suffix = suffix_of(path)
    known = OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + PLAIN_SUFFIXES
    if suffix not in known:
        msg = (
            f"{path.name} is not a slide format histo2expr reads ({suffix or 'no extension'}); it reads "
            f"{', '.join(OPENSLIDE_SUFFIXES)} (OpenSlide), {', '.join(TIFF_SUFFIXES)} incl. OME-TIFF "
            f"(tifffile) and {', '.join(PLAIN_SUFFIXES)}. Convert the slide to a pyramidal OME-TIFF "
            "(e.g. with bfconvert or vips) if it is in another format."
        )
        raise ValueError(msg)
    slide = check_slide_id(slide if slide is not None else path.name.split(".")[0])
    level = 0 if level is None else level
    try:
        image = open_slide_image(path, level=level)
        _ = image.shape
    except _reader_errors() as error:
        msg = (
            f"Could not read {path.name} as a {suffix} image ({type(error).__name__}: {error}). Check that the "
            "file is complete and not corrupted, and that its extension matches its format."
        )
        raise ValueError(msg) from error
    downsample = image.downsamples[level] if isinstance(image, PyramidImage) else 1.0
    microns_per_pixel, source = _resolve_mpp(path, mpp, downsample)
    hires, scale = slide_thumbnail(image, max_px=hires_max_px)
    entry = spatial_entry(
        hires,
        hires_scalef=scale,
        microns_per_pixel=microns_per_pixel,
        microns_per_pixel_source=source,
        spot_diameter_fullres=None,
        spot_spacing_fullres=None,
        source_image_path=path,
        source_image_level=level,
    )
    obs = pd.DataFrame({"slide": pd.Categorical([], categories=[slide])}, index=pd.Index([], dtype=str))
    adata = AnnData(X=sp.csr_matrix((0, 0), dtype=np.float32), obs=obs)
    adata.uns["spatial"] = {slide: entry}
    return adata
