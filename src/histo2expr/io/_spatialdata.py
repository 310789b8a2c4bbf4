"""An AnnData of the histo2expr data model as a SpatialData: lazy images, spot circles, the annotating table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import fill_docs
from .._keys import Key
from .._validation import check_element_name, check_obs_key, check_slide_id, spatial_coordinates
from ._slides import SlideImage, slide_images
from ._wsi_image import PyramidImage, open_slide_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

#: Side of the dask chunks of the images, in pixels.
_CHUNK_PX = 4096


def _level_array(image: Any, name: str) -> Any:
    """``(c, y, x)`` dask array reading ``image`` chunk by chunk (never whole)."""
    import dask.array as da

    pixels = image.pixels
    chunks = (min(_CHUNK_PX, pixels.shape[0]), min(_CHUNK_PX, pixels.shape[1]), 3)
    meta = np.empty((0, 0, 0), dtype=np.uint8)
    return da.from_array(pixels, chunks=chunks, meta=meta, name=name, lock=False).transpose(2, 0, 1)


def _image_element(slide: SlideImage, system: str) -> Any:
    """The slide's image as a spatialdata image element, multiscale when the file is a pyramid."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale, set_transformation
    from xarray import DataArray, Dataset, DataTree

    image = slide.image
    to_fullres = Identity() if slide.coord_scale == 1 else Scale([1 / slide.coord_scale] * 2, axes=("y", "x"))
    if not isinstance(image, PyramidImage) or image.level == len(image.level_shapes) - 1:
        return Image2DModel.parse(
            _level_array(image, f"histo2expr-{slide.slide}-{id(image)}"),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={system: to_fullres},
        )
    height, width = image.shape
    levels = {}
    for index, level in enumerate(range(image.level, len(image.level_shapes))):
        array = _level_array(
            image if level == image.level else image.at_level(level), f"histo2expr-{image.path}-{level}"
        )
        n_y, n_x = array.shape[1:]
        coords = {
            "c": ["r", "g", "b"],
            "y": np.linspace(0, height, n_y + 1)[:-1] + height / n_y / 2,
            "x": np.linspace(0, width, n_x + 1)[:-1] + width / n_x / 2,
        }
        levels[f"scale{index}"] = Dataset({"image": DataArray(array, dims=("c", "y", "x"), coords=coords)})
    tree = DataTree.from_dict(levels)
    set_transformation(tree, {system: to_fullres}, set_all=True)
    Image2DModel().validate(tree)
    return tree


@fill_docs
def to_spatialdata(adata: AnnData, *, slide_key: str = "slide") -> SpatialData:
    """The dataset as a :class:`~spatialdata.SpatialData`: each slide's image, its spots as circles, the table.

    Works on any AnnData of the data model, e.g. the measured spots of a reader, or the predicted
    expression of :func:`histo2expr.get.predicted_adata` (on real spots or the pseudo-spots of
    :func:`histo2expr.pp.tile_slide`): the table is that AnnData as it is, whatever it holds, for
    spatialdata-plot, napari-spatialdata or squidpy. Nothing is copied or read: images are dask
    arrays reading the slide file region by region, with one scale per pyramid level of the file
    (from the full-resolution level down).

    Parameters
    ----------
    adata
        AnnData following the histo2expr data model (``uns["spatial"][slide]`` with the image of each
        slide, ``obsm["spatial"]``, ``spot_diameter_fullres``). Slide ids name the elements, so they
        may only hold letters, digits, ``_``, ``-`` and ``.``.
    {slide_key_param}

    Returns
    -------
    A SpatialData with, per slide, in the coordinate system named after the slide (full-resolution
    pixels):

    ``images[f"{slide}_image"]``
        The image, ``(c, y, x)`` uint8 RGB, lazy; a multiscale image for a pyramidal file.
    ``shapes[f"{slide}_spots"]``
        One circle per spot at its centre, radius ``spot_diameter_fullres / 2``, indexed by the
        spot's position within the slide.
    ``tables["table"]``
        A copy of ``adata`` annotating the circles, parsed with
        :class:`spatialdata.models.TableModel` (``region_key="region"``, ``instance_key="spot_id"``:
        ``obs["region"]`` names the circles of the spot's slide, ``obs["spot_id"]`` is its index
        there), with ``uns["histo2expr_to_spatialdata"]``: the histo2expr version, ``slide_key``
        and, per slide, the names of its image and circles elements (the provenance of the
        values themselves stays in the ``uns`` entries ``adata`` already has).

    Examples
    --------
    >>> sdata = hx.io.to_spatialdata(predicted)  # doctest: +SKIP
    >>> sdata.pl.render_images().pl.render_shapes(color="ERBB2").pl.show(coordinate_systems="S1")  # doctest: +SKIP
    >>> sdata.write("predictions.zarr")  # doctest: +SKIP
    """
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    slides = check_obs_key(adata, slide_key)
    if adata.n_obs:
        images = slide_images(adata, slide_key=slide_key)
    else:  # slides without spots yet (read_wsi): their images only
        images = {
            name: SlideImage(
                name,
                open_slide_image(meta["source_image_path"], level=meta.get("source_image_level", 0)),
                1.0,
                None,
                None,
            )
            for name, meta in ((n, e.get("metadata", {})) for n, e in adata.uns.get("spatial", {}).items())
            if "source_image_path" in meta
        }
    for name in images:
        check_element_name(check_slide_id(name))
    elements_images, elements_shapes = {}, {}
    column = slides.to_numpy()
    coords = spatial_coordinates(adata) if adata.n_obs else np.zeros((0, 2))
    region = np.empty(adata.n_obs, dtype=object)
    spot_id = np.zeros(adata.n_obs, dtype=np.int64)
    for name, slide in images.items():
        elements_images[f"{name}_image"] = _image_element(slide, name)
        spots = np.flatnonzero(column == name)
        if len(spots) == 0:
            continue
        diameter = adata.uns["spatial"][name].get("scalefactors", {}).get("spot_diameter_fullres")
        if diameter is None:
            msg = (
                f"Slide {name!r} has no `uns['spatial'][{name!r}]['scalefactors']['spot_diameter_fullres']`, "
                "so its spots cannot be drawn as circles; set it (in full-resolution pixels)."
            )
            raise KeyError(msg)
        elements_shapes[f"{name}_spots"] = ShapesModel.parse(
            coords[spots],
            geometry=0,
            radius=np.full(len(spots), float(diameter) / 2),
            index=pd.RangeIndex(len(spots)),
            transformations={name: Identity()},
        )
        region[spots] = f"{name}_spots"
        spot_id[spots] = np.arange(len(spots))
    tables = {}
    if adata.n_obs:
        from .._version import __version__

        table = adata.copy()
        table.uns.pop(TableModel.ATTRS_KEY, None)  # a table of another SpatialData: annotate these elements
        table.uns[Key.uns.spatialdata_provenance] = {
            "histo2expr_version": __version__,
            "slide_key": slide_key,
            "images": {name: f"{name}_image" for name in images},
            "regions": {name: f"{name}_spots" for name in images if f"{name}_spots" in elements_shapes},
        }
        table.obs[Key.obs.region] = pd.Categorical(region, categories=sorted(elements_shapes))
        table.obs[Key.obs.spot_id] = spot_id
        regions = sorted(elements_shapes)
        tables["table"] = TableModel.parse(
            table,
            region=regions[0] if len(regions) == 1 else regions,
            region_key=Key.obs.region,
            instance_key=Key.obs.spot_id,
        )
    return SpatialData(images=elements_images, shapes=elements_shapes, tables=tables)
