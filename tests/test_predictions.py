"""Where predictions live: compact, never overwriting each other, one return rule, marked, ready for scanpy."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histo2expr as hx
from histo2expr.tl._scale import match_depth


@pytest.fixture(scope="module")
def cohort():
    """Three synthetic slides (patients P1, P1, P2), colour-texture features, 60 genes."""
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=8, n_genes=60)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False)
    return adata


def fit_cv(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*share their patient", category=UserWarning
        )  # tested below
        return hx.tl.fit_histo2expr(
            adata, genes=12, cv="leave_one_slide_out", progress=False, **{"method": "ridge", **kwargs}
        )


def snapshot(adata):
    """What a failed call must leave as it was."""
    return (
        sorted(adata.uns),
        sorted(adata.obsm),
        list(adata.obs.columns),
        sorted(adata.layers),
        {k: v.copy() for k, v in adata.obsm.items() if isinstance(v, pd.DataFrame)},
    )


def assert_unchanged(adata, before):
    after = snapshot(adata)
    assert after[:4] == before[:4]
    for key, frame in before[4].items():
        pd.testing.assert_frame_equal(adata.obsm[key], frame)


def test_cross_validation_and_prediction_have_distinct_default_keys(cohort):
    adata = cohort.copy()
    model = fit_cv(adata)
    oof = hx.get.predictions(adata, "histo2expr").copy()
    hx.tl.predict_expression(adata, model)
    pd.testing.assert_frame_equal(hx.get.predictions(adata, "histo2expr"), oof)  # untouched
    assert adata.uns["histo2expr"]["kind"] == "cross_validation" and "folds" in adata.uns["histo2expr"]
    assert adata.uns["histo2expr_pred"]["kind"] == "prediction"
    assert list(hx.get.predictions(adata, "histo2expr_pred").columns) == model.genes


def test_a_key_of_the_other_call_is_refused_and_the_anndata_left_as_it_was(cohort):
    adata = cohort.copy()
    model = fit_cv(adata)
    hx.tl.predict_expression(adata, model)
    before = snapshot(adata)
    with pytest.raises(
        ValueError, match=r"uns\['histo2expr'\].*fit_histo2expr.*key_added=.*'histo2expr_pred'"
    ):
        hx.tl.predict_expression(adata, model, key_added="histo2expr")
    assert_unchanged(adata, before)
    with pytest.raises(ValueError, match=r"predict_expression.*e\.g\. 'histo2expr'"):
        fit_cv(adata, key_added="histo2expr_pred")
    assert_unchanged(adata, before)
    with pytest.raises(ValueError, match=r"predict_expression"):
        hx.tl.evaluate_expression(adata, model, key_added="histo2expr")
    assert_unchanged(adata, before)


def test_replacing_another_methods_results_warns(cohort):
    adata = cohort.copy()
    fit_cv(adata, refit=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_cv(adata, refit=False, n_components=3)  # the same method and protocol: replaced silently
    with pytest.warns(
        UserWarning, match=r"Replacing the results at key 'histo2expr' \(ridge, leave_one_slide_out\)"
    ):
        fit_cv(adata, method="stnet", epochs=1, refit=False)
    assert adata.uns["histo2expr"]["method"] == "stnet"


def test_a_failed_fit_or_prediction_leaves_the_anndata_as_it_was(cohort):
    adata = cohort.copy()
    model = fit_cv(adata)
    before = snapshot(adata)
    with pytest.raises(TypeError):
        fit_cv(adata, method="ridge", key_added="other", no_such_parameter=1)  # fails inside the first fold
    assert_unchanged(adata, before)
    broken = adata.copy()
    broken.obsm["X_histo"] = broken.obsm["X_histo"][:, :3]
    before = snapshot(broken)
    with pytest.raises(ValueError, match="features per spot"):
        hx.tl.predict_expression(broken, model)
    assert_unchanged(broken, before)


@pytest.mark.parametrize("genes", ["all", "some", "none"], ids=["all genes", "some genes", "no genes"])
def test_one_return_rule_whichever_genes_the_data_has(cohort, genes):
    model = fit_cv(cohort.copy())
    keep = {"all": list(cohort.var_names), "some": list(cohort.var_names[:5]), "none": []}[genes]
    data = cohort[:, keep].copy()
    copy = hx.tl.predict_expression(data, model, copy=True)
    assert isinstance(copy, ad.AnnData) and "histo2expr_pred" not in data.obsm
    assert hx.tl.predict_expression(data, model) is None
    pd.testing.assert_frame_equal(data.obsm["histo2expr_pred"], copy.obsm["histo2expr_pred"])
    assert data.obsm["histo2expr_pred"].shape == (data.n_obs, len(model.genes))


def test_a_fitted_h5ad_grows_by_about_the_predictions_only(tmp_path):
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=12, n_genes=2000)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False)
    adata.write_h5ad(tmp_path / "before.h5ad")
    fit_cv(adata, refit=False)
    adata.write_h5ad(tmp_path / "after.h5ad")
    growth = (tmp_path / "after.h5ad").stat().st_size - (tmp_path / "before.h5ad").stat().st_size
    predictions = adata.obsm["histo2expr"]
    gene_pcc = adata.uns["histo2expr"]["gene_pcc"]
    # the predictions, their gene names and per-gene PCCs, the genes' predictability in var, and HDF5's
    # headers of each column and table
    predictability = sum(adata.var[c].to_numpy().nbytes for c in adata.var if c.startswith("histo2expr_"))
    bound = (
        predictions.to_numpy().nbytes
        + gene_pcc.to_numpy().nbytes
        + predictability
        + 1024 * predictions.shape[1]
        + 64 * 1024
    )
    assert growth <= bound, (growth, bound)
    dense_layer = adata.n_obs * adata.n_vars * 4  # what a layer over all genes took
    assert growth < dense_layer / 10
    back = ad.read_h5ad(tmp_path / "after.h5ad")
    pd.testing.assert_frame_equal(hx.get.predictions(back, "histo2expr"), predictions)
    assert hx.get.predicted_adata(back, "histo2expr").shape[1] == predictions.notna().all().sum()


def test_predicted_adata_is_marked_and_works_with_scanpy(cohort):
    import scanpy as sc

    adata = cohort.copy()
    fit_cv(adata)
    predicted = hx.get.predicted_adata(adata, "histo2expr")
    frame = hx.get.predictions(adata, "histo2expr")
    complete = list(frame.columns[frame.notna().all().to_numpy()])
    assert list(predicted.var_names) == complete and not np.isnan(predicted.X).any()
    marker = predicted.uns["predicted_expression"]
    assert marker["predicted"] and marker["method"] == "ridge" and marker["kind"] == "cross_validation"
    assert (
        marker["protocol"] == "leave_one_slide_out" and "training slides' sequencing depth" in marker["scale"]
    )
    expected_pcc = adata.uns["histo2expr"]["gene_pcc"].mean(axis=1).reindex(complete)
    np.testing.assert_allclose(predicted.var["cv_pcc"], expected_pcc)
    np.testing.assert_allclose(predicted.layers["measured"], adata[:, complete].X.toarray(), rtol=1e-6)
    predicted.obs["half"] = pd.Categorical(np.where(np.arange(predicted.n_obs) % 2, "a", "b"))
    sc.tl.rank_genes_groups(predicted, "half", layer="measured", method="t-test")
    sc.tl.rank_genes_groups(predicted, "half", method="t-test", key_added="on_predictions")
    assert predicted.uns["on_predictions"]["names"].shape[0] == len(complete)
    sc.pp.pca(predicted, n_comps=3)
    assert predicted.obsm["X_pca"].shape == (adata.n_obs, 3)
    with pytest.raises(KeyError, match="only on some slides"):
        hx.get.predicted_adata(adata, "histo2expr", genes=[c for c in frame.columns if c not in complete][:1])


def test_get_predictions_without_key_and_its_errors(cohort):
    adata = cohort.copy()
    with pytest.raises(KeyError, match="holds no predictions"):
        hx.get.predictions(adata)
    model = fit_cv(adata)
    assert hx.get.predictions(adata).shape[0] == adata.n_obs  # the only key
    hx.tl.predict_expression(adata, model)
    with pytest.raises(KeyError, match=r"several keys \['histo2expr', 'histo2expr_pred'\]"):
        hx.get.predictions(adata)
    hx.tl.fit_histo2expr(adata, method="ridge", genes=5, key_added="final", progress=False)
    with pytest.raises(KeyError, match="a fit without `cv` predicts nothing"):
        hx.get.predictions(adata, "final")


def test_leave_one_slide_out_warns_when_patients_repeat(cohort):
    adata = cohort.copy()
    with pytest.warns(
        UserWarning,
        match=r"2 of 3 folds hold out slides that share their patient.*S1 \(patient P1\).*"
        r"cv='leave_one_patient_out', patient_key='patient'.*2 patients",
    ):
        hx.tl.fit_histo2expr(adata, method="ridge", genes=12, cv="leave_one_slide_out", progress=False)
    assert adata.uns["histo2expr"]["protocol_note"].startswith("2 of 3 folds hold out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hx.tl.fit_histo2expr(  # another method on the same folds: said once per AnnData and protocol
            adata,
            method="ridge",
            genes=12,
            cv="leave_one_slide_out",
            key_added="again",
            n_components=3,
            progress=False,
        )
        assert adata.uns["again"]["protocol_note"] == adata.uns["histo2expr"]["protocol_note"]
        hx.tl.fit_histo2expr(
            adata,
            method="ridge",
            genes=12,
            cv="leave_one_patient_out",
            patient_key="patient",
            key_added="lopo",
            progress=False,
        )
        distinct = adata.copy()
        distinct.obs["patient"] = distinct.obs["slide"]
        hx.tl.fit_histo2expr(distinct, method="ridge", genes=12, cv="leave_one_slide_out", progress=False)
    assert (
        adata.uns["lopo"]["protocol"] == "leave_one_patient_out" and adata.uns["lopo"]["protocol_note"] == ""
    )


def test_depth_matching_recovers_what_a_shallower_slide_measures():
    rng = np.random.default_rng(0)
    target, deep, shallow = 1e4, 20_000.0, 1_500.0
    expression = np.exp(rng.normal(0.0, 2.0, size=40))  # per 10,000 counts
    measured = {
        depth: np.log1p(rng.poisson(expression * depth / target, size=(4000, 40)) * target / depth).mean(0)
        for depth in (deep, shallow)
    }
    matched = match_depth(measured[deep], training_depth=deep, depth=shallow, target=target)
    assert np.abs(measured[deep] - measured[shallow]).mean() > 0.2
    assert np.abs(matched - measured[shallow]).mean() < 0.03


def test_prediction_scales_and_warnings_about_unlike_slides(cohort):
    train = cohort[cohort.obs["slide"] != "S3"].copy()
    model = hx.tl.fit_histo2expr(train, method="ridge", genes=12, progress=False)
    assert model.params["training_data"]["target_sum"] == pytest.approx(1e4, rel=1e-4)
    new = cohort[cohort.obs["slide"] == "S3"].copy()
    hx.tl.predict_expression(new, model, scale="standardized", key_added="z")
    z = new.obsm["z"]
    np.testing.assert_allclose(z.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(ddof=0), 1.0, rtol=1e-4)
    hx.tl.predict_expression(new, model, key_added="log")
    hx.tl.predict_expression(new, model, scale="depth", key_added="depth")
    expected = match_depth(
        new.obsm["log"].to_numpy(),
        training_depth=model.params["training_data"]["library_size"],
        depth=float(np.median(new.obs["total_counts"])),
        target=model.params["training_data"]["target_sum"],
    )
    np.testing.assert_allclose(new.obsm["depth"].to_numpy(), expected, rtol=1e-5)
    assert new.uns["depth"]["scale"].startswith("expected log-normalised expression at this slide's")
    # a slide sequenced 20x more shallowly, and one stained differently: warned, with the numbers
    shallow = new.copy()
    shallow.obs["total_counts"] = shallow.obs["total_counts"] / 20
    with pytest.warns(
        UserWarning, match=r"Slide 'S3' was sequenced .* fewer than the training slides.*scale='depth'"
    ):
        hx.tl.predict_expression(shallow, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hx.tl.predict_expression(shallow, model, scale="depth", key_added="matched")  # asked for: no warning
    stained = new.copy()
    hires = stained.uns["spatial"]["S3"]["images"]["hires"]
    stained.uns["spatial"]["S3"]["images"]["hires"] = (255 - (255 - hires.astype(int)) // 3).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"H&E of slide 'S3' differs in colour from every training slide"):
        hx.tl.predict_expression(stained, model)
    he_only = new[:, :0].copy()
    del he_only.obs["total_counts"]
    before = snapshot(he_only)
    with pytest.raises(ValueError, match="library_size="):
        hx.tl.predict_expression(he_only, model, scale="depth")
    assert_unchanged(he_only, before)
    hx.tl.predict_expression(he_only, model, scale="depth", library_size=2000)
    with pytest.raises(ValueError, match="`scale` must be one of"):
        hx.tl.predict_expression(he_only, model, scale="counts")


def test_random_encoder_weights_are_seeded_and_the_suggested_fix_works(cohort):
    train = cohort[cohort.obs["slide"] != "S3"].copy()
    new = cohort[cohort.obs["slide"] == "S3"].copy()
    embed = {"encoder": "test_resnet", "weights": None, "patch_size": 32, "progress": False}
    hx.tl.embed_patches(train, **embed)
    hx.tl.embed_patches(new, **embed)  # another call, the same seed: the same weights
    assert train.uns["X_histo"]["encoder"]["weights_sha1"] == new.uns["X_histo"]["encoder"]["weights_sha1"]
    model = hx.tl.fit_histo2expr(train, method="ridge", genes=8, progress=False)
    hx.tl.predict_expression(new, model)
    hx.tl.embed_patches(new, **embed, seed=7)
    with pytest.raises(ValueError, match="other encoder weights") as error:
        hx.tl.predict_expression(new, model)
    call = re.search(r"`(hx\.tl\.embed_patches\(adata, [^`]*\))`", str(error.value)).group(1)
    assert "weights=None, seed=0, patch_size=32" in call
    eval(call, {"hx": hx, "adata": new})  # follow the suggestion as written
    hx.tl.predict_expression(new, model, key_added="after_the_fix")
    pd.testing.assert_frame_equal(new.obsm["after_the_fix"], new.obsm["histo2expr_pred"])
