"""Lazy access to full-resolution slide images.

A slide image is opened as a :class:`LazyImage`: its pixels are never decoded more
than once and never held in memory as a whole. Uncompressed TIFFs are memory-mapped
directly; any other format (JPEG, PNG, compressed TIFF) is decoded once into an
uncompressed ``.npy`` file in the histo2expr cache and memory-mapped from there. The cache
is bounded (``hx.settings.cache_max_bytes``, least recently used images out first) and an
image of more than ``hx.settings.max_image_pixels`` pixels is refused before it is decoded.

Pixel modes: 8-bit RGB is used as is; greyscale, palette, CMYK and RGB(A) with an
alpha channel are converted to RGB (alpha is composited over white) with a warning;
16-bit or floating-point images are refused, because their intensity scale is
unknown and H&E encoders expect 8-bit colour.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._cache import atomic_path, cache_dir, make_room, mark_used
from .._settings import settings

#: Value used for pixels outside the image (white, like the glass around tissue).
PAD_VALUE = 255

#: Rows copied at a time from a decoded image into the cache.
_DECODE_STRIP_ROWS = 512

_CONVERTIBLE_MODES = {"L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "1"}


def _refuse_depth(path: Path, what: str) -> ValueError:
    msg = (
        f"Image {path} has {what} pixels; histo2expr needs an 8-bit RGB H&E image. Convert it to "
        "8-bit RGB first (e.g. rescale to 0-255 and save as TIFF or PNG)."
    )
    return ValueError(msg)


def to_rgb_uint8(array: np.ndarray, *, source: str | Path = "image") -> np.ndarray:
    """Return ``array`` as ``(H, W, 3)`` uint8, converting grey / alpha, refusing other depths.

    Parameters
    ----------
    array
        ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` pixel array.
    source
        Name used in warnings and errors.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise _refuse_depth(Path(source), f"{array.dtype} ({array.dtype.itemsize * 8}-bit)")
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 2)):
        grey = array if array.ndim == 2 else array[..., 0]
        warnings.warn(f"{source} is greyscale; it is replicated to three RGB channels.", stacklevel=3)
        return np.repeat(grey[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 4:
        warnings.warn(f"{source} has an alpha channel; it is composited over white.", stacklevel=3)
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        rgb = array[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    msg = f"{source} has shape {array.shape}; expected (height, width) or (height, width, 3 or 4) pixels."
    raise ValueError(msg)


def _pil_to_rgb(image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode.startswith("I") or mode == "F":
        raise _refuse_depth(path, f"PIL mode {mode!r} (16-bit or floating-point)")
    if mode not in _CONVERTIBLE_MODES:
        msg = f"Image {path} has the unsupported PIL mode {mode!r}; save it as 8-bit RGB."
        raise ValueError(msg)
    if "A" in mode or (mode in ("P", "PA") and "transparency" in image.info):
        return to_rgb_uint8(np.asarray(image.convert("RGBA")), source=path)
    warnings.warn(f"Image {path} has mode {mode!r}; it is converted to RGB.", stacklevel=4)
    return np.asarray(image.convert("RGB"))


@contextmanager
def no_pixel_limit() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the block; :func:`check_pixel_count` guards instead.

    Pillow's limit (about 179 megapixels) is far below a slide's size; histo2expr's own limit,
    ``hx.settings.max_image_pixels``, is checked wherever an image is decoded whole.
    """
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_pixel_count(path: Path, height: int, width: int) -> None:
    """Refuse to decode an image of more pixels than ``hx.settings.max_image_pixels`` (decompression bombs)."""
    limit = settings.max_image_pixels
    if limit is None or height * width <= limit:
        return
    size = path.stat().st_size if path.is_file() else 0
    msg = (
        f"Image {path} claims {width} x {height} pixels ({height * width / 1e9:.2f} billion, from a file of "
        f"{size / 2**20:.1f} MiB), more than `hx.settings.max_image_pixels` ({limit:,}); decoding it would "
        "need that many pixels x 3 bytes of disk and time. If the file is what it claims, convert it to a "
        "tiled TIFF (read tile by tile, never decoded whole) or raise `hx.settings.max_image_pixels`."
    )
    raise ValueError(msg)


#: First bytes of the image formats histo2expr reads with Pillow or tifffile, and the suffixes they go by.
_SIGNATURES = {
    b"\xff\xd8\xff": ("JPEG", ".jpg"),
    b"\x89PNG\r\n\x1a\n": ("PNG", ".png"),
    b"II*\x00": ("TIFF", ".tif"),
    b"MM\x00*": ("TIFF", ".tif"),
    b"II+\x00": ("TIFF", ".tif"),
    b"MM\x00+": ("TIFF", ".tif"),
}
_FORMAT_OF_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}
#: How a complete JPEG or PNG file ends, looked for in its last bytes.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL_BYTES = 65536


def check_image_file(path: Path) -> None:
    """Raise a clear ValueError when an image file is empty, not an image, misnamed or cut off.

    Reads only the first and last bytes (and, for a TIFF, its directory): a JPEG, PNG or TIFF file
    must start with its format's signature, match its suffix, and a JPEG or PNG must end with its
    end marker, a TIFF hold all the bytes its directory points to.
    """
    expected = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if expected is None:  # whole-slide formats are checked by their readers
        return
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(max(0, size - _TAIL_BYTES))
        tail = handle.read()
    found = next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)
    if found is None:
        what = "empty (0 bytes)" if size == 0 else f"not an image (it starts with {head!r})"
        msg = f"Image {path} is {what}. Copy or export the {expected} image again."
        raise ValueError(msg)
    name, suffix = found
    if name != expected:
        msg = f"Image {path} is a {name} file named {path.suffix}. Rename it to {path.with_suffix(suffix).name}."
        raise ValueError(msg)
    if name in _END_MARKERS and _END_MARKERS[name] not in tail:
        msg = (
            f"Image {path} is cut off: it lacks the end marker every complete {name} file has (an interrupted "
            "copy or download?). Copy the image again."
        )
        raise ValueError(msg)


def unreadable_image(path: Path, error: Exception) -> ValueError:
    """The clear error of an image file its decoder cannot read."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    msg = f"Image {path} cannot be read ({reason}); it is damaged or not an image. Copy or export it again."
    return ValueError(msg)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Return ``(height, width)`` of an image file without decoding its pixels.

    Damaged files raise a ValueError naming the problem (:func:`check_image_file`).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Image file {path} does not exist; check the path recorded for this slide."
        raise FileNotFoundError(msg)
    check_image_file(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                level = tif.series[0].levels[0]
                shape, axes = level.shape, level.axes
                ends = [
                    o + c
                    for page in level.pages
                    if page is not None  # a page the file lacks
                    for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
                ]
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as error:
            raise unreadable_image(path, error) from error
        if ends and max(ends) > path.stat().st_size:
            msg = (
                f"Image {path} is cut off: its pixel data run past the end of the file. Copy the image again."
            )
            raise ValueError(msg)
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    from PIL import Image, UnidentifiedImageError

    try:
        with no_pixel_limit(), Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise unreadable_image(path, error) from error
    return int(height), int(width)


def _cache_key(path: Path) -> str:
    stat = path.stat()
    token = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha1(token.encode()).hexdigest()[:20]


def _decode_into(path: Path, tmp: Path, shape: tuple[int, int]) -> None:
    """Decode ``path`` into a new ``.npy`` at ``tmp``; Pillow images strip by strip."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        pixels = to_rgb_uint8(
            tifffile.imread(path, level=0) if _is_pyramid(path) else tifffile.imread(path), source=path
        )
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=pixels.shape)
        out[:] = pixels
        del pixels
    else:
        from PIL import Image

        with no_pixel_limit(), Image.open(path) as image:
            rgb = image if image.mode == "RGB" else Image.fromarray(_pil_to_rgb(image, path))
            height, width = shape
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(height, width, 3))
            for top in range(0, height, _DECODE_STRIP_ROWS):
                bottom = min(top + _DECODE_STRIP_ROWS, height)
                out[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)))
    out.flush()
    del out


def _decode_to_cache(path: Path) -> Path:
    """Decode ``path`` once into an uncompressed ``.npy`` in the cache; return its path.

    The pixel count is checked first (:func:`check_pixel_count`) and room is made in the bounded
    cache (:func:`histo2expr._cache.make_room`); the file is written under a temporary name and
    renamed when complete, so a failed decode leaves nothing behind. Pillow-decoded images are
    copied in strips of rows, so that besides Pillow's own decoded image only one strip is held.
    """
    folder = cache_dir("images")
    target = folder / f"{path.stem}-{_cache_key(path)}.npy"
    if target.exists():
        mark_used(target)
        return target
    import tifffile

    height, width = read_image_size(path)  # a damaged file fails here, clearly
    check_pixel_count(path, height, width)
    make_room(folder, 3 * height * width, what=f"Decoding {path.name} ({width} x {height} px)")
    try:
        with atomic_path(target) as tmp:
            _decode_into(path, tmp, (height, width))
    except (OSError, SyntaxError, struct.error, tifffile.TiffFileError) as error:
        raise unreadable_image(path, error) from error
    return target


def _is_pyramid(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return len(tif.series[0].levels) > 1


def _tiff_memmap(path: Path) -> np.ndarray | None:
    """Memory-map an uncompressed, contiguous 8-bit RGB TIFF, else return None."""
    import tifffile

    try:
        pixels = tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        return None
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return None
    return pixels


def _shrink(image: Any, size: tuple[int, int]) -> np.ndarray:  # image: PIL.Image.Image
    from PIL import Image

    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.array(image)


def _target_size(width: int, height: int, max_px: int) -> tuple[tuple[int, int], float]:
    if max_px < 1:
        msg = f"`hires_max_px` must be a positive number of pixels, got {max_px}."
        raise ValueError(msg)
    scale = min(1.0, max_px / max(width, height))
    return (max(1, round(width * scale)), max(1, round(height * scale))), scale


def downscale_pixels(pixels: np.ndarray, *, max_px: int = 2000) -> tuple[np.ndarray, float]:
    """Like :func:`histo2expr.io._slides.downscale_image` for an ``(h, w, 3)`` uint8 array already in memory."""
    from PIL import Image

    size, scale = _target_size(pixels.shape[1], pixels.shape[0], max_px)
    return _shrink(Image.fromarray(pixels), size), scale


class _Pixels(Protocol):
    """The pixels of an image (:attr:`ArrayImage.pixels`), shape ``(H, W, 3)``, uint8.

    An array, or an array-like that reads only the region it is indexed with (slices of step 1),
    as a level of a slide pyramid does.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W, 3)``."""

    def __getitem__(self, key: Any, /) -> np.ndarray:
        """The pixels of a region, e.g. ``pixels[y0:y1, x0:x1]``."""


class ArrayImage:
    """An RGB image held as an array (e.g. a downscaled ``uns`` image), read region by region.

    The images of :func:`~histo2expr.io.open_slide_image` (files read lazily) share its interface:
    ``shape`` and ``read_region``.

    Parameters
    ----------
    pixels
        ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 pixels: grey levels are repeated over
        the three channels (with a warning), an alpha channel is composited over white.
    """

    #: Every channel of a pixel outside the image in :meth:`read_region`: white, as the glass around tissue.
    pad_value = PAD_VALUE

    def __init__(self, pixels: np.ndarray) -> None:
        self._pixels = to_rgb_uint8(pixels, source="the stored image")

    @property
    def pixels(self) -> _Pixels:
        """The whole image, shape ``(H, W, 3)``."""
        return self._pixels

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        height, width = self.pixels.shape[:2]
        return height, width

    def downscaled(self, max_px: int = 2000) -> tuple[np.ndarray, float]:
        """The image shrunk (Lanczos) so that its long side is at most ``max_px``, and its scale factor.

        The scale factor is downscaled pixels per pixel of this image: what ``uns["spatial"][slide]
        ["scalefactors"]["tissue_hires_scalef"]`` records beside the ``"hires"`` image.
        """
        return downscale_pixels(self.read_region(0, 0, *self.shape), max_px=max_px)

    def prepare(self) -> None:
        """Make the first region read fast: nothing to do for pixels in memory or read tile by tile."""

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Return the ``(height, width, 3)`` uint8 region; pixels outside the image are white."""
        pixels = self.pixels
        out = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
        img_h, img_w = pixels.shape[:2]
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + height, img_h), min(left + width, img_w)
        if y1 > y0 and x1 > x0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
        return out


class LazyImage(ArrayImage):
    """A full-resolution RGB image file read region by region.

    Parameters
    ----------
    path
        Image file: JPEG, PNG, TIFF or anything Pillow reads.

    Notes
    -----
    The pixels are memory-mapped, so a region read touches only the rows it needs;
    the object pickles as its path, so it can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            msg = f"Image file {self.path} does not exist; check the path recorded for this slide."
            raise FileNotFoundError(msg)
        self._mapped: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_mapped": None}

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels, from the file header when the pixels are not mapped yet."""
        if self._mapped is None:
            return read_image_size(self.path)
        return tuple(self._mapped.shape[:2])

    def close(self) -> None:
        """Drop the memory map; the next read maps the image again."""
        self._mapped = None

    def prepare(self) -> None:
        """Decode a compressed image file into the histo2expr cache now, once, instead of on its first read."""
        if self._mapped is None:
            _ = self.pixels
            self.close()

    @property
    def pixels(self) -> np.ndarray:
        """The whole image as a read-only memory map of shape ``(H, W, 3)``."""
        if self._mapped is None:
            mapped = _tiff_memmap(self.path) if self.path.suffix.lower() in (".tif", ".tiff") else None
            if mapped is None:
                mapped = np.load(_decode_to_cache(self.path), mmap_mode="r")
            self._mapped = mapped
        return self._mapped
