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
