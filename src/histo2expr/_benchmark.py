"""Several methods cross-validated on identical folds and genes, timed, and their report.

The engine of ``histo2expr demo`` and ``histo2expr benchmark``: every method runs
:func:`histo2expr.tl.fit_histo2expr` with the same cross-validation, gene rule and seed
(so the same folds and, fold by fold, the same genes chosen on the training slides), and
its wall time and peak resident memory are measured while it runs.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import pickle
import platform
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import _logging as logg
from . import metrics

if TYPE_CHECKING:
    from anndata import AnnData

    from .models import Method

#: Metrics reported per method, in this order.
METRICS = ("pcc_acg", "pcc_heg50", "pcc_hvg50", "mse", "mae")
#: Seconds between two readings of the resident memory.
_SAMPLE_SECONDS = 0.02


@dataclass
class MethodRun:
    """One method's cross-validation: its protocol and key, fold table, wall time and peak resident memory.

    ``seconds``: the wall time of the cross-validation and of the fold fits it is the first of its
    method's schemes to train on (a fold shared with an earlier scheme is counted there), wherever
    they ran: in processes of their own (``n_jobs`` > 1), the sum of the fits' and the
    cross-validation's own seconds. ``peak_memory_mib``: the largest resident memory of a process
    while it ran any of them.
    """

    method: str
    folds: pd.DataFrame
    seconds: float
    peak_memory_mib: float | None
    protocol: str = "leave_one_slide_out"
    key: str = ""


class PeakMemory:
    """Peak resident memory (MiB) of this process while the ``with`` block runs.

    Reads ``/proc/self/statm`` every 20 ms in a background thread (Linux). Elsewhere
    :attr:`peak_mib` is the process's peak so far (``resource.getrusage``), which covers
    everything run before the block too; ``None`` where neither is available.
    """

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _current_mib() -> float | None:
        try:
            with open("/proc/self/statm") as handle:
                resident_pages = int(handle.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self.peak_mib = max(self.peak_mib or 0.0, self._current_mib() or 0.0)

    def __enter__(self) -> PeakMemory:
        self.peak_mib = self._current_mib()
        if self.peak_mib is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib or 0.0, self._current_mib() or 0.0)
            return
        try:
            import resource
        except ImportError:  # pragma: no cover - Windows
            return
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


@dataclass(frozen=True)
class Scheme:
    """A cross-validation scheme of :func:`compare_methods`: ``cv`` and ``patient_key`` of the fits, and their keys' suffix."""

    cv: str | int = "leave_one_slide_out"
    key_suffix: str = ""
    patient_key: str | None = None


