"""The image and physical scale of every slide.

Readers write one ``uns["spatial"][slide]`` entry per slide (:func:`spatial_entry`, with the
downscaled image of :func:`downscale_image`); the patch layer reads them back as lazily read
images (:func:`slide_images`), from ``uns["spatial"]`` or from the image elements of a SpatialData.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from histo2expr._docs import fill_docs
from histo2expr._validation import check_obs_key, get_table, spatial_coordinates
from histo2expr.io._image import (
    PAD_VALUE,
    ArrayImage,
    _pil_to_rgb,
    _shrink,
    _target_size,
    check_pixel_count,
    no_pixel_limit,
    read_image_size,
    to_rgb_uint8,
    unreadable_image,
)
from histo2expr.io._wsi_image import open_slide_image

if TYPE_CHECKING:
    from spatialdata import SpatialData
    from xarray import DataArray


@dataclass(frozen=True)
class SlideImage:
    """The image of one slide as the patch layer sees it.

    Attributes
    ----------
    slide
        Slide id, as in ``adata.obs[slide_key]``.
    image
        Lazily read pixels: anything with ``shape`` (height, width) and
        ``read_region(top, left, height, width)``.
    coord_scale
        Factor that maps ``obsm["spatial"]`` (full-resolution pixels) onto ``image``
        pixels: 1 for the full-resolution image, ``tissue_hires_scalef`` when only the
        downscaled image is available. For a SpatialData, the scale of the transformation
        from the spots' element to the image (``centres`` also holds its translation).
    microns_per_pixel
        Physical size of one pixel of ``image`` (None when unknown).
    spot_diameter_px
        Spot diameter in ``image`` pixels (None when unknown).
    spots
        Integer positions, in the table, of the spots of this slide.
    centres
        ``(len(spots), 2)`` spot centres (x, y) in ``image`` pixels; None when the table has
        no coordinates.
    """

    slide: str
    image: Any
    coord_scale: float
    microns_per_pixel: float | None
    spot_diameter_px: float | None
    spots: np.ndarray | None = field(default=None, repr=False, compare=False)
    centres: np.ndarray | None = field(default=None, repr=False, compare=False)


# --- writing: what every reader stores per slide -------------------------------------------------


def downscale_image(path: str | Path, *, max_px: int = 2000) -> tuple[np.ndarray, float]:
    """Decode an image file shrunk so that its long side is at most ``max_px`` pixels.

    JPEGs are decoded directly at 1/2, 1/4 or 1/8 resolution where that suffices (Pillow's
    ``draft``), so their full-resolution pixels are never held; other formats are decoded whole.
    The result is resized with a Lanczos filter; non-RGB images are converted as
    :class:`~histo2expr.io._image.LazyImage` does (grey and alpha with a warning, 16-bit refused).

    Parameters
    ----------
    path
        Image file.
    max_px
        Largest allowed side of the result.

    Returns
    -------
    The ``(h, w, 3)`` uint8 image and its scale factor (downscaled pixels per full-resolution pixel).
    """
    from PIL import Image

    path = Path(path)
    read_image_size(path)  # a clear error for a damaged or misnamed file
    try:
        with no_pixel_limit(), Image.open(path) as image:
            size, scale = _target_size(*image.size, max_px)
            image.draft(None, size)
            check_pixel_count(path, image.size[1], image.size[0])  # what is decoded, after the draft
            rgb = image if image.mode == "RGB" else Image.fromarray(_pil_to_rgb(image, path))
            return _shrink(rgb, size), scale
    except OSError as error:  # e.g. damaged compressed data inside a complete-looking file
        raise unreadable_image(path, error) from error


def check_spots_inside(
    coords: np.ndarray, ids: Any, *, slide: str, size: tuple[int, int], image: Path
) -> None:
    """Raise when spot centres (x, y) fall outside an image of ``size = (height, width)``."""
    height, width = size
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        examples = [
            f"{spot} at ({x:.0f}, {y:.0f})"
            for spot, (x, y) in zip(np.asarray(ids)[outside][:3], coords[outside][:3], strict=True)
        ]
        msg = (
            f"{int(outside.sum())} of {len(coords)} spots of slide {slide!r} lie outside its image {image} "
            f"({width} x {height} px, width x height), e.g. {', '.join(examples)}. The coordinates must be "
            "full-resolution pixels of that image: check that the spot file and the image belong to the "
            "same section and that the image was not resized."
        )
        raise ValueError(msg)


def spatial_entry(
    hires: np.ndarray,
    *,
    hires_scalef: float,
    microns_per_pixel: float,
    microns_per_pixel_source: str,
    spot_diameter_fullres: float | None,
    spot_spacing_fullres: float | None,
    source_image_path: str | Path | None,
    source_image_level: int | None = None,
) -> dict:
    """Build the ``uns["spatial"][slide]`` entry of the histo2expr data model.

    ``spot_diameter_fullres`` is None for a slide without spots yet (:func:`~histo2expr.io.read_wsi`);
    ``source_image_level`` is the pyramid level of the source file that serves as full resolution.
    """
    scalefactors = {"tissue_hires_scalef": float(hires_scalef)}
    if spot_diameter_fullres is not None:
        scalefactors["spot_diameter_fullres"] = float(spot_diameter_fullres)
    scalefactors["microns_per_pixel"] = float(microns_per_pixel)
    if spot_spacing_fullres is not None:
        scalefactors["spot_spacing_fullres"] = float(spot_spacing_fullres)
    metadata: dict[str, str | int] = {"microns_per_pixel_source": microns_per_pixel_source}
    if source_image_path is not None:
        metadata["source_image_path"] = str(Path(source_image_path).resolve())
    if source_image_level is not None:
        metadata["source_image_level"] = int(source_image_level)
    return {"images": {"hires": hires}, "scalefactors": scalefactors, "metadata": metadata}


def spot_table(
    counts: Any,
    *,
    var: pd.DataFrame,
    obs: pd.DataFrame,
    slide: str,
    patient: str,
    coords: np.ndarray,
    entry: dict,
    source: str | Path,
) -> AnnData:
    """One slide's spots in the data model, as every reader returns them.

    ``X`` raw counts (float32 CSR, checked), ``obs_names`` ``"{slide}_{barcode}"``, categorical
    ``obs['slide']`` and ``obs['patient']`` before the columns of ``obs`` (indexed by barcode),
    ``obsm['spatial']`` = ``coords`` and ``uns['spatial'][slide]`` = ``entry``. Duplicated gene names are
    made unique with a warning naming ``source``, the file the counts came from. A slide id that writing
    would mangle is refused (``_validation.check_slide_id``).
    """
    from scipy import sparse

    from histo2expr._validation import check_counts, check_slide_id

    slide = check_slide_id(slide)
    matrix = sparse.csr_matrix(counts, dtype=np.float32)
    check_counts(matrix, where=f"Count matrix {source}")
    obs = obs.copy()
    obs.index = slide + "_" + obs.index.astype(str)
    obs.insert(0, "slide", pd.Categorical([slide] * len(obs)))
    obs.insert(1, "patient", pd.Categorical([patient] * len(obs)))
    out = AnnData(X=matrix, obs=obs, var=var.copy())
    if out.var_names.has_duplicates:
        duplicated = list(out.var_names[out.var_names.duplicated()].unique()[:5])
        warnings.warn(
            f"{Path(source).name} has duplicated gene names (e.g. {duplicated}); they are made unique with "
            "`AnnData.var_names_make_unique`.",
            UserWarning,
            stacklevel=3,
        )
        out.var_names_make_unique()
    out.obsm["spatial"] = np.asarray(coords, dtype=np.float64)
    out.uns["spatial"] = {slide: entry}
    return out


# --- reading: AnnData --------------------------------------------------------------------------


def _scalefactor(scalefactors: dict, name: str) -> float | None:
    value = scalefactors.get(name)
    return None if value is None else float(value)


@fill_docs
def slide_images(
    data: AnnData | SpatialData,
    *,
    slide_key: str = "slide",
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
) -> dict[str, SlideImage]:
    """Return the :class:`SlideImage` of every slide in ``data``.

    For an AnnData, the full-resolution image is the file named in
    ``uns["spatial"][slide]["metadata"]["source_image_path"]`` (at pyramid level
    ``["metadata"]["source_image_level"]``, default 0), read by region: tiled and pyramidal TIFFs
    through tifffile, vendor whole-slide formats through OpenSlide, other images memory-mapped (see
    :func:`~histo2expr.io.read_wsi`). When it is missing, the downscaled ``"hires"`` (else ``"lowres"``) image stored in ``uns`` is used with a
    warning, with coordinates and pixel size rescaled accordingly.

    For a SpatialData, the spots are the rows of its table ``table_key`` and each slide's
    image is an element of ``data.images``, read lazily at its full resolution (``scale0``):
    the element named by ``image_key``, else the largest element whose name is the slide id
    or the name of the element the slide's spots annotate (``region``), or starts with one of
    them followed by ``"_"``, else the only image element when there is one slide. The spot
    centres are ``obsm["spatial"]`` of the table, else the centroids of the annotated shapes,
    mapped to image pixels through the spatialdata transformations of both elements (scale and
    translation; other transformations raise :class:`NotImplementedError`). The pixel size
    comes from ``uns["spatial"][slide]["scalefactors"]["microns_per_pixel"]`` of the table
    (full-resolution pixels of the spots' element) when present; the spot diameter from the
    circles' radius.

    Parameters
    ----------
    data
        Dataset following the histo2expr data model (``uns["spatial"]`` per slide), or a
        :class:`~spatialdata.SpatialData` with a table annotating spots and image elements.
    {slide_key_param}
    table_key
        Table of a SpatialData; ignored for an AnnData.
    image_key
        SpatialData only: the image element of every slide, or a mapping slide -> element.
    """
    if not isinstance(data, AnnData):
        return _spatialdata_slide_images(data, slide_key=slide_key, table_key=table_key, image_key=image_key)
    adata = data
    slides = check_obs_key(adata, slide_key)
    column = slides.to_numpy()
    coords = spatial_coordinates(adata) if "spatial" in adata.obsm else None
    spatial = adata.uns.get("spatial", {})
    out = {}
    for slide in slides.cat.categories:
        if slide not in spatial:
            msg = (
                f"`adata.uns['spatial']` has no entry for slide {slide!r} (it has {sorted(spatial)}). "
                "Each slide needs its image and scale factors there; read the data with a histo2expr "
                "reader, or make the slide ids in `obs` match the keys of `uns['spatial']`."
            )
            raise KeyError(msg)
        spots = np.flatnonzero(column == slide)
        entry = spatial[slide]
        scalefactors = dict(entry.get("scalefactors", {}))
        mpp = _scalefactor(scalefactors, "microns_per_pixel")
        diameter = _scalefactor(scalefactors, "spot_diameter_fullres")
        metadata = entry.get("metadata", {})
        source = metadata.get("source_image_path")
        if source is not None:
            centres = None if coords is None else coords[spots]
            image = open_slide_image(source, level=int(metadata.get("source_image_level", 0)))
            out[slide] = SlideImage(str(slide), image, 1.0, mpp, diameter, spots, centres)
            continue
        images = entry.get("images", {})
        for name in ("hires", "lowres"):
            scale = _scalefactor(scalefactors, f"tissue_{name}_scalef")
            if name in images and scale:
                warnings.warn(
                    f"Slide {slide!r} has no full-resolution image path "
                    "(`uns['spatial'][slide]['metadata']['source_image_path']`); patches are cut from "
                    f"the downscaled {name!r} image, which loses detail.",
                    stacklevel=2,
                )
                out[slide] = SlideImage(
                    str(slide),
                    ArrayImage(images[name]),
                    scale,
                    None if mpp is None else mpp / scale,
                    None if diameter is None else diameter * scale,
                    spots,
                    None if coords is None else coords[spots] * scale,
                )
                break
        else:
            msg = (
                f"Slide {slide!r} has no image: set `uns['spatial'][{slide!r}]['metadata']"
                "['source_image_path']` to its full-resolution H&E, or store a 'hires' image with its "
                "'tissue_hires_scalef'."
            )
            raise KeyError(msg)
    return out


# --- reading: SpatialData ----------------------------------------------------------------------


class DaskImage:
    """An image element of a SpatialData (a ``(c, y, x)`` array, usually dask), read region by region.

    Only the requested region is computed. Channels are read as RGB (one channel: grey,
    four: RGBA composited over white, see :func:`~histo2expr.io._image.to_rgb_uint8`); images
    that are not 8-bit are refused when the object is made.

    Parameters
    ----------
    data
        The element's full-resolution ``DataArray`` with dims ``c``, ``y``, ``x``.
    name
        Element name, used in messages.
    """

    def __init__(self, data: DataArray, *, name: str) -> None:
        self.name = name
        self._array = data.transpose("c", "y", "x").data
        # validates dtype and channels now, with the one warning a conversion deserves
        to_rgb_uint8(self._to_hwc(self._array[:, :1, :1]), source=self._source)

    @property
    def _source(self) -> str:
        return f"SpatialData image element {self.name!r}"

    @staticmethod
    def _to_hwc(region: Any) -> np.ndarray:
        return np.moveaxis(np.asarray(region), 0, -1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return int(self._array.shape[1]), int(self._array.shape[2])

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Return the ``(height, width, 3)`` uint8 region; pixels outside the image are white."""
        out = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
        img_h, img_w = self.shape
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, img_h), min(left + width, img_w)
        if y1 > y0 and x1 > x0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the conversion was announced in __init__
                region = to_rgb_uint8(self._to_hwc(self._array[:, y0:y1, x0:x1]), source=self._source)
            out[y0 - top : y1 - top, x0 - left : x1 - left] = region
        return out


