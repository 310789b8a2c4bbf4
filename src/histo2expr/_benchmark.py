"""Several methods cross-validated on identical folds and genes, timed, and their report.

The engine of ``histo2expr demo`` and ``histo2expr benchmark``: every method runs
:func:`histo2expr.tl.fit_histo2expr` with the same cross-validation, gene rule and seed
(so the same folds and, fold by fold, the same genes chosen on the training slides), and
its wall time and peak resident memory are measured while it runs.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

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
    """One method's cross-validation: its protocol and key, fold table, wall time and peak resident memory."""

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
        Methods cross-validated at once. 1: one after the other in this process. More: each method
        (its cross-validations under every scheme) in a fresh process (at most ``n_jobs`` at a
        time) on a copy of ``adata``, with :attr:`hx.settings.n_threads
        <histo2expr._settings.Histo2ExprSettings.n_threads>` threads when set, else the available
        CPUs divided by ``n_jobs`` (at least one), the costliest first (training spots over the
        folds times fits per fold, e.g. ``ensemble=3``); the results are those of a serial run with
        the same thread count. ``-1``: one job per available CPU. Either way a method's schemes
        share the folds they train on the same spots: such a fold is fitted once (e.g.
        leave-one-patient-out's fold of a one-slide patient is leave-one-slide-out's fold of that
        slide), with the results of fitting it again.
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
    n_jobs = min(available_cpus() if n_jobs == -1 else n_jobs, len(jobs))
    runs: dict[str, MethodRun] = {}
    with progress_bar(total=len(jobs) * len(schemes), desc="cross-validations", disable=not progress) as bar:
        for run in _run_jobs(adata, jobs, n_jobs):
            runs[run.key] = run
            bar.update(1)
            if progress:
                n_counted = int(metrics.counted_slides(run.folds).sum())
                bar.write(
                    f"{run.method}: PCC(ACG) {metrics.summarize(run.folds)['pcc_acg']:.3f} over {n_counted} "
                    f"held-out slides ({run.protocol}) in {run.seconds:.1f} s"
                )
    return [runs[method + scheme.key_suffix] for scheme in schemes for method in methods]


@dataclass
class _SchemeRun:
    """One cross-validation of a method: its ``key_added`` and the other arguments of ``fit_histo2expr``."""

    key: str
    fit_kwargs: dict[str, Any]


@dataclass
class _MethodJob:
    """One method's cross-validations, one per scheme, run in one process so that they share their folds."""

    method_class: type[Method]
    runs: list[_SchemeRun]


def _run_jobs(adata: AnnData, jobs: Sequence[_MethodJob], n_jobs: int) -> Iterator[MethodRun]:
    """Run ``jobs`` on ``adata``, here one by one or in ``n_jobs`` fresh processes; yield their runs in order."""
    if n_jobs == 1:
        for job in jobs:
            yield from _cross_validate(adata, job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ._settings import available_cpus, settings

    for job in jobs:
        if job.method_class.__module__ == "__main__":
            msg = (
                f"Method {job.method_class.name!r} is defined in __main__, which the processes of `n_jobs` > 1 "
                "cannot import; define it in a module (or a package with a `histo2expr.methods` entry point), "
                "or pass `n_jobs=1`."
            )
            raise ValueError(msg)
    n_threads = settings.n_threads or max(1, available_cpus() // n_jobs)
    # fresh interpreters ("spawn"): forking a process whose torch / OpenMP threads already ran can hang
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        n_jobs, context, initializer=_start_worker, initargs=(adata, n_threads, settings.verbosity)
    )
    with pool:
        # the costliest first, so that no long run starts last while the other processes idle
        by_cost = sorted(jobs, key=lambda job: _expected_cost(adata, job), reverse=True)
        submitted = {id(job): pool.submit(_cross_validate_in_worker, job) for job in by_cost}
        futures = [submitted[id(job)] for job in jobs]
        try:
            for future in futures:  # in order: the AnnData of a serial run
                results, caught = future.result()
                for message, category in caught:  # as if raised here, at the caller of compare_methods
                    warnings.warn(message, category, stacklevel=3)
                for run, fields in results:
                    _set_result_fields(adata, run.key, fields)
                    yield run
        finally:
            for future in futures:
                future.cancel()


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
    kwargs = job.runs[0].fit_kwargs  # the schemes differ in cv and patient_key only
    members = kwargs.get("ensemble", getattr(job.method_class.settings_class, "ensemble", 1))
    return members * sum(trained.values())


def _cross_validate(adata: AnnData, job: _MethodJob) -> list[MethodRun]:
    """Cross-validate one method under each scheme on ``adata`` (its results written there), each timed."""
    from . import tl
    from ._shared_folds import sharing_fold_fits

    runs = []
    with sharing_fold_fits():
        for run in job.runs:
            tic = time.perf_counter()
            with PeakMemory() as memory:
                tl.fit_histo2expr(
                    adata,
                    method=job.method_class.name,
                    key_added=run.key,
                    progress=False,
                    refit=False,
                    **run.fit_kwargs,
                )
            record = adata.uns[run.key]
            seconds = time.perf_counter() - tic
            runs.append(
                MethodRun(
                    job.method_class.name,
                    record["folds"],
                    seconds,
                    memory.peak_mib,
                    record["protocol"],
                    run.key,
                )
            )
    return runs


#: Warnings of a process started by :func:`_run_jobs` that are not passed on to the caller.
_NOT_PASSED_ON = (DeprecationWarning, PendingDeprecationWarning, ImportWarning)
#: The AnnData of a process started by :func:`_run_jobs` (a copy of the caller's, sent once per process).
_worker_adata: AnnData | None = None


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


def _cross_validate_in_worker(
    job: _MethodJob,
) -> tuple[list[tuple[MethodRun, dict[str, dict[str, Any]]]], list[tuple[str, type[Warning]]]]:
    """:func:`_cross_validate` in a process of :func:`_run_jobs`: each run with the result fields it wrote; the warnings."""
    from ._keys import result_fields
    from .models import register_method

    if _worker_adata is None:
        msg = "_cross_validate_in_worker runs in the processes of _run_jobs only."
        raise RuntimeError(msg)
    adata = _worker_adata  # with the results of this process's earlier jobs, as in a serial run
    register_method(job.method_class)  # a method registered at run time is not in this process's registry
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # all of them to the caller, whose filters decide
        runs = _cross_validate(adata, job)
    results = []
    for run in runs:
        fields = {
            attribute: {
                name: getattr(adata, attribute)[name] for name in names if name in getattr(adata, attribute)
            }
            for attribute, names in result_fields(run.key).items()
        }
        fields["uns"] = {run.key: adata.uns[run.key]}
        results.append((run, fields))
    # the libraries' deprecation notes (often raised on their first import, in this fresh process) stay here
    passed_on = [w for w in caught if not issubclass(w.category, _NOT_PASSED_ON)]
    return results, [(str(w.message), w.category) for w in passed_on]


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
        "and peak resident memory of the process while the method's cross-validation ran. Leave-one-slide-out "
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