def compare_methods(
    adata: AnnData,
    methods: Sequence[str],
    *,
    schemes: Sequence[Scheme] = (Scheme(),),
    genes: int | Sequence[str] = 250,
    seed: int = 0,
    progress: bool = True,
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    n_jobs: int = 1,
    **fit_kwargs: Any,
) -> list[MethodRun]:
    """Cross-validate every method on identical folds and genes, under each scheme.

    Parameters
    ----------
    adata
        Log-normalised AnnData (with frozen features for the frozen regime).
    methods
        Registered method names; each one's results go to ``uns[method + scheme.key_suffix]``.
    schemes
        The cross-validation schemes (``cv``, ``patient_key`` of :func:`~histo2expr.tl.fit_histo2expr`
        and the suffix that keeps their keys apart); leave-one-slide-out alone by default.
    genes, seed
        Passed to :func:`~histo2expr.tl.fit_histo2expr` for every method alike.
    progress
        Show one progress bar over the methods and print each one's result.
    method_params
        Extra parameters of single methods, by method name.
    n_jobs
        Processes fitting at once. 1: every cross-validation in this process, one after the other.
        More: at most ``n_jobs`` fresh processes, each on a copy of ``adata`` with
        :attr:`hx.settings.n_threads <histo2expr._settings.Histo2ExprSettings.n_threads>` threads when
        set, else the available CPUs divided by ``n_jobs`` (at least one); the results are those of
        a serial run with the same thread count, written in its order. In the frozen regime a task is
        one fold fit (a method's fits run in several processes at once), the costliest first
        (training spots times fits per fold, e.g. ``ensemble=3``); a scheme's cross-validation
        (predictions, scores, intervals) runs in a process once its folds are fitted. In the
        end-to-end and adapted regimes a task is a method's cross-validations under every scheme.
        ``-1``: one process per available CPU. Either way a method's schemes share the folds they
        train on the same spots: such a fold is fitted once (e.g. leave-one-patient-out's fold of a
        one-slide patient is leave-one-slide-out's fold of that slide), with the results of fitting
        it again.
    **fit_kwargs
        Further arguments of :func:`~histo2expr.tl.fit_histo2expr` for every method
        (e.g. ``use_rep``, ``epochs``, ``accelerator``).

    Returns
    -------
    One :class:`MethodRun` per scheme and method, in that order. Sets, per scheme and method, the
    fields of :func:`~histo2expr.tl.fit_histo2expr` with ``key = method + scheme.key_suffix``:
    ``.obsm[key]``, ``.obs[f"{key}_fold"]`` and ``.uns[key]``.
    """
    from ._progress import progress_bar
    from ._settings import available_cpus
    from .models import get_method

    methods = list(methods)
    if not methods:
        msg = "No methods to compare; pass at least one, e.g. ['ridge']."
        raise ValueError(msg)
    classes = [get_method(method) for method in methods]  # unknown names fail before anything runs
    if len(set(methods)) != len(methods):
        msg = f"Methods are listed twice in {methods}; each method is run once."
        raise ValueError(msg)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        msg = (
            f"`n_jobs` must be a positive number of processes or -1 (one per available CPU), got {n_jobs!r}."
        )
        raise ValueError(msg)
    jobs = [
        _MethodJob(
            cls,
            [
                _SchemeRun(
                    method + scheme.key_suffix,
                    {
                        "cv": scheme.cv,
                        "patient_key": scheme.patient_key,
                        "genes": genes,
                        "seed": seed,
                        **fit_kwargs,
                        **(method_params or {}).get(method, {}),
                    },
                )
                for scheme in schemes
            ],
        )
        for method, cls in zip(methods, classes, strict=True)
    ]
    runs: dict[str, MethodRun] = {}
    with progress_bar(total=len(jobs) * len(schemes), desc="cross-validations", disable=not progress) as bar:
        for run in _run_jobs(adata, jobs, available_cpus() if n_jobs == -1 else n_jobs):
            runs[run.key] = run
            bar.update(1)
            if progress:
                n_counted = int(metrics.counted_slides(run.folds).sum())
                bar.write(
                    f"{run.method}: PCC(ACG) {metrics.summarize(run.folds)['pcc_acg']:.3f} over {n_counted} "
                    f"held-out slides ({run.protocol}) in {run.seconds:.1f} s"
                )
    return [runs[method + scheme.key_suffix] for scheme in schemes for method in methods]


#: A cross-validation's result: its run and the result fields it wrote.
_Result = tuple[MethodRun, dict[str, dict[str, Any]]]


@dataclass
class _SchemeRun:
    """One cross-validation of a method: its ``key_added`` and the other arguments of ``fit_histo2expr``."""

    key: str
    fit_kwargs: dict[str, Any]


@dataclass
class _MethodJob:
    """One method's cross-validations, one per scheme; they fit each fold they train on the same spots once."""

    method_class: type[Method]
    runs: list[_SchemeRun]

    def fit_arguments(self, run: _SchemeRun) -> dict[str, Any]:
        """The arguments of :func:`~histo2expr.tl.fit_histo2expr` for ``run``, but the data."""
        return {"method": self.method_class.name, "key_added": run.key, "progress": False, "refit": False} | (
            run.fit_kwargs
        )


