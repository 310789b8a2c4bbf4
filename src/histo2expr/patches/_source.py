"""Square image patches around spots, cut lazily from the slide images at one physical scale."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from anndata import AnnData

from histo2expr._docs import fill_docs
from histo2expr._validation import (
    check_microns_per_pixel,
    check_obs_key,
    check_patch_size,
    check_spot_spacing,
    get_table,
    spatial_coordinates,
)
from histo2expr.io import ArrayImage, slide_images

from ._stain import REFERENCE_STAINS, StainVectors, macenko_stains, normalize_stains

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from spatialdata import SpatialData

    from histo2expr.io import SlideImage

#: Slides whose pixel sizes differ by at most this fraction are used at their own resolution.
MPP_TOLERANCE = 0.02
#: Allowed ratio (target mpp / slide mpp): at most 8x upsampling and 32x downsampling.
_MIN_ZOOM, _MAX_ZOOM = 1 / 8, 32.0
#: Widest context view, in patch sides.
_MAX_FIELD = 8.0
#: Stain normalisations of :class:`PatchSource`.
STAIN_NORMALIZATIONS = (None, "macenko")
#: Spots per slide whose patches estimate the slide's stains.
_STAIN_SAMPLE_SPOTS = 32


def check_indices(indices: Any, n: int, *, what: str = "indices") -> np.ndarray:
    """Return ``indices`` as a 1-D int64 array of positions in ``range(n)``, or raise."""
    array = np.asarray(indices)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        msg = (
            f"`{what}` must be a 1-D sequence of integer spot positions, got an array of shape "
            f"{array.shape} and dtype {array.dtype}. Pass e.g. `np.flatnonzero(mask)` for a boolean mask."
        )
        raise TypeError(msg)
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= n)
    if bad.any():
        msg = (
            f"`{what}` holds {int(bad.sum())} positions outside range(0, {n}) (e.g. {int(array[bad][0])}); "
            f"positions index the {n} spots of the dataset."
        )
        raise IndexError(msg)
    return array


def _check_field(field: Any) -> float:
    if isinstance(field, bool) or not isinstance(field, int | float | np.number) or not np.isfinite(field):
        msg = f"`field` must be a number (the side of the field of view in patches, e.g. 3), got {field!r}."
        raise TypeError(msg)
    if not 1 <= field <= _MAX_FIELD:
        msg = (
            f"`field={field}` is out of range; use 1 (the patch itself) to {_MAX_FIELD:g} (a context view "
            f"{_MAX_FIELD:g} patches wide, shrunk to one patch)."
        )
        raise ValueError(msg)
    return float(field)


def _resolve_mpp(mpp: float | None, slides: Sequence[SlideImage]) -> float | None:
    """Target microns per pixel: ``mpp`` checked, or chosen from the slides' own pixel sizes."""
    known = {s.slide: s.microns_per_pixel for s in slides if s.microns_per_pixel is not None}
    missing = [s.slide for s in slides if s.microns_per_pixel is None]
    fix = (
        "Set `adata.uns['spatial'][slide]['scalefactors']['microns_per_pixel']` for those slides "
        "(the scanner's pixel size in micrometres)"
    )
    for slide in slides:  # the recorded full-resolution pixel size (a downscaled image's is larger)
        if slide.microns_per_pixel is not None:
            where = f"`uns['spatial'][{slide.slide!r}]['scalefactors']['microns_per_pixel']`"
            check_microns_per_pixel(slide.microns_per_pixel * slide.coord_scale, where=where, fix=f"{fix}.")
    if mpp is not None:
        check_microns_per_pixel(
            mpp, where="`mpp`", fix="Give `mpp` in micrometres per patch pixel (e.g. 0.5)."
        )
        mpp = float(mpp)
        if missing:
            msg = (
                f"`mpp={mpp}` asks for patches at a physical scale, but slides {missing} have no "
                f"microns_per_pixel, so their scale is unknown. {fix}, or pass `mpp=None` to cut "
                "patches at each slide's native resolution."
            )
            raise ValueError(msg)
        return float(mpp)
    if not known:
        return None  # no physical scale anywhere: native pixels
    if missing:
        msg = (
            f"Slides {missing} have no microns_per_pixel while slides {sorted(known)} do, so their patches "
            f"cannot be brought to one physical scale. {fix}."
        )
        raise ValueError(msg)
    values = np.array(list(known.values()))
    target = float(np.median(values))
    if values.max() / values.min() > 1 + MPP_TOLERANCE:
        resampled = {s: round(v, 4) for s, v in known.items() if abs(v / target - 1) > MPP_TOLERANCE}
        warnings.warn(
            f"Slides differ in pixel size ({values.min():.4g} to {values.max():.4g} µm/px); patches are cut "
            f"at the median {target:.4g} µm/px, so slides {resampled} (µm/px) are resampled. Pass `mpp=` to "
            "choose the scale yourself.",
            UserWarning,
            stacklevel=3,
        )
    return target