def _full_resolution(element: Any) -> DataArray:
    """The ``scale0`` DataArray of a multiscale image, or the image itself."""
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    return element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)


def _image_element(
    sdata: SpatialData, slide: str, region: str, image_key: str | Mapping[str, str] | None, n_slides: int
) -> str:
    names = list(sdata.images)
    if image_key is not None:
        name = image_key if isinstance(image_key, str) else image_key.get(slide)
        if name is None or name not in sdata.images:
            msg = (
                f"`image_key` names no image element for slide {slide!r} (got {name!r}); the image "
                f"elements are {names}."
            )
            raise KeyError(msg)
        return name
    candidates = [
        name for name in names if name in (slide, region) or name.startswith((f"{slide}_", f"{region}_"))
    ]
    if not candidates and len(names) == 1 and n_slides == 1:
        candidates = names
    if not candidates:
        msg = (
            f"No image element of the SpatialData matches slide {slide!r} (whose spots annotate {region!r}); "
            f"the image elements are {names}. Pass `image_key=` with the element of each slide "
            "(a name, or a mapping slide -> name)."
        )
        raise KeyError(msg)
    return max(candidates, key=lambda name: np.prod(_full_resolution(sdata.images[name]).shape[-2:]))


def _affine_to_image(element: Any, image: Any, *, element_name: str, image_name: str) -> np.ndarray:
    """The 3 x 3 matrix mapping (x, y, 1) of ``element`` to pixels of ``image`` (scale + translation)."""
    from spatialdata.transformations import get_transformation

    element_systems = get_transformation(element, get_all=True)
    image_systems = get_transformation(image, get_all=True)
    common = sorted(set(element_systems) & set(image_systems))
    if not common:
        msg = (
            f"Element {element_name!r} (coordinate systems {sorted(element_systems)}) and image {image_name!r} "
            f"(coordinate systems {sorted(image_systems)}) share no coordinate system, so the spots cannot be "
            "placed on the image. Register both in a common coordinate system (spatialdata.transformations."
            "set_transformation)."
        )
        raise ValueError(msg)
    system = "global" if "global" in common else common[0]
    axes = ("x", "y")
    to_system = element_systems[system].to_affine_matrix(input_axes=axes, output_axes=axes)
    image_to_system = image_systems[system].to_affine_matrix(input_axes=axes, output_axes=axes)
    matrix = np.linalg.solve(np.asarray(image_to_system, dtype=float), np.asarray(to_system, dtype=float))
    (sx, shear_xy), (shear_yx, sy) = matrix[:2, :2]
    scale_only = abs(shear_xy) + abs(shear_yx) <= 1e-9 * abs(sx) and sx > 0 and np.isclose(sx, sy, rtol=1e-6)
    if not scale_only:
        msg = (
            f"Mapping element {element_name!r} to image {image_name!r} in coordinate system {system!r} "
            f"needs the transformation {element_systems[system]!r} followed by the inverse of "
            f"{image_systems[system]!r}: only a uniform positive scale plus translation is supported. "
            "Transform the image or the spots so that they differ by such a transformation."
        )
        raise NotImplementedError(msg)
    return matrix