def _run_jobs(adata: AnnData, jobs: Sequence[_MethodJob], n_jobs: int) -> Iterator[MethodRun]:
    """Run ``jobs`` on ``adata``, here one by one or in ``n_jobs`` fresh processes; yield their runs in order.

    In processes, the tasks are those of :class:`_Schedule`: fold fits and the cross-validations that
    take them (or a method's cross-validations fitting their own folds). Logs each process's busy time.
    """
    schedule = None if n_jobs == 1 else _Schedule(adata, jobs)
    n_jobs = 1 if schedule is None else min(n_jobs, schedule.n_tasks)
    if schedule is None or n_jobs == 1:
        for job in jobs:
            yield from _cross_validate(adata, job, job.runs)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    from ._settings import available_cpus, settings

    n_threads = settings.n_threads or max(1, available_cpus() // n_jobs)
    # fresh interpreters ("spawn"): forking a process whose torch / OpenMP threads already ran can hang
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        n_jobs, context, initializer=_start_worker, initargs=(adata, n_threads, settings.verbosity)
    )
    order = [run.key for job in jobs for run in job.runs]  # the AnnData of a serial run
    finished: dict[str, _Result] = {}
    in_flight: dict[Future, _Task] = {}
    passed_on: set[tuple[str, type[Warning]]] = set()
    busy: dict[int, np.ndarray] = {}  # wall and CPU seconds of each process's tasks
    start = time.perf_counter()
    with pool:
        try:
            while order:
                while len(in_flight) < n_jobs and (task := schedule.next()) is not None:
                    in_flight[pool.submit(_in_worker, task)] = task
                if not in_flight:  # pragma: no cover - every cross-validation's fits are queued before it
                    msg = f"The cross-validations {order} wait for fold fits that no process makes."
                    raise RuntimeError(msg)
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    result, caught, process, seconds = future.result()
                    busy[process] = busy.get(process, 0.0) + np.array(seconds)
                    for message, category in caught:  # as if raised here, at the caller; each once
                        if (message, category) not in passed_on:
                            passed_on.add((message, category))
                            warnings.warn(message, category, stacklevel=3)
                    finished |= schedule.done(in_flight.pop(future), result)
                while order and order[0] in finished:
                    run, fields = finished.pop(order.pop(0))
                    _set_result_fields(adata, run.key, fields)
                    yield run
        finally:
            for future in in_flight:
                future.cancel()
    logg.info(
        f"cross-validations in {n_jobs} processes ({schedule.n_tasks} tasks at the start) for "
        f"{time.perf_counter() - start:.1f} s, each busy (CPU) for "
        + ", ".join(f"{wall:.1f} s ({cpu:.1f} s)" for wall, cpu in busy.values())
    )


def _members(job: _MethodJob) -> int:
    """Fits per fold of a method: its ``ensemble`` setting (the schemes differ in cv and patient_key only)."""
    kwargs = job.runs[0].fit_kwargs
    return kwargs.get("ensemble", getattr(job.method_class.settings_class, "ensemble", 1))


def _expected_cost(adata: AnnData, job: _MethodJob) -> int:
    """A method's work, for the order of :func:`_run_jobs`: the training spots of its distinct folds, times its fits per fold."""
    from .splits import make_folds

    trained: dict[bytes, int] = {}  # a fold that two schemes train on the same spots is fitted once
    for run in job.runs:
        kwargs = run.fit_kwargs
        folds = make_folds(
            adata, kwargs["cv"], slide_key=kwargs.get("slide_key", "slide"), patient_key=kwargs["patient_key"]
        )
        trained |= {np.sort(fold.train).tobytes(): len(fold.train) for fold in folds}
    return _members(job) * sum(trained.values())


def _cross_validate(
    adata: AnnData,
    job: _MethodJob,
    runs: Sequence[_SchemeRun],
    fits: Mapping[Hashable, Any] | None = None,
) -> list[MethodRun]:
    """Cross-validate one method under the schemes of ``runs`` on ``adata`` (its results written there), each timed.

    ``fits``: folds fitted before (on a copy of ``adata``), by key (see :func:`histo2expr._shared_folds.sharing_fold_fits`).
    """
    from . import tl
    from ._shared_folds import sharing_fold_fits

    method_runs = []
    with sharing_fold_fits(adata, fits):
        for run in runs:
            tic = time.perf_counter()
            with PeakMemory() as memory:
                tl.fit_histo2expr(adata, **job.fit_arguments(run))
            record = adata.uns[run.key]
            seconds = time.perf_counter() - tic
            method_runs.append(
                MethodRun(
                    job.method_class.name,
                    record["folds"],
                    seconds,
                    memory.peak_mib,
                    record["protocol"],
                    run.key,
                )
            )
    return method_runs