def _check_spacing(adata: AnnData, coords: np.ndarray, codes: np.ndarray, slides: list[str]) -> None:
    """The spots of every slide against the spacing recorded in ``uns["spatial"]`` (see ``check_spot_spacing``)."""
    spatial = adata.uns.get("spatial") or {}
    for code, slide in enumerate(slides):
        factors = (spatial.get(slide) or {}).get("scalefactors") or {}
        spacing = factors.get("spot_spacing_fullres")
        if spacing is not None:
            check_spot_spacing(coords[codes == code], float(spacing), slide=slide, where="`obsm['spatial']`")


@fill_docs
class PatchSource:
    """Square RGB patches centred on the spots, cut lazily at one microns-per-pixel.

    Each patch shows the same physical field of view, ``patch_size * mpp`` micrometres wide:
    a square of ``round(patch_size * mpp / slide_mpp)`` native pixels centred on the spot is read
    from the slide image and resized to ``patch_size`` pixels (Pillow bilinear, which averages over
    the footprint when shrinking); a slide whose pixel size is within 2 % of ``mpp`` is read at its
    own resolution, without resampling.
    Pixels outside the image are padded with white (``hx.io.ArrayImage.pad_value``, 255, like the glass around
    tissue); spots near the border keep their centre in the middle of the patch.
    With ``field > 1`` the patch is a *context view*: a square ``field`` times wider around the
    spot, shrunk to ``patch_size`` pixels (so its pixels are ``field * mpp`` micrometres wide).
    With ``stain_normalization="macenko"`` every patch is re-stained to reference stain vectors
    (:func:`~histo2expr.patches.normalize_stains`) from its slide's own stain vectors, which are
    estimated once per slide from the spot patches of up to 32 spots of that slide
    (:func:`~histo2expr.patches.macenko_stains`): a slide's normalisation uses that slide's
    image only, so it is the same whether the slide is trained on or held out.

    Only the per-spot slide and centre are held in memory. Pixels are read from the lazily opened
    slide images (memory-mapped from the file, or from a copy decoded once into the histo2expr
    cache), and a source keeps at most one slide image open at a time: reading a spot of another
    slide closes the previous one, so a pass in :meth:`slide_order` maps one slide after the
    other. The object pickles without pixels, for :class:`torch.utils.data.DataLoader` workers.

    Parameters
    ----------
    data
        Dataset following the histo2expr data model: ``obs[slide_key]``, ``obsm[spatial_key]``
        (full-resolution pixels) and ``uns["spatial"][slide]`` with the image of every slide; or a
        SpatialData whose table annotates the spots and whose image elements are the slides (see
        :func:`~histo2expr.io.slide_images`). Spot ``i`` is row ``i`` of the (table) AnnData.
    patch_size
        Side of the output patches in pixels.
    mpp
        Micrometres per pixel of the output patches. ``None``: each slide's native resolution when
        all slides agree within 2 %, else the median slide pixel size (with a warning naming the
        resampled slides); native pixels when no slide records its pixel size.
    field
        Side of the field of view in patch sides, from 1 (default: ``patch_size`` pixels at
        ``mpp``) to 8: a context view ``field`` times wider, shrunk to ``patch_size`` pixels.
    stain_normalization
        ``None`` (default): the pixels as scanned; ``"macenko"``: Macenko stain normalisation
        per slide.
    {slide_key_param}
    spatial_key
        Key of ``adata.obsm`` with the spot centres (x, y) in full-resolution pixels (AnnData only).
    table_key
        SpatialData only: the table with the spots.
    image_key
        SpatialData only: the image element of every slide, or a mapping slide -> element.

    Attributes
    ----------
    slides
        Slide ids, in the order of the slide codes.
    patch_size
        Side of the output patches in pixels.
    mpp
        Micrometres per pixel of the spot view (None: native pixels); a context view's pixels are
        ``field`` times wider.
    field
        Side of the field of view in patch sides (1: the spot view).
    stain_normalization
        ``None`` or ``"macenko"``.
    stains
        With stain normalisation: the estimated :class:`~histo2expr.patches.StainVectors` of every
        slide, in the order of :attr:`slides`; else None.

    Examples
    --------
    >>> source = hx.patches.PatchSource(adata, patch_size=224, mpp=0.5)  # doctest: +SKIP
    >>> source[0].shape  # doctest: +SKIP
    (224, 224, 3)
    """

    def __init__(
        self,
        data: AnnData | SpatialData,
        *,
        patch_size: int = 224,
        mpp: float | None = None,
        field: float = 1.0,
        stain_normalization: str | None = None,
        slide_key: str = "slide",
        spatial_key: str = "spatial",
        table_key: str = "table",
        image_key: str | Mapping[str, str] | None = None,
    ) -> None:
        self.patch_size = check_patch_size(patch_size)
        self.field = self.check_view(field, stain_normalization)
        self.stain_normalization = stain_normalization
        table = get_table(data, table_key)
        slide_column = check_obs_key(table, slide_key)
        if table.n_obs == 0:
            msg = "The dataset has no spots; PatchSource needs at least one spot to cut a patch around."
            raise ValueError(msg)
        if isinstance(data, AnnData):
            coords = spatial_coordinates(data, spatial_key)
        elif spatial_key != "spatial":
            msg = (
                f"`spatial_key={spatial_key!r}` applies to an AnnData only; for a SpatialData the spot centres "
                "are the table's `obsm['spatial']` or the centroids of the shapes it annotates."
            )
            raise ValueError(msg)
        images = slide_images(data, slide_key=slide_key, table_key=table_key, image_key=image_key)
        self.slides: list[str] = [str(s) for s in slide_column.cat.categories]
        self._images: list[SlideImage] = [images[s] for s in self.slides]
        self._codes = slide_column.cat.codes.to_numpy().astype(np.int32)
        if isinstance(data, AnnData):
            _check_spacing(table, coords, self._codes, self.slides)
            scales = np.array([s.coord_scale for s in self._images])
            self._centres = coords * scales[self._codes, None]
        else:  # the SpatialData transformations (scale and translation) placed the spots on each image
            self._centres = np.empty((len(self._codes), 2))
            for slide in self._images:
                self._centres[slide.spots] = slide.centres
        self._check_centres_inside()
        self.mpp = _resolve_mpp(mpp, self._images)
        self._crop_px = [self._native_crop(s) for s in self._images]
        self._open: tuple[int, Any] | None = None  # the one slide image this process has open
        self.stains: list[StainVectors] | None = None
        if stain_normalization == "macenko":
            self.stains = [self._estimate_stains(code) for code in range(len(self.slides))]

    def _estimate_stains(self, code: int) -> StainVectors:
        """Macenko stain vectors of slide ``code`` from the spot patches of up to 32 of its spots."""
        spots = np.flatnonzero(self._codes == code)
        sample = spots[np.linspace(0, len(spots) - 1, min(len(spots), _STAIN_SAMPLE_SPOTS)).astype(int)]
        try:
            return macenko_stains(np.stack([self._cut(int(i)) for i in sample]))
        except ValueError as err:
            msg = f"Slide {self.slides[code]!r}: {err} Check the slide's image, or pass `stain_normalization=None`."
            raise ValueError(msg) from err

    def _check_centres_inside(self) -> None:
        for code, slide in enumerate(self._images):
            height, width = slide.image.shape[:2]
            centres = self._centres[self._codes == code]
            outside = (
                (centres[:, 0] < 0)
                | (centres[:, 0] >= width)
                | (centres[:, 1] < 0)
                | (centres[:, 1] >= height)
            )
            if outside.any():
                x, y = centres[outside][0]
                msg = (
                    f"{int(outside.sum())} of {len(centres)} spots of slide {slide.slide!r} have their centre "
                    f"outside its image of {width} x {height} px (width x height), e.g. at (x, y) = ({x:.1f}, "
                    f"{y:.1f}) image px. The spot centres (`obsm['spatial']`) must be (x, y) in full-resolution "
                    "pixels of that slide's image: check for swapped x / y, array or downscaled coordinates, "
                    "or the wrong image for the slide."
                )
                raise ValueError(msg)

    def _native_crop(self, slide: SlideImage) -> int:
        """Side in image pixels of the square read for one patch of ``slide``."""
        if self.mpp is None or slide.microns_per_pixel is None:
            return round(self.patch_size * self.field)
        zoom = self.mpp / slide.microns_per_pixel
        if abs(zoom - 1) <= MPP_TOLERANCE:
            return round(self.patch_size * self.field)
        if not _MIN_ZOOM <= zoom <= _MAX_ZOOM:
            msg = (
                f"`mpp={self.mpp:.4g}` would resample slide {slide.slide!r} ({slide.microns_per_pixel:.4g} µm/px) "
                f"by a factor {zoom:.3g}; allowed are {_MIN_ZOOM:g} to {_MAX_ZOOM:g}. Give `mpp` in micrometres "
                "per pixel (H&E slides are typically scanned at 0.25 to 1 µm/px) and check the slide's "
                "`microns_per_pixel`."
            )
            raise ValueError(msg)
        return max(1, round(self.patch_size * zoom * self.field))

    @staticmethod
    def check_view(field: Any = 1.0, stain_normalization: str | None = None) -> float:
        """Check ``field`` and ``stain_normalization`` as the constructor does, without data; the field as a float."""
        if stain_normalization not in STAIN_NORMALIZATIONS:
            msg = f"`stain_normalization` must be one of {STAIN_NORMALIZATIONS}, got {stain_normalization!r}."
            raise ValueError(msg)
        return _check_field(field)

    def __len__(self) -> int:
        return len(self._codes)

    def __repr__(self) -> str:
        mpp = "native" if self.mpp is None else f"{self.mpp:.4g} µm/px"
        field = "" if self.field == 1 else f", field {self.field:g} patches"
        return (
            f"PatchSource({len(self)} spots, {len(self.slides)} slides, {self.patch_size} px at {mpp}{field})"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = None
        return state

    @property
    def slide_codes(self) -> np.ndarray:
        """Slide of every spot as a position in :attr:`slides`, shape ``(n_spots,)``."""
        view = self._codes.view()
        view.flags.writeable = False
        return view

    @property
    def centres(self) -> np.ndarray:
        """Spot centres in the pixels of their slide image, shape ``(n_spots, 2)`` (read-only)."""
        view = self._centres.view()
        view.flags.writeable = False
        return view

    def _image(self, code: int) -> Any:
        """The image of slide ``code``, opened here; the previously opened slide is closed."""
        opened = self._open  # one read of a (code, image) tuple: safe when threads share the source
        if opened is not None and opened[0] == code:
            return opened[1]
        # Drop the previous slide first (closing its memory map), then open a fresh copy: copies of
        # a LazyImage start unmapped, so the SlideImage objects themselves are never opened and at
        # most one slide is mapped per process.
        self._open = None
        image = copy.copy(self._images[code].image)
        self._open = (code, image)
        return image

    def _read(self, index: int) -> np.ndarray:
        patch = self._cut(index)
        if self.stains is None:
            return patch
        return normalize_stains(patch, self.stains[int(self._codes[index])], REFERENCE_STAINS)

    def _cut(self, index: int) -> np.ndarray:
        """The patch of spot ``index`` as scanned (no stain normalisation)."""
        code = int(self._codes[index])
        crop = self._crop_px[code]
        cx, cy = np.floor(self._centres[index] + 0.5).astype(np.int64)
        region = self._image(code).read_region(int(cy) - crop // 2, int(cx) - crop // 2, crop, crop)
        if crop == self.patch_size:
            return np.ascontiguousarray(region)
        from PIL import Image

        resized = Image.fromarray(np.ascontiguousarray(region)).resize(
            (self.patch_size, self.patch_size), Image.Resampling.BILINEAR, reducing_gap=3.0
        )
        return np.asarray(resized)

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``(patch_size, patch_size, 3)`` uint8 patch of spot ``index``."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            msg = f"PatchSource is indexed by one integer spot position, got {index!r}; use `read()` for several."
            raise TypeError(msg)
        n = len(self)
        if not -n <= index < n:
            msg = f"Spot position {index} is out of range for {n} spots."
            raise IndexError(msg)
        return self._read(int(index) % n)

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read several patches, slide by slide.

        Parameters
        ----------
        indices
            Spot positions (integers in ``range(len(self))``).

        Returns
        -------
        uint8 array of shape ``(len(indices), patch_size, patch_size, 3)``, in the order of ``indices``.
        """
        indices = check_indices(indices, len(self))
        out = np.empty((len(indices), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        for position in np.argsort(self._codes[indices], kind="stable"):
            out[position] = self._read(int(indices[position]))
        return out

    def slide_order(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Spot positions grouped by slide, so that a sequential pass opens one slide at a time.

        Parameters
        ----------
        indices
            Spot positions to order; all spots when ``None``.

        Returns
        -------
        int64 array: the positions, slide after slide (in the order of :attr:`slides`), keeping
        their given order within each slide.
        """
        indices = np.arange(len(self)) if indices is None else check_indices(indices, len(self))
        return indices[np.argsort(self._codes[indices], kind="stable")]

    def prepare(self, indices: Sequence[int] | np.ndarray | None = None) -> None:
        """Decode the images of the slides used by ``indices`` into the cache, one at a time.

        Compressed images (JPEG, PNG, compressed TIFF) are decoded once into the histo2expr cache
        on their first read. Calling this before starting DataLoader workers does that work once,
        in this process, instead of in several workers at the same time.
        """
        codes = np.unique(self._codes if indices is None else self._codes[check_indices(indices, len(self))])
        for code in codes:
            image = copy.copy(self._images[int(code)].image)
            if hasattr(image, "prepare"):  # an image of `hx.io` (any object with `read_region` serves)
                image.prepare()

    def describe(self) -> dict[str, Any]:
        """The patch geometry, for model records.

        Returns
        -------
        ``{"patch_size": int, "mpp": float or None, "field": float, "stain_normalization": str or
        None, "pad_value": 255, "slides": {slide: {"microns_per_pixel": float or None, "crop_px":
        int}}}``; ``crop_px`` is the side of the square read from that slide's image before
        resizing to ``patch_size``; with stain normalisation each slide also has its ``"stains"``
        (:meth:`StainVectors.to_dict`).
        """
        slides: dict[str, dict[str, Any]] = {
            s.slide: {"microns_per_pixel": s.microns_per_pixel, "crop_px": int(crop)}
            for s, crop in zip(self._images, self._crop_px, strict=True)
        }
        for slide, stains in zip(self.slides, self.stains or [], strict=False):
            slides[slide]["stains"] = stains.to_dict()
        return {
            "patch_size": self.patch_size,
            "mpp": self.mpp,
            "field": self.field,
            "stain_normalization": self.stain_normalization,
            "pad_value": ArrayImage.pad_value,
            "slides": slides,
        }
