"""Whole-slide images read region by region, level by level, never whole.

:func:`open_slide_image` picks the reader of a slide file:

- vendor formats (``.svs``, ``.ndpi``, ``.mrxs``, ...) through OpenSlide (:class:`OpenSlideImage`, the
  optional ``histo2expr[wsi]`` extra);
- tiled or pyramidal TIFF, OME-TIFF included, through tifffile (:class:`TiffImage`): only the tiles a
  region touches are decoded;
- anything else (JPEG, PNG, TIFF stored in strips) through :class:`~histo2expr.io._image.LazyImage`,
  memory-mapped or decoded once into the cache.

All three have the interface the patch layer reads (``shape`` and ``read_region``) and pickle as their
path, so they can be handed to DataLoader workers; the two pyramid readers also open any other level
of the same file (:meth:`PyramidImage.at_level`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ._image import ArrayImage, LazyImage, to_rgb_uint8

#: Formats read through OpenSlide.
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
#: Formats read through tifffile (OME-TIFF ends in ``.ome.tif``).
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
#: Plain image formats, read through Pillow.
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Decoded tiles kept per open TIFF level (neighbouring patches share tiles).
TILE_CACHE_BYTES = 64 * 2**20
#: How to install the optional OpenSlide dependency.
WSI_EXTRA = 'pip install "histo2expr[wsi]"'


def import_openslide(path: str | Path) -> Any:
    """Return the ``openslide`` module, or raise naming the extra that installs it."""
    try:
        import openslide
    except (ImportError, OSError) as error:
        msg = (
            f"Reading {Path(path).name} needs OpenSlide, which is not installed ({error}). Install it with "
            f"`{WSI_EXTRA}` (openslide-python and the OpenSlide library from openslide-bin)."
        )
        raise ImportError(msg) from error
    return openslide


class _LevelPixels:
    """An ``(H, W, 3)`` uint8 array-like over one level: indexing reads only that region.

    Supports basic slicing with step 1 (what :class:`~histo2expr.io._image.ArrayImage` and
    :func:`dask.array.from_array` use); never converts the whole level to an array.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, int], read: Any) -> None:
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self._read = read

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = (*key, slice(None), slice(None), slice(None))[:3]
        bounds = []
        for axis, item in enumerate(key[:2]):
            if not isinstance(item, slice) or item.step not in (None, 1):
                msg = f"Slide pixels are read by region: index with slices of step 1, got {item!r}."
                raise IndexError(msg)
            start, stop, _ = item.indices(self.shape[axis])
            bounds.append((start, max(start, stop)))
        (y0, y1), (x0, x1) = bounds
        if y1 == y0 or x1 == x0:
            return np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)[:, :, key[2]]
        return self._read(y0, y1, x0, x1)[:, :, key[2]]