@dataclass
class _FittedFold:
    """A fold fitted by a :class:`_FoldFitTask`: the fit (pickled), its wall seconds and the process's peak memory."""

    fit: bytes
    seconds: float
    peak_memory_mib: float | None


@dataclass
class _FoldFitTask:
    """One distinct fold of a method, ``key``: fold ``fold`` of its cross-validation ``run``, the first that trains on its spots."""

    job: _MethodJob
    run: int
    fold: int
    key: Hashable

    def __call__(self, adata: AnnData) -> _FittedFold:
        from .tl import _fold_fit_plan

        run = self.job.runs[self.run]
        if run.key not in _worker_plans:  # planned once per process, which may fit several of its folds
            _worker_plans[run.key] = _fold_fit_plan(adata, **self.job.fit_arguments(run))
        plan = _worker_plans[run.key]
        assert plan is not None  # scheduled in the frozen regime only
        fold = plan.folds[self.fold]
        tic = time.perf_counter()
        with PeakMemory() as memory:
            fit = plan.fit(fold.train)
        seconds = time.perf_counter() - tic
        logg.info(
            f"{run.key}: fold {fold.name} fitted on {logg.counted(len(fold.train), 'training spot')} in "
            f"{seconds:.1f} s (process {os.getpid()})"
        )
        return _FittedFold(pickle.dumps(fit, pickle.HIGHEST_PROTOCOL), seconds, memory.peak_mib)


@dataclass
class _CrossValidationTask:
    """Cross-validations ``runs`` (indices) of a method, with the fold fits ``fits`` (pickled, by key); it fits the others."""

    job: _MethodJob
    runs: list[int]
    fits: dict[Hashable, bytes] = field(default_factory=dict)

    def __call__(self, adata: AnnData) -> list[_Result]:
        fits = {key: pickle.loads(fit) for key, fit in self.fits.items()}
        runs = _cross_validate(adata, self.job, [self.job.runs[i] for i in self.runs], fits)
        return [(run, _result_fields(adata, run.key)) for run in runs]


_Task = _FoldFitTask | _CrossValidationTask


