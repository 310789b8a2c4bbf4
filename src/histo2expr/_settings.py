"""Package settings, ``hx.settings``: verbosity, CPU threads, the decoded-image cache, the image-size guard.

The thread policy lives here as one function, :func:`cpu_threads`, that every compute entry point
(embedding, fitting, predicting; whatever engine trains) runs inside, so that torch, the BLAS
libraries and data-loading workers never oversubscribe the CPUs this process may use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import _logging as logg
from ._logging import LEVELS, Verbosity, logger
from ._validation import level, positive_int_or_none

CACHE_ENV = "HISTO2EXPR_CACHE_DIR"
#: Default bound of the decoded-image cache, in bytes.
DEFAULT_CACHE_MAX_BYTES = 20 * 2**30
#: Default largest image (height x width) decoded whole: about a 46,000 x 46,000 pixel image.
DEFAULT_MAX_IMAGE_PIXELS = 2**31
#: Seconds over which the CPU use of other processes is sampled when threads are chosen.
_LOAD_SAMPLE_SECONDS = 0.1


class Histo2ExprSettings:
    """Settings of histo2expr, as ``hx.settings`` (like ``scanpy.settings``).

    Change an attribute to change the behaviour of every later call, e.g.
    ``hx.settings.n_threads = 4``, or of a block only, with :meth:`override`;
    ``print(hx.settings)`` shows the current values.
    """

    #: The settings, in the order ``print(hx.settings)`` shows them.
    _FIELDS = ("verbosity", "n_threads", "cache_dir", "cache_max_bytes", "max_image_pixels")

    def __init__(self) -> None:
        self._verbosity = Verbosity.info
        self._n_threads: int | None = None
        self._cache_dir: Path | None = None
        self._cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
        self._max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @property
    def verbosity(self) -> Verbosity:
        """How much histo2expr tells, from 0 (``"error"``) to 4 (``"debug"``); 2 (``"info"``) by default.

        Set a number or a name: 0 ``"error"``, 1 ``"warning"``, 2 ``"info"``, 3 ``"hint"``, 4
        ``"debug"``. At ``"info"`` every call says what it computes and how long it took
        (``finished (0:00:12)``), and which fields of the AnnData it added, updated or removed;
        ``"hint"`` adds what a call chose by itself (e.g. the number of CPU threads) and what the
        calls made for each slide of a cohort say; ``"warning"`` or ``"error"`` keep calls quiet.
        The messages go to ``logging.getLogger("histo2expr")`` (see :doc:`/logging`); warnings are
        Python warnings whatever the verbosity, and progress bars are turned off per call
        (``progress=False``).
        """
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        self._verbosity = Verbosity(level(value, tuple(LEVELS), "hx.settings.verbosity"))
        logger.setLevel(self._verbosity.logging_level)

    @property
    def n_threads(self) -> int | None:
        """CPU threads of torch and the BLAS libraries during histo2expr's computations.

        ``None`` (default): chosen at the start of every call: the CPUs this
        process may use (its CPU affinity, a cgroup CPU quota of a container, ``SLURM_CPUS_PER_TASK``),
        less those that other processes keep busy at that moment, at least one; ``OMP_NUM_THREADS``,
        when set, is taken as given. An integer fixes the number; set it for bit-identical reruns
        of methods whose results depend on the number of threads.
        """
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int | None) -> None:
        self._n_threads = positive_int_or_none(value, "hx.settings.n_threads")

    @property
    def cache_dir(self) -> Path:
        """The cache folder, which holds decoded slide images, synthetic cohorts and ONNX exports (safe to delete).

        Default: ``$HISTO2EXPR_CACHE_DIR`` when set, else ``~/.cache/histo2expr``.
        """
        if self._cache_dir is not None:
            return self._cache_dir
        root = os.environ.get(CACHE_ENV)
        return Path(root) if root else Path.home() / ".cache" / "histo2expr"

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike[str] | None) -> None:
        self._cache_dir = None if value is None else Path(value).expanduser()

    @property
    def cache_max_bytes(self) -> int:
        """Bound of the decoded-image cache in bytes (default 20 GiB).

        When a new decoded image would exceed it, the least recently used images are deleted
        first; an image larger than the bound alone is refused with an error that says how to
        read it without decoding (a tiled TIFF) or how to raise the bound.
        """
        return self._cache_max_bytes

    @cache_max_bytes.setter
    def cache_max_bytes(self, value: int) -> None:
        checked = positive_int_or_none(value, "hx.settings.cache_max_bytes")
        if checked is None:
            msg = "`hx.settings.cache_max_bytes` must be a positive number of bytes, e.g. 50 * 2**30."
            raise ValueError(msg)
        self._cache_max_bytes = checked

    @property
    def max_image_pixels(self) -> int | None:
        """Largest image, in pixels (height x width), that is decoded whole (default 2**31).

        Guards against decompression bombs (a small file that claims a huge image): JPEG, PNG and
        TIFFs stored in strips above the limit are refused before anything is decoded or written.
        Tiled and pyramidal TIFFs and OpenSlide formats are read tile by tile and not limited.
        ``None`` removes the guard.
        """
        return self._max_image_pixels

    @max_image_pixels.setter
    def max_image_pixels(self, value: int | None) -> None:
        self._max_image_pixels = positive_int_or_none(value, "hx.settings.max_image_pixels")

    @contextmanager
    def override(self, **values: Any) -> Iterator[Histo2ExprSettings]:
        """Change settings for a ``with`` block only; the previous values come back afterwards.

        Examples
        --------
        >>> with hx.settings.override(verbosity="warning", n_threads=2):
        ...     hx.tl.fit_histo2expr(adata, cv="leave_one_slide_out")  # doctest: +SKIP
        """
        unknown = sorted(set(values) - set(self._FIELDS))
        if unknown:
            msg = f"`hx.settings` has no setting {unknown}; the settings are {list(self._FIELDS)}."
            raise AttributeError(msg)
        previous = {name: getattr(self, f"_{name}") for name in values}
        try:
            for name, value in values.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in previous.items():
                setattr(self, name, value)

    def __repr__(self) -> str:
        lines = [f"    {name} = {getattr(self, name)!r}" for name in self._FIELDS]
        return "histo2expr settings:\n" + "\n".join(lines)


settings = Histo2ExprSettings()
#: Threads of the :func:`cpu_threads` block running now (None outside one).
_active_threads: int | None = None


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, a cgroup quota and ``SLURM_CPUS_PER_TASK``, the smallest.

    Affinity and cgroup quotas (v1 ``cpu.cfs_quota_us``, v2 ``cpu.max``) are read by joblib
    (:func:`joblib.cpu_count`), which scikit-learn uses for the same purpose.
    """
    import joblib

    counts = [joblib.cpu_count(only_physical_cores=False)]
    if (slurm := _slurm_cpus()) is not None:
        counts.append(slurm)
    return max(1, min(counts))


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle, total)}`` jiffies of ``cpus`` from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def busy_cpus() -> float:
    """How many of this process's CPUs are busy right now (sampled for 0.1 s; 0 where unknown)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    before = _cpu_times(cpus)
    if not before:
        return 0.0
    time.sleep(_LOAD_SAMPLE_SECONDS)
    after = _cpu_times(cpus) or {}
    busy = 0.0
    for cpu, (idle, total) in after.items():
        idle_before, total_before = before.get(cpu, (idle, total))
        if total > total_before:
            busy += 1.0 - (idle - idle_before) / (total - total_before)
    return busy


def compute_threads(num_workers: int = 0) -> int:
    """The number of compute threads a call uses now: see :attr:`Histo2ExprSettings.n_threads`.

    Parameters
    ----------
    num_workers
        Data-loading worker processes running beside the computation; each takes one of the
        CPUs, so that workers and compute threads together do not oversubscribe them.
    """
    if settings.n_threads is not None:
        threads = settings.n_threads
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        cpus = available_cpus()
        threads = min(cpus, round(cpus - busy_cpus())) if cpus > 1 else 1
    return max(1, threads - max(0, int(num_workers)))


@contextmanager
def cpu_threads(num_workers: int = 0) -> Iterator[int]:
    """Run the block with torch's intra-op threads and the BLAS / OpenMP pools set to :func:`compute_threads`.

    Every compute entry point runs inside it (any training engine inherits it). Nothing nests:
    torch and BLAS share the same number, DataLoader workers take one CPU each and run one
    torch thread (torch's default in workers). The previous numbers are restored afterwards.

    Yields
    ------
    The number of threads used.
    """
    import torch
    from threadpoolctl import threadpool_limits

    global _active_threads
    if _active_threads is not None:  # a call inside another one keeps its threads
        yield _active_threads
        return
    threads = compute_threads(num_workers)
    logg.hint(f"    computing on {threads} CPU thread{'s' if threads > 1 else ''} (hx.settings.n_threads)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    _active_threads = threads
    try:
        with threadpool_limits(limits=threads):
            yield threads
    finally:
        _active_threads = None
        torch.set_num_threads(previous)
