"""The histo2expr cache folder: bounded in size (least recently used first out), written atomically.

Files appear in the cache only complete: they are written under a temporary name in the target
folder and renamed into place (:func:`atomic_path`); a failed write removes its temporary file, and
temporary files that a killed process left behind are removed by the next clean-up.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._settings import settings

#: Marker in the names of files being written.
_TMP_MARK = ".tmp"
#: Temporary files untouched for this long belong to a process that died; they are removed.
_STALE_SECONDS = 6 * 3600


def cache_dir(sub: str) -> Path:
    """Return (and create) a sub-folder of the cache folder :attr:`hx.settings.cache_dir`.

    The cache only ever holds files that can be rebuilt from the user's data (decoded images,
    the synthetic cohort, ONNX exports of encoders), so deleting it is safe.
    """
    path = settings.cache_dir / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it to ``target`` when the block succeeds.

    The block may write a file or a folder (a zarr store) there. When the block raises, the
    temporary file or folder is removed and the error propagates; ``target`` is never seen
    half-written. A folder replaces an existing ``target`` folder in two renames.
    """
    tmp = target.with_name(f".{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TMP_MARK}{target.suffix}")
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():  # a folder cannot be renamed onto a non-empty one
            old = tmp.with_name(f"{tmp.name}.old{_TMP_MARK}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and _TMP_MARK in path.name


def remove_temporaries(folder: Path, *, older_than: float = 0.0) -> None:
    """Remove the temporary files and folders of :func:`atomic_path` in ``folder`` untouched for ``older_than`` seconds.

    Those of a process that was killed while writing; with ``older_than=0``, also those being
    written right now by another process.
    """
    now = time.time()
    for path in folder.iterdir():
        try:
            stale = _is_temporary(path) and now - path.stat().st_mtime >= older_than
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        if stale:
            _remove(path)


def mark_used(path: Path) -> None:
    """Record that a cached file was just used (its modification time orders the eviction)."""
    try:
        os.utime(path)
    except OSError:  # read-only cache: eviction then goes by creation order
        pass


def make_room(folder: Path, needed: int, *, what: str) -> None:
    """Free space in ``folder`` for a new file of ``needed`` bytes within :attr:`hx.settings.cache_max_bytes`.

    Removes leftover temporary files of dead processes, then the least recently used files until
    the folder plus the new file fit in the bound. Raises when the new file alone exceeds the bound
    or the free disk space.
    """
    limit = settings.cache_max_bytes
    if needed > limit:
        msg = (
            f"{what} needs {needed / 2**30:.1f} GiB in the cache, more than its bound "
            f"`hx.settings.cache_max_bytes` ({limit / 2**30:.1f} GiB). Raise the bound, e.g. "
            f"`hx.settings.cache_max_bytes = {int(needed * 1.5)}`, or convert the image to a tiled TIFF, "
            "which is read tile by tile without decoding it whole."
        )
        raise ValueError(msg)
    remove_temporaries(folder, older_than=_STALE_SECONDS)
    files = []
    for path in folder.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        if path.is_file() and not _is_temporary(path):
            files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files, key=lambda item: item[0]):
        if total + needed <= limit:
            break
        try:
            path.unlink(missing_ok=True)  # open memory maps of it stay valid until they are closed
        except OSError:  # in use where files cannot be removed while open (Windows)
            continue
        total -= size
    free = shutil.disk_usage(folder).free
    if needed > free:
        msg = (
            f"{what} needs {needed / 2**30:.1f} GiB in the cache at {folder}, but the disk has "
            f"{free / 2**30:.1f} GiB free. Point `hx.settings.cache_dir` at a larger disk, or convert the "
            "image to a tiled TIFF, which is read without decoding it whole."
        )
        raise OSError(msg)