class _Schedule:
    """The tasks of :func:`_run_jobs`' processes, and the order they run in.

    In the frozen regime, a method's tasks are its distinct fold fits (a fold that two schemes train on
    the same spots is fitted once, as :meth:`histo2expr.tl._fit._FitPlan.fold_key` tells) and, once the
    fits of a scheme's folds are in, that scheme's cross-validation, which takes them (predictions,
    scores, intervals, the results). In the other regimes (whose inputs are a fit's own work, e.g. the
    adapted regime's activation cache), and where a callable setting leaves a fit unidentifiable, a
    method's cross-validations are one task. The costliest first (training spots times fits per
    fold), a cross-validation ready to take its fits before all.

    A cross-validation's :attr:`MethodRun.seconds` adds to its own the wall seconds of the fold fits it
    is the first to train on (the folds a serial run fits in it), and its ``peak_memory_mib`` is the
    largest of their processes' peaks and its own.
    """

    def __init__(self, adata: AnnData, jobs: Sequence[_MethodJob]) -> None:
        for job in jobs:
            if job.method_class.__module__ == "__main__":
                msg = (
                    f"Method {job.method_class.name!r} is defined in __main__, which the processes of `n_jobs` > 1 "
                    "cannot import; define it in a module (or a package with a `histo2expr.methods` entry point), "
                    "or pass `n_jobs=1`."
                )
                raise ValueError(msg)
        # a heap: the highest priority first, then the first queued
        self._queue: list[tuple[float, int, _Task]] = []
        self._order = itertools.count()
        self._waiting: list[tuple[_CrossValidationTask, list[Hashable]]] = []  # and the fits each takes
        self._fits: dict[Hashable, bytes] = {}  # the fits a waiting cross-validation takes
        # by cross-validation: the fold fits it counts (their seconds and peaks, without the fits)
        self._counted: dict[str, list[_FittedFold]] = {}
        for job in jobs:
            self._add(adata, job)
        self.n_tasks = len(self._queue)

    def _add(self, adata: AnnData, job: _MethodJob) -> None:
        from .tl import _fold_fit_plan

        with warnings.catch_warnings():  # given by the processes that run the tasks
            warnings.simplefilter("ignore")
            plans = [_fold_fit_plan(adata, **job.fit_arguments(run)) for run in job.runs]
        folds = [
            [] if plan is None else [(plan.fold_key(fold.train), len(fold.train)) for fold in plan.folds]
            for plan in plans
        ]
        if None in plans or any(key is None for run_folds in folds for key, _ in run_folds):
            self._push(_expected_cost(adata, job), _CrossValidationTask(job, list(range(len(job.runs)))))
            return
        queued: set[Hashable] = set()
        for i, run_folds in enumerate(folds):
            for j, (key, n_train) in enumerate(run_folds):
                if key not in queued:
                    queued.add(key)
                    self._push(_members(job) * n_train, _FoldFitTask(job, i, j, key))
            self._waiting.append((_CrossValidationTask(job, [i]), [key for key, _ in run_folds]))

    def _push(self, priority: float, task: _Task) -> None:
        heapq.heappush(self._queue, (-priority, next(self._order), task))

    def next(self) -> _Task | None:
        """The task to run next; None while every task left runs or waits for fits."""
        return heapq.heappop(self._queue)[2] if self._queue else None

    def done(self, task: _Task, result: Any) -> dict[str, _Result]:
        """Take a task's result; return the cross-validations it ended, by key."""
        if isinstance(task, _CrossValidationTask):
            ended = {}
            for run, fields in result:
                counted = self._counted.pop(run.key, [])
                run.seconds += sum(fit.seconds for fit in counted)
                peaks = [run.peak_memory_mib, *(fit.peak_memory_mib for fit in counted)]
                run.peak_memory_mib = max((p for p in peaks if p is not None), default=None)
                ended[run.key] = (run, fields)
            return ended
        self._fits[task.key] = result.fit
        self._counted.setdefault(task.job.runs[task.run].key, []).append(replace(result, fit=b""))
        waiting = []
        for cross_validation, keys in self._waiting:
            if all(key in self._fits for key in keys):
                cross_validation.fits = {key: self._fits[key] for key in keys}
                self._push(math.inf, cross_validation)
            else:
                waiting.append((cross_validation, keys))
        self._waiting = waiting
        taken = {key for _, keys in waiting for key in keys}
        self._fits = {key: fit for key, fit in self._fits.items() if key in taken}
        return {}


#: Warnings of a process started by :func:`_run_jobs` that are not passed on to the caller.
_NOT_PASSED_ON = (DeprecationWarning, PendingDeprecationWarning, ImportWarning)
#: The AnnData of a process started by :func:`_run_jobs` (a copy of the caller's, sent once per process).
_worker_adata: AnnData | None = None
#: The plans of the cross-validations whose folds a process of :func:`_run_jobs` fitted, by key.
_worker_plans: dict[str, Any] = {}


def _start_worker(adata: AnnData, n_threads: int, verbosity: int) -> None:
    """Set up a process of :func:`_run_jobs`: its AnnData, threads and verbosity, and its end with the caller's."""
    from ._settings import settings

    global _worker_adata
    _worker_adata = adata
    settings.n_threads = n_threads
    settings.verbosity = verbosity
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, seconds: float = 1.0) -> None:
    """End this process once its parent ``parent`` has ended (killed, it cannot shut down its pool)."""
    while os.getppid() == parent:
        time.sleep(seconds)
    os._exit(1)