class PyramidImage(ArrayImage):
    """One level of a multi-resolution slide file, read region by region (base of the pyramid readers).

    Parameters
    ----------
    path
        The slide file.
    level
        Pyramid level read (0: full resolution).

    Attributes
    ----------
    level_shapes
        ``(height, width)`` of every level of the file.
    downsamples
        Full-resolution pixels per pixel of every level.
    """

    def __init__(self, path: str | Path, *, level: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"Slide file {self.path} does not exist; check the path recorded for this slide."
            raise FileNotFoundError(msg)
        self.level_shapes = self._level_shapes()
        if (
            isinstance(level, bool)
            or not isinstance(level, int | np.integer)
            or not 0 <= level < len(self.level_shapes)
        ):
            msg = (
                f"`level={level!r}` does not exist in {self.path.name}, which has {len(self.level_shapes)} "
                f"level(s) of (height, width) {self.level_shapes}; use 0 to {len(self.level_shapes) - 1}."
            )
            raise ValueError(msg)
        self.level = int(level)
        top_width = self.level_shapes[0][1]
        self.downsamples = [top_width / shape[1] for shape in self.level_shapes]
        self._level_pixels: _LevelPixels | None = None
        self._handle: Any = None

    def _level_shapes(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _open(self) -> tuple[Any, Any]:
        """Open the file: ``(handle, read(y0, y1, x0, x1) -> (h, w, 3) uint8)``."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_level_pixels": None, "_handle": None}

    def __repr__(self) -> str:
        height, width = self.shape
        return f"{type(self).__name__}({self.path.name!r}, level={self.level}, {width} x {height} px)"

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of this level in pixels."""
        return self.level_shapes[self.level]

    @property
    def pixels(self) -> _LevelPixels:
        """The level as an array-like of shape ``(H, W, 3)``; indexing it reads only that region."""
        if self._level_pixels is None:
            self._handle, read = self._open()
            self._level_pixels = _LevelPixels(self.shape, read)
        return self._level_pixels

    def close(self) -> None:
        """Close the file; the next read opens it again."""
        handle, self._handle, self._level_pixels = self._handle, None, None
        if handle is not None:
            handle.close()

    def at_level(self, level: int) -> PyramidImage:
        """The same file read at another level."""
        return type(self)(self.path, level=level)


class TiffImage(PyramidImage):
    """A tiled or pyramidal TIFF (OME-TIFF included) read with tifffile, decoding only the tiles needed.

    Levels are those of the file's first series (OME / SubIFD pyramids, or the reduced pages tifffile
    recognises). 8-bit RGB is read as is; grey and RGBA are converted (one warning when opened);
    other pixel types are refused. The most recently used decoded tiles are kept, up to
    ``TILE_CACHE_BYTES`` (64 MiB) per open image, since neighbouring patches share tiles.
    """

    def _level_shapes(self) -> list[tuple[int, int]]:
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            shapes = []
            for level in series.levels:
                axes = level.axes
                if "Y" not in axes or "X" not in axes:
                    msg = f"{self.path.name} has axes {axes!r}; a slide image needs Y and X axes."
                    raise ValueError(msg)
                extra = {a: n for a, n in zip(axes, level.shape, strict=True) if a not in "YXSC" and n > 1}
                if extra:
                    msg = (
                        f"{self.path.name} holds a stack ({extra}); histo2expr reads one 2-D RGB image. "
                        "Save the plane you need as its own file."
                    )
                    raise ValueError(msg)
                shapes.append((int(level.shape[axes.index("Y")]), int(level.shape[axes.index("X")])))
            if series.dtype != np.uint8:
                to_rgb_uint8(np.zeros((1, 1), dtype=series.dtype), source=self.path)  # raises
        return shapes

    def _open(self) -> tuple[Any, Any]:
        import tifffile
        import zarr

        tif = tifffile.TiffFile(self.path)
        series = tif.series[0]
        axes = series.levels[self.level].axes
        array = zarr.open_array(series.aszarr(level=self.level), mode="r")
        kept = [a for a in axes if a in "YXSC"]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]

        def raw(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            index = tuple(
                slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a in "SC" else 0
                for a in axes
            )
            block = np.transpose(np.asarray(array[index]), order)
            return block[:, :, 0] if block.ndim == 3 and block.shape[2] == 1 else block

        def rgb(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # announced once, when the file was opened
                return to_rgb_uint8(raw(y0, y1, x0, x1), source=self.path)

        to_rgb_uint8(raw(0, 1, 0, 1), source=self.path)
        height, width = self.shape
        tile_h, tile_w = array.chunks[axes.index("Y")], array.chunks[axes.index("X")]
        if 3 * tile_h * tile_w > TILE_CACHE_BYTES // 8:  # large strips or untiled: read regions directly
            return tif, rgb
        cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        capacity = TILE_CACHE_BYTES // (3 * tile_h * tile_w)

        def tile(row: int, col: int) -> np.ndarray:
            block = cache.pop((row, col), None)
            if block is None:
                top, left = row * tile_h, col * tile_w
                block = rgb(top, min(top + tile_h, height), left, min(left + tile_w, width))
                if len(cache) >= capacity:
                    cache.popitem(last=False)
            cache[(row, col)] = block
            return block

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
            for row in range(y0 // tile_h, (y1 - 1) // tile_h + 1):
                for col in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
                    top, left = row * tile_h, col * tile_w
                    a, b = max(y0, top), min(y1, top + tile_h)
                    c, d = max(x0, left), min(x1, left + tile_w)
                    out[a - y0 : b - y0, c - x0 : d - x0] = tile(row, col)[
                        a - top : b - top, c - left : d - left
                    ]
            return out

        return tif, read


class OpenSlideImage(PyramidImage):
    """A vendor whole-slide image (Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX ``.mrxs``, ...) read with OpenSlide.

    Transparent pixels (outside the scanned area) are composited over white. Needs the
    ``histo2expr[wsi]`` extra.
    """

    def _level_shapes(self) -> list[tuple[int, int]]:
        openslide = import_openslide(self.path)
        with openslide.OpenSlide(str(self.path)) as slide:
            return [(int(h), int(w)) for w, h in slide.level_dimensions]

    def _open(self) -> tuple[Any, Any]:
        openslide = import_openslide(self.path)
        slide = openslide.OpenSlide(str(self.path))
        downsample = slide.level_downsamples[self.level]

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            origin = (round(x0 * downsample), round(y0 * downsample))
            rgba = np.asarray(slide.read_region(origin, self.level, (x1 - x0, y1 - y0)), dtype=np.float32)
            alpha = rgba[..., 3:4] / 255.0
            return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)

        return slide, read


def suffix_of(path: str | Path) -> str:
    """The lower-case file suffix that names the format (``.ome.tif`` counts as ``.tif``)."""
    return Path(path).suffix.lower()


def _tiff_is_tiled(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        return len(levels) > 1 or bool(levels[0].keyframe.is_tiled)


def open_slide_image(path: str | Path, *, level: int = 0) -> ArrayImage:
    """Open a slide image file for reading by region.

    Parameters
    ----------
    path
        The image file.
    level
        Pyramid level to read (0: full resolution); only pyramidal files have more than one.

    Returns
    -------
    The image, read lazily: its ``shape`` (height, width) in pixels and
    ``read_region(top, left, height, width)``, an RGB uint8 array. Vendor formats are read through
    OpenSlide, tiled or pyramidal TIFFs (and any level above 0) through tifffile, other images
    memory-mapped after one decode into the cache.
    """
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in OPENSLIDE_SUFFIXES:
        return OpenSlideImage(path, level=level)
    if suffix in TIFF_SUFFIXES and path.is_file() and (level != 0 or _tiff_is_tiled(path)):
        return TiffImage(path, level=level)
    if level != 0:
        msg = f"{path.name} is not a pyramidal image, so it has only level 0; got `level={level!r}`."
        raise ValueError(msg)
    return LazyImage(path)
