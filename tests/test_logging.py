"""The package logger and hx.settings.verbosity; the keys module and the one writer that logs what it wrote."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import histo2expr as hx
from histo2expr import _logging as logg
from histo2expr._keys import FIT_KEY, PREDICT_KEY, Key, result_fields, write_fields

FIT = {"method": "ridge", "genes": 6, "cv": "leave_one_slide_out", "progress": False}


def lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "histo2expr"]


def tiny_cohort(n_slides: int = 3, seed: int = 0) -> AnnData:
    """The synthetic cohort (small), normalised, with random frozen features: what is logged, not how well."""
    with hx.settings.override(verbosity="warning"):
        adata = hx.datasets.synthetic(n_slides=n_slides, seed=seed, spots_per_side=8, n_genes=12)
        hx.pp.normalize(adata)
    adata.obsm["X_histo"] = np.random.default_rng(seed).normal(size=(adata.n_obs, 4)).astype(np.float32)
    del adata.obs["patient"]  # slides as the units: no warning about folds that share a patient
    return adata


def fields(adata: AnnData) -> set[tuple[str, str]]:
    return {
        (attribute, name) for attribute in ("obs", "obsm", "var", "uns") for name in getattr(adata, attribute)
    }


# --- hx.settings.verbosity -------------------------------------------------------------------------------


def test_verbosity_takes_numbers_and_names_and_sets_the_logger_level():
    logger = logging.getLogger("histo2expr")
    assert hx.settings.verbosity == 2 and hx.settings.verbosity.name == "info"  # the default shows info
    for value, level in [
        (0, logging.ERROR),
        ("warning", logging.WARNING),
        ("HINT", logg.HINT),
        (4, logging.DEBUG),
    ]:
        with hx.settings.override(verbosity=value):
            assert logger.level == level
    assert logger.level == logging.INFO and "verbosity = <Verbosity.info: 2>" in repr(hx.settings)
    for bad in (5, -1, True, "loud", 2.0, None):
        with pytest.raises(ValueError, match=r"hx.settings.verbosity` must be one of 0 \('error'\)"):
            hx.settings.verbosity = bad
    assert hx.settings.verbosity == 2  # a refused value changes nothing


def test_override_restores_every_setting_even_after_an_error():
    before = repr(hx.settings)
    with pytest.raises(RuntimeError), hx.settings.override(verbosity="debug", n_threads=3):
        assert hx.settings.verbosity == 4 and hx.settings.n_threads == 3
        raise RuntimeError
    assert repr(hx.settings) == before
    with pytest.raises(AttributeError, match="no setting"), hx.settings.override(verbose=3):
        pass
    with pytest.raises(ValueError, match="verbosity"), hx.settings.override(n_threads=2, verbosity="loud"):
        pass
    assert repr(hx.settings) == before  # a refused value restores what was already changed


def test_messages_carry_scanpy_style_timings(histo2expr_log):
    start = logg.info("computing something")
    logg.info("    finished", time=start)
    assert lines(histo2expr_log) == ["computing something", "    finished (0:00:00)"]
    with hx.settings.override(verbosity="info"):
        logg.hint("a hint")
    with hx.settings.override(verbosity="hint"):
        logg.hint("shown hint")
    assert lines(histo2expr_log)[2:] == ["shown hint"]


def test_the_default_handler_prints_to_stderr(capsys):
    logg.info("to the terminal")
    assert capsys.readouterr().err == "to the terminal\n"
    with hx.settings.override(verbosity="warning"):
        logg.info("not shown")
    assert capsys.readouterr().err == ""


# --- the writer -----------------------------------------------------------------------------------------


def test_writer_logs_every_field_added_updated_and_removed(histo2expr_log):
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.obsm["old"] = np.zeros((3, 1))
    adata.obs["kept"] = 1.0
    start = logg.info("writing")
    write_fields(
        adata,
        obs={"kept": [1.0, 2.0, 3.0], "new": ["a", "b", "c"]},
        obsm={"emb": np.ones((3, 2))},
        uns={"record": {"x": 1}},
        remove={"obsm": ["old", "absent"]},
        start=start,
    )
    assert lines(histo2expr_log) == [
        "writing",
        "    removed adata.obsm['old']",
        "    updated adata.obs['kept']",
        "    added adata.obs['new']",
        "    added adata.obsm['emb']",
        "    added adata.uns['record']",
        "    finished (0:00:00)",
    ]
    assert "old" not in adata.obsm and adata.uns["record"] == {"x": 1}
    assert list(adata.obs["kept"]) == [1.0, 2.0, 3.0]


def test_normalize_says_what_it_added_and_is_quiet_below_info(histo2expr_log):
    adata = AnnData(sp.csr_matrix(np.random.default_rng(0).poisson(3, (5, 4)).astype(np.float32)))
    with hx.settings.override(verbosity="warning"):
        hx.pp.normalize(adata.copy())
    assert lines(histo2expr_log) == []
    hx.pp.normalize(adata)
    assert lines(histo2expr_log) == [
        "normalizing counts per spot to 10000, then log1p",
        "    updated adata.X",
        "    added adata.obs['total_counts']",
        "    added adata.layers['counts']",
        "    added adata.uns['log1p']",
        "    finished (0:00:00)",
    ]


# --- fit / predict: messages and the keys they write ---------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    adata = tiny_cohort()
    before = fields(adata)
    with hx.settings.override(verbosity="warning"):
        model = hx.tl.fit_histo2expr(adata, intervals=True, **FIT)
    return model, fields(adata) - before


def test_fit_and_predict_write_exactly_the_keys_the_keys_module_lists(fitted):
    model, written = fitted
    listed = {(attribute, name) for attribute, names in result_fields(FIT_KEY).items() for name in names}
    not_by_cv = {("obsm", Key.obsm.embedding(FIT_KEY)), ("obs", Key.obs.similarity(FIT_KEY))}
    assert written == listed - not_by_cv | {("uns", Key.uns.record(FIT_KEY))}
    new = tiny_cohort(1, seed=1)
    before = fields(new)
    with hx.settings.override(verbosity="warning"):
        hx.tl.predict_expression(new, model)
    listed = {(attribute, name) for attribute, names in result_fields(PREDICT_KEY).items() for name in names}
    cv_only = {("obs", Key.obs.fold(PREDICT_KEY))} | {a for a in listed if a[0] == "var"}
    no_retrieval = {("obs", Key.obs.similarity(PREDICT_KEY))}  # ridge has no gallery
    assert fields(new) - before == listed - cv_only - no_retrieval | {("uns", Key.uns.record(PREDICT_KEY))}


def test_fit_logs_its_start_every_fold_and_each_key_with_timings(histo2expr_log):
    adata = tiny_cohort()
    hx.tl.fit_histo2expr(adata, **FIT)
    said = lines(histo2expr_log)
    assert (
        said[0] == f"fitting ridge (frozen) on {adata.n_obs} spots of 3 slides, leave_one_slide_out: 3 folds"
    )
    for slide, n_spots in adata.obs["slide"].value_counts().items():
        assert f"    fold {slide}: {adata.n_obs - n_spots} training spots, {n_spots} held out" in said
        assert any(
            re.fullmatch(rf"    fold {slide}: mean held-out gene PCC -?\d\.\d{{3}} \(0:00:\d\d\)", s)
            for s in said
        )
    assert re.fullmatch(r"    final model: finished \(0:00:\d\d\)", said[-9])
    assert said[-8:-1] == [
        "    added adata.obs['histo2expr_fold']",
        "    added adata.var['histo2expr_cv_pcc']",
        "    added adata.var['histo2expr_cv_pcc_low']",
        "    added adata.var['histo2expr_cv_pcc_high']",
        "    added adata.var['histo2expr_predictable']",
        "    added adata.obsm['histo2expr']",
        "    added adata.uns['histo2expr']",
    ]
    assert re.fullmatch(r"    finished \(0:00:\d\d\)", said[-1])
    histo2expr_log.clear()
    with hx.settings.override(verbosity="warning"):
        hx.tl.fit_histo2expr(adata, **FIT)
    assert lines(histo2expr_log) == []


def test_predict_and_evaluate_log_start_keys_and_end(fitted, histo2expr_log):
    model, _ = fitted
    new = tiny_cohort(1, seed=2)
    hx.tl.evaluate_expression(new, model)
    said = lines(histo2expr_log)
    assert said[0] == f"evaluating ridge on {new.n_obs} spots with measured expression"
    assert said[1] == f"predicting 6 genes with ridge on {new.n_obs} spots of 1 slide (training scale)"
    assert "    added adata.obsm['histo2expr_pred_lower']" in said
    assert said[-2] == "    updated adata.uns['histo2expr_pred']"  # evaluate adds its scores to the record
    hx.tl.predict_expression(new, model)  # a rerun replaces its own results
    assert "    updated adata.obsm['histo2expr_pred']" in lines(histo2expr_log)