def _shape_centres(shapes: Any, instances: np.ndarray, *, region: str) -> tuple[np.ndarray, float | None]:
    """Centroids (x, y) of the shapes ``instances`` and their median diameter (circles only)."""
    missing = ~np.isin(instances, shapes.index.to_numpy())
    if missing.any():
        msg = (
            f"{int(missing.sum())} spots of the table have no shape in {region!r} (e.g. instance "
            f"{instances[missing][0]!r}); the table's instance ids must be the index of the shapes element."
        )
        raise KeyError(msg)
    shapes = shapes.loc[instances]
    centroids = shapes.geometry.centroid
    diameter = 2 * float(np.median(shapes["radius"])) if "radius" in shapes.columns else None
    return np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()]), diameter


def _spatialdata_slide_images(
    sdata: SpatialData, *, slide_key: str, table_key: str, image_key: str | Mapping[str, str] | None
) -> dict[str, SlideImage]:
    from geopandas import GeoDataFrame

    table = get_table(sdata, table_key)
    attrs = table.uns.get("spatialdata_attrs", {})
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if region_key is None or instance_key is None:
        msg = (
            f"Table {table_key!r} does not say which element it annotates (no region_key / instance_key in "
            "`uns['spatialdata_attrs']`); parse it with spatialdata.models.TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)."
        )
        raise ValueError(msg)
    slides = check_obs_key(table, slide_key)
    column = slides.to_numpy()
    regions = table.obs[region_key].astype(str).to_numpy()
    coords = spatial_coordinates(table) if "spatial" in table.obsm else None
    spatial = table.uns.get("spatial", {})
    out = {}
    for slide in slides.cat.categories:
        spots = np.flatnonzero(column == slide)
        slide_regions = sorted(set(regions[spots]))
        if len(slide_regions) != 1:
            msg = (
                f"The spots of slide {slide!r} annotate several elements {slide_regions}; each slide must be "
                f"one element. Pass `slide_key={region_key!r}` to treat each element as a slide."
            )
            raise ValueError(msg)
        region = slide_regions[0]
        if region not in sdata:
            msg = f"The table annotates {region!r}, which is not an element of the SpatialData."
            raise KeyError(msg)
        element = sdata[region]
        image_name = _image_element(sdata, str(slide), region, image_key, len(slides.cat.categories))
        image = sdata.images[image_name]
        matrix = _affine_to_image(element, image, element_name=region, image_name=image_name)
        scale = float(matrix[0, 0])
        points, diameter = None, None
        if isinstance(element, GeoDataFrame):
            instances = table.obs[instance_key].to_numpy()[spots]
            points, diameter = _shape_centres(element, instances, region=region)
        if coords is not None:
            points = coords[spots]
        if points is None:
            msg = (
                f"The table has no `obsm['spatial']` and its spots annotate {region!r}, which is not a shapes "
                "element; store the spot centres in `obsm['spatial']` of the table."
            )
            raise ValueError(msg)
        scalefactors = spatial.get(slide, {}).get("scalefactors", {})
        mpp = _scalefactor(scalefactors, "microns_per_pixel")
        if diameter is None:
            diameter = _scalefactor(scalefactors, "spot_diameter_fullres")
        out[str(slide)] = SlideImage(
            str(slide),
            DaskImage(_full_resolution(image), name=image_name),
            scale,
            None if mpp is None else mpp / scale,
            None if diameter is None else diameter * scale,
            spots,
            points @ matrix[:2, :2].T + matrix[:2, 2],
        )
    return out