def _in_worker(task: _Task) -> tuple[Any, list[tuple[str, type[Warning]]], int, tuple[float, float]]:
    """``task`` in a process of :func:`_run_jobs`: its result and warnings, the process's id, its wall and CPU seconds."""
    from .models import register_method

    if _worker_adata is None:
        msg = "_in_worker runs in the processes of _run_jobs only."
        raise RuntimeError(msg)
    tic, cpu = time.perf_counter(), time.process_time()
    # a method registered at run time is not in this process's registry
    register_method(task.job.method_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # all of them to the caller, whose filters decide
        result = task(_worker_adata)
    # the libraries' deprecation notes (often raised on their first import, in this fresh process) stay here
    passed_on = [(str(w.message), w.category) for w in caught if not issubclass(w.category, _NOT_PASSED_ON)]
    return result, passed_on, os.getpid(), (time.perf_counter() - tic, time.process_time() - cpu)


def _result_fields(adata: AnnData, key: str) -> dict[str, dict[str, Any]]:
    """The result fields a fit with ``key_added=key`` wrote into ``adata``."""
    from ._keys import result_fields

    fields = {
        attribute: {
            name: getattr(adata, attribute)[name] for name in names if name in getattr(adata, attribute)
        }
        for attribute, names in result_fields(key).items()
    }
    fields["uns"] = {key: adata.uns[key]}
    return fields


def _set_result_fields(adata: AnnData, key: str, fields: Mapping[str, Mapping[str, Any]]) -> None:
    """Give ``adata`` the result fields of ``key`` that a fit on a copy of it wrote (removing those it left out)."""
    from ._keys import result_fields, write_fields

    write_fields(
        adata,
        obs=fields.get("obs"),
        var=fields.get("var"),
        obsm=fields.get("obsm"),
        uns=fields.get("uns"),
        remove=result_fields(key),
    )


def machine_description() -> dict[str, Any]:
    """Where a benchmark ran: platform, CPU cores, torch version and threads, accelerator."""
    import torch

    from ._settings import available_cpus

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "available_cpus": available_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def _mean_and_spread(values: pd.Series) -> str:
    values = values.dropna()
    if len(values) < 2:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _by_protocol(runs: Sequence[MethodRun]) -> dict[str, list[MethodRun]]:
    grouped: dict[str, list[MethodRun]] = {}
    for run in runs:
        grouped.setdefault(run.protocol, []).append(run)
    return grouped


def _small_slides_note(runs: Sequence[MethodRun]) -> list[str]:
    """A paragraph naming the held-out slides left out of the means, with PCC(ACG) over all slides."""
    folds = runs[0].folds
    left_out = folds[~metrics.counted_slides(folds).to_numpy()]
    if left_out.empty:
        return []
    slides = ", ".join(f"{row.slide} ({row.n_spots} spots)" for row in left_out.itertuples())
    all_slides = ", ".join(f"{run.method} {run.folds['pcc_acg'].mean():.3f}" for run in runs)
    return [
        f"Held-out slides with fewer than {metrics.MIN_SPOTS} spots are flagged and left out of these means "
        f"(their per-gene PCCs are mostly noise): {slides}. PCC(ACG) over all held-out slides: {all_slides}.",
        "",
    ]


def _protocol_tables(protocol: str, runs: Sequence[MethodRun], *, several: bool) -> list[str]:
    rows = []
    for run in runs:
        memory = "n/a" if run.peak_memory_mib is None else f"{run.peak_memory_mib:.0f}"
        counted = run.folds[metrics.counted_slides(run.folds).to_numpy()]
        rows.append(
            {
                "method": run.method,
                **{metric: _mean_and_spread(counted[metric]) for metric in METRICS},
                "seconds": f"{run.seconds:.1f}",
                "peak MiB": memory,
            }
        )
    per_slide = pd.DataFrame({run.method: run.folds.set_index("slide")["pcc_acg"] for run in runs})
    per_slide.index.name = "held-out slide"
    named = f"{protocol.replace('_', '-')}: " if several else ""
    return [
        f"## {named}mean over held-out slides (± standard deviation across them)",
        "",
        f"Protocol: {protocol.replace('_', '-')}.",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
        *_small_slides_note(runs),
        f"## {named}PCC(ACG) per held-out slide",
        "",
        per_slide.map(lambda v: f"{v:.3f}").to_markdown(),
        "",
        *_coverage_table(runs, named),
    ]


def _coverage_table(runs: Sequence[MethodRun], named: str) -> list[str]:
    """With intervals: each method's coverage and mean interval width per held-out slide, and their mean and worst."""
    runs = [run for run in runs if "coverage" in run.folds]
    if not runs:
        return []
    table = pd.concat(
        {run.method: run.folds.set_index("slide")[["coverage", "interval_width"]] for run in runs}, axis=1
    )
    worst = table.min().where([column == "coverage" for _, column in table.columns])
    table = pd.concat([table, table.mean().to_frame("mean").T, worst.to_frame("worst slide").T])
    table.index.name = "held-out slide"
    table.columns = [f"{method} {column.replace('_', ' ')}" for method, column in table.columns]
    return [
        f"## {named}prediction intervals per held-out slide",
        "",
        "Empirical coverage of the conformal intervals and their mean width (log-normalised expression).",
        "",
        table.astype(object).where(table.notna(), None).to_markdown(floatfmt=".3f", missingval=""),
        "",
    ]


def results_markdown(runs: Sequence[MethodRun], *, title: str, preamble: Sequence[str] = ()) -> str:
    """The report: per protocol, means over held-out slides (± their standard deviation), time, memory, per-slide PCC.

    Small held-out slides are left out of the means (:func:`histo2expr.metrics.counted_slides`); a
    paragraph names them and gives PCC(ACG) over all slides as well.
    """
    grouped = _by_protocol(runs)
    lines = [f"# {title}", "", *preamble]
    for protocol, protocol_runs in grouped.items():
        lines += _protocol_tables(protocol, protocol_runs, several=len(grouped) > 1)
    lines += [
        "PCC: Pearson correlation per gene across the spots of a held-out slide, averaged over all predicted "
        "genes (ACG) or the 50 most expressed / variable genes of that slide (HEG50 / HVG50); MSE and MAE in "
        "the per-gene standardised space of each fold's training slides. `seconds` and `peak MiB`: wall time "
        "and peak resident memory of the process while the method's cross-validation ran; with folds fitted in "
        "processes of their own, the sum of its fold fits' and its own seconds and the largest of their peaks, "
        "a fold shared with an earlier scheme counted there. Leave-one-slide-out "
        "scores a new section of the patients seen in training when patients contribute several slides; "
        "leave-one-patient-out scores a new patient.",
        "",
    ]
    return "\n".join(lines)


def results_json(
    runs: Sequence[MethodRun], *, settings: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Every metric per cross-validation scheme, method and held-out slide, with times, memory, settings, ``extra``.

    ``mean`` leaves small held-out slides out (:func:`histo2expr.metrics.summarize`),
    ``mean_all_slides`` averages every slide.
    """
    from . import __version__

    schemes: dict[str, dict[str, Any]] = {}
    for protocol, protocol_runs in _by_protocol(runs).items():
        methods = schemes.setdefault(protocol, {"methods": {}})["methods"]
        for run in protocol_runs:
            folds = run.folds.replace({np.nan: None})
            methods[run.method] = {
                "seconds": run.seconds,
                "peak_memory_mib": run.peak_memory_mib,
                "mean": {metric: float(metrics.summarize(run.folds)[metric]) for metric in METRICS},
                "mean_all_slides": {metric: float(run.folds[metric].mean()) for metric in METRICS},
                "per_slide": folds.to_dict(orient="records"),
            }
    return {
        "histo2expr": __version__,
        "settings": dict(settings),
        "machine": machine_description(),
        "cross_validation": schemes,
        **(extra or {}),
    }


def write_results(
    runs: Sequence[MethodRun],
    out: Path,
    *,
    markdown: str,
    settings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``results.json`` (with the top-level entries of ``extra``) and ``results.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(
        json.dumps(results_json(runs, settings=settings, extra=extra), indent=2, default=_plain) + "\n"
    )
    md_path.write_text(markdown)
    return [json_path, md_path]


def _plain(value: Any) -> Any:
    """Values json cannot write (numpy scalars and others) as plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
