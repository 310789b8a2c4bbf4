"""compare_methods: methods cross-validated in parallel processes give the results of a serial run."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from histo2expr import datasets, pp, settings
from histo2expr._benchmark import Scheme, compare_methods

METHODS = ["stnet", "ridge"]
SCHEMES = [Scheme(key_suffix="_loso"), Scheme("leave_one_patient_out", "_lopo", "patient")]
KEYS = [method + scheme.key_suffix for scheme in SCHEMES for method in METHODS]


@pytest.fixture(scope="module")
def embedded():
    adata = datasets.synthetic(n_slides=3, seed=0, spots_per_side=6, n_genes=30)
    pp.normalize(adata)
    adata.obsm["X_histo"] = np.random.default_rng(0).normal(size=(adata.n_obs, 16)).astype(np.float32)
    return adata


def test_methods_run_in_parallel_processes_give_the_serial_results(embedded, capfd):
    serial, parallel = embedded.copy(), embedded.copy()
    kwargs = {"genes": 20, "epochs": 2, "progress": False, "accelerator": "cpu"}
    with pytest.warns(UserWarning, match="share their patient") as serial_warnings:
        serial_runs = compare_methods(serial, METHODS, schemes=SCHEMES, n_jobs=1, **kwargs)
    capfd.readouterr()
    with (
        pytest.warns(UserWarning, match="share their patient") as parallel_warnings,  # passed on
        settings.override(verbosity="warning"),
    ):
        parallel_runs = compare_methods(parallel, METHODS, schemes=SCHEMES, n_jobs=2, **kwargs)
    assert "fitting" not in capfd.readouterr().err  # the processes keep the caller's verbosity
    assert {str(w.message) for w in parallel_warnings if w.category is UserWarning} == {
        str(w.message) for w in serial_warnings if w.category is UserWarning
    }
    assert [run.key for run in parallel_runs] == KEYS  # in the order asked, whichever ended first
    protocols = ["leave_one_slide_out", "leave_one_patient_out"]
    assert [run.protocol for run in parallel_runs] == [p for p in protocols for _ in METHODS]
    for before, after in zip(serial_runs, parallel_runs, strict=True):
        pd.testing.assert_frame_equal(before.folds, after.folds)
        assert after.seconds > 0 and after.peak_memory_mib > 0
    for key in KEYS:
        pd.testing.assert_frame_equal(serial.obsm[key], parallel.obsm[key])
        pd.testing.assert_series_equal(serial.obs[f"{key}_fold"], parallel.obs[f"{key}_fold"])
        pd.testing.assert_frame_equal(serial.uns[key]["gene_pcc"], parallel.uns[key]["gene_pcc"])
    assert list(parallel.obsm) == list(serial.obsm) and list(parallel.obs) == list(serial.obs)
    assert list(parallel.var) == list(serial.var)


def test_n_jobs_must_be_a_number_of_processes(embedded):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="`n_jobs` must be a positive number of processes or -1"):
            compare_methods(embedded.copy(), ["ridge"], n_jobs=bad)


def test_a_job_process_ends_when_its_parent_is_gone(monkeypatch):
    from histo2expr import _benchmark

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(_benchmark.os, "_exit", exit_now)
    with pytest.raises(SystemExit):  # no process has the id -1: the parent it was started by is gone
        _benchmark._exit_with_parent(-1, seconds=0.01)


def test_the_costliest_methods_are_started_first_with_shared_folds_counted_once(embedded):
    from histo2expr._benchmark import _expected_cost, _MethodJob, _SchemeRun
    from histo2expr.models import get_method

    def job(method, *schemes, **params):
        runs = [
            _SchemeRun(method + s.key_suffix, {"cv": s.cv, "patient_key": s.patient_key, **params})
            for s in schemes
        ]
        return _MethodJob(get_method(method), runs)

    loso, lopo = SCHEMES
    n_spots = embedded.n_obs  # slides S1, S2 of patient P1 and S3 of P2: 2 training slides per slide fold
    p1_fold = int((embedded.obs["patient"] == "P2").sum())  # P1 held out: trains on S3 alone
    assert _expected_cost(embedded, job("ridge", loso)) == 2 * n_spots
    assert _expected_cost(embedded, job("ridge", lopo)) == n_spots
    # P2's fold trains on S1 and S2, as slide S3's fold does: fitted once
    assert _expected_cost(embedded, job("ridge", loso, lopo)) == 2 * n_spots + p1_fold
    assert _expected_cost(embedded, job("nh2st", loso)) == 3 * 2 * n_spots  # an ensemble of 3 by default
    assert _expected_cost(embedded, job("nh2st", loso, ensemble=1)) == 2 * n_spots


def test_a_fold_two_schemes_train_on_the_same_spots_is_fitted_once_with_the_same_results(
    embedded, monkeypatch
):
    from histo2expr.tl import _fit

    fits = []
    fit_on = _fit._fit_on
    monkeypatch.setattr(
        _fit, "_fit_on", lambda inputs, train, **kw: fits.append(train) or fit_on(inputs, train, **kw)
    )
    kwargs = {"genes": 20, "epochs": 2, "progress": False, "accelerator": "cpu"}
    small = {"bleep": {"top_k": 5}}  # a trained method, seeded: the shared fold gives the same numbers
    shared = embedded.copy()
    with pytest.warns(UserWarning, match="share their patient"):
        compare_methods(shared, ["bleep"], schemes=SCHEMES, n_jobs=1, method_params=small, **kwargs)
    assert len(fits) == 3 + 1  # three slide folds, then only P1's patient fold: P2's is slide S3's
    for scheme in SCHEMES:  # each scheme alone, fitting every fold
        alone = embedded.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            compare_methods(alone, ["bleep"], schemes=[scheme], n_jobs=1, method_params=small, **kwargs)
        key = "bleep" + scheme.key_suffix
        pd.testing.assert_frame_equal(shared.uns[key]["folds"], alone.uns[key]["folds"])
        pd.testing.assert_frame_equal(shared.obsm[key], alone.obsm[key])
    assert len(fits) == 4 + 3 + 2
    with warnings.catch_warnings():  # outside compare_methods nothing is shared
        warnings.simplefilter("ignore", UserWarning)
        from histo2expr import tl

        for scheme in SCHEMES:
            tl.fit_histo2expr(
                embedded.copy(),
                method="stnet",
                cv=scheme.cv,
                patient_key=scheme.patient_key,
                refit=False,
                **kwargs,
            )
    assert len(fits) == 9 + 3 + 2


def _job(method, *schemes, **params):
    from histo2expr._benchmark import _MethodJob, _SchemeRun
    from histo2expr.models import get_method

    runs = [
        _SchemeRun(method + s.key_suffix, {"cv": s.cv, "patient_key": s.patient_key, **params})
        for s in schemes
    ]
    return _MethodJob(get_method(method), runs)


def _drain(schedule):
    tasks = []
    while (task := schedule.next()) is not None:
        tasks.append(task)
    return tasks


def test_frozen_fits_are_fold_tasks_costliest_first_and_other_regimes_are_method_tasks(embedded):
    from histo2expr._benchmark import _CrossValidationTask, _FoldFitTask, _Schedule

    loso, lopo = SCHEMES
    frozen = _Schedule(embedded, [_job("ridge", loso, lopo, genes=20), _job("nh2st", loso, lopo, genes=20)])
    tasks = _drain(frozen)
    assert frozen.n_tasks == len(tasks) == 2 * (3 + 1)  # per method: 3 slide folds and P1's patient fold
    assert all(isinstance(task, _FoldFitTask) for task in tasks)  # the cross-validations wait for their fits
    costs = [
        (3 if task.job.method_class.name == "nh2st" else 1) * len(_train(embedded, task)) for task in tasks
    ]
    assert costs == sorted(costs, reverse=True)  # nh2st's ensemble of 3 first, the most training spots first
    assert [task.job.method_class.name for task in tasks[:4]] == ["nh2st"] * 4
    # planning the adapted regime builds nothing: its activation cache is the fit's own work
    adapted = _Schedule(embedded, [_job("stnet", loso, lopo, genes=20, regime="adapted")])
    assert [(type(task), task.runs) for task in _drain(adapted)] == [(_CrossValidationTask, [0, 1])]
    end2end = _Schedule(
        embedded, [_job("stnet", loso, lopo, use_rep=None), _job("nh2st", loso, use_rep=None)]
    )
    tasks = _drain(end2end)  # a method's cross-validations together, fitting their own (shared) folds
    assert [(type(task), task.job.method_class.name, task.runs) for task in tasks] == [
        (_CrossValidationTask, "nh2st", [0]),
        (_CrossValidationTask, "stnet", [0, 1]),
    ]
    assert not any(task.fits for task in tasks)


def _train(adata, task):
    from histo2expr.tl import _fold_fit_plan

    plan = _fold_fit_plan(adata, **task.job.fit_arguments(task.job.runs[task.run]))
    return plan.folds[task.fold].train


def test_a_methods_folds_fitted_in_other_processes_give_the_serial_results_and_intervals(monkeypatch):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from histo2expr import _benchmark
    from histo2expr.tl import _fit

    # five slides: S1, S2 of P1, S3, S4 of P2, S5 of P3; every fold trains on two slides at least, as
    # intervals need; P3's patient fold is slide S5's
    embedded = datasets.synthetic(n_slides=5, seed=0, spots_per_side=6, n_genes=30)
    pp.normalize(embedded)
    embedded.obsm["X_histo"] = np.random.default_rng(0).normal(size=(embedded.n_obs, 16)).astype(np.float32)
    kwargs = {"genes": 20, "epochs": 2, "accelerator": "cpu", "intervals": True}  # calibration refits too
    small = {"top_k": 5}
    serial = embedded.copy()
    with warnings.catch_warnings(), settings.override(n_threads=1):
        warnings.simplefilter("ignore", UserWarning)
        serial_runs = compare_methods(
            serial, ["bleep"], schemes=SCHEMES, progress=False, method_params={"bleep": small}, **kwargs
        )
    schedule = _benchmark._Schedule(embedded, [_job("bleep", *SCHEMES, seed=0, **kwargs, **small)])
    fold_tasks = _drain(schedule)
    assert len(fold_tasks) == 5 + 2
    context = multiprocessing.get_context("spawn")
    start = (_benchmark._start_worker, (embedded, 1, 0))  # one thread, as the serial run
    with (
        ProcessPoolExecutor(1, context, initializer=start[0], initargs=start[1]) as first,
        ProcessPoolExecutor(1, context, initializer=start[0], initargs=start[1]) as second,
    ):
        futures = [(first, second)[i % 2].submit(_benchmark._in_worker, t) for i, t in enumerate(fold_tasks)]
        results = [future.result() for future in futures]
    assert len({process for _, _, process, _ in results}) == 2
    for task, (fit, *_) in zip(fold_tasks, results, strict=True):
        schedule.done(task, fit)
    cross_validations = _drain(schedule)
    assert [task.runs for task in cross_validations] == [[0], [1]]
    fits = []
    fit_on = _fit._fit_on
    monkeypatch.setattr(
        _fit, "_fit_on", lambda inputs, train, **kw: fits.append(kw["genes"]) or fit_on(inputs, train, **kw)
    )
    parallel = embedded.copy()  # a third copy, in this process
    with warnings.catch_warnings(), settings.override(n_threads=1):
        warnings.simplefilter("ignore", UserWarning)
        ended, own = {}, {}
        for task in cross_validations:
            results_of_task = task(parallel)
            own |= {run.key: run.seconds for run, _ in results_of_task}  # before the fits are counted
            ended |= schedule.done(task, results_of_task)
    # the folds taken (fitted on a number of genes chosen in the fold), only the calibrations refitted (on its genes)
    assert fits and all(isinstance(genes, list) for genes in fits)
    for before in serial_runs:
        after, _ = ended[before.key]
        pd.testing.assert_frame_equal(before.folds, after.folds)
        for key in (before.key, f"{before.key}_lower", f"{before.key}_upper"):
            pd.testing.assert_frame_equal(serial.obsm[key], parallel.obsm[key])
        # its seconds: its own and those of the fits it is the first to train on (P3's fold is counted in loso)
        counted = [
            fit.seconds
            for task, (fit, *_) in zip(fold_tasks, results, strict=True)
            if task.job.runs[task.run].key == before.key
        ]
        assert len(counted) == (5 if before.key == "bleep_loso" else 2)
        assert after.seconds == pytest.approx(own[before.key] + sum(counted))


def test_benchmark_jobs_count_fold_fits_in_the_frozen_regime_and_methods_in_the_others(monkeypatch):
    import argparse

    from histo2expr import _settings, cli

    monkeypatch.setattr(_settings, "available_cpus", lambda: 4)

    def n_jobs(jobs, regime, device="cpu"):
        return cli._n_jobs(argparse.Namespace(jobs=jobs, regime=regime, device=device), 2)

    assert n_jobs(3, "frozen") == 3  # more processes than methods: their folds fit at once
    assert n_jobs("auto", "frozen") == 4
    assert n_jobs(3, "adapted") == n_jobs(3, "end2end") == 2  # a job per method
    assert n_jobs("auto", "adapted") == 1


def test_a_method_of_main_is_refused_before_any_process_starts(embedded):
    from histo2expr._benchmark import _MethodJob, _Schedule, _SchemeRun
    from histo2expr.models.ridge import RidgeMethod

    class Scripted(RidgeMethod):
        name = "scripted"

    Scripted.__module__ = "__main__"  # as if defined in the script that calls compare_methods
    with pytest.raises(ValueError, match=r"'scripted' is defined in __main__.*or pass `n_jobs=1`"):
        _Schedule(embedded, [_MethodJob(Scripted, [_SchemeRun("scripted", {"cv": "leave_one_slide_out"})])])
