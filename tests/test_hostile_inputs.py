"""Hostile inputs (issue 21): every bad input is a clear error naming its fix, raised before any work,
with the AnnData left as it was; never a silent wrong answer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

import histo2expr as hx
from histo2expr import cli
from histo2expr.models import NH2STMethod, SpotSet, TrainConfig, available_methods, get_method
from histo2expr.models import ridge as ridge_module

pytestmark = pytest.mark.filterwarnings(
    "ignore:Method 'cmrcnet' takes image tokens:UserWarning", "ignore:zero-centering a sparse:UserWarning"
)

#: Method parameters that fit the tiny cohort (the retrieval methods' default top_k exceeds its spots).
SMALL = {"bleep": {"top_k": 10}, "chrep": {"top_k": 10}, "cmrcnet": {"top_k": 10}}


@pytest.fixture(scope="module")
def cohort():
    """Three slides of 48 spots, log-normalised, with frozen colour / texture features (a real encoder record)."""
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=7, n_genes=30)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False)
    return adata


def fit(adata, method="ridge", **kwargs):
    kwargs = {
        "genes": 10,
        "epochs": 2,
        "batch_size": 16,
        "progress": False,
        **SMALL.get(method, {}),
        **kwargs,
    }
    return hx.tl.fit_histo2expr(adata, method=method, **kwargs)


def predicted(adata, model):
    return hx.tl.predict_expression(adata, model, copy=True).obsm["histo2expr_pred"].to_numpy()


# --- 1. models fitted on an AnnData read back from h5ad save and load, every method ---------------


@pytest.mark.parametrize("method", available_methods())
def test_model_fitted_after_an_h5ad_round_trip_saves_and_loads(cohort, tmp_path, method, one_torch_thread):
    cohort.write_h5ad(tmp_path / "cohort.h5ad")
    adata = ad.read_h5ad(tmp_path / "cohort.h5ad")
    assert isinstance(adata.uns["X_histo"]["encoder"]["mean"], np.ndarray)  # what the round trip makes
    model = fit(adata, method)
    model.save(tmp_path / "model.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    assert loaded.encoder["mean"] == [0.0, 0.0, 0.0] and loaded.genes == model.genes
    np.testing.assert_array_equal(predicted(adata, loaded), predicted(adata, model))


def test_tampered_or_short_model_files_are_refused(cohort, tmp_path):
    model = fit(cohort.copy())
    model.save(tmp_path / "model.pt")
    whole = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "short.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("short.pt", "empty.pt"):
        with pytest.raises(ValueError, match=r"not a histo2expr model file.*Save the model again"):
            hx.tl.Histo2ExprModel.load(tmp_path / name)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    del state["method_state"]["regressor"]["coef_"]
    torch.save(state, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match=r"damaged histo2expr model file.*KeyError"):
        hx.tl.Histo2ExprModel.load(tmp_path / "tampered.pt")
    state["version"] = "1"
    torch.save(state, tmp_path / "version.pt")
    with pytest.raises(ValueError, match="newer histo2expr"):
        hx.tl.Histo2ExprModel.load(tmp_path / "version.pt")


# --- 3. methods that learn from spot positions refuse data without them ----------------------------


def test_methods_declare_whether_they_use_coordinates():
    assert NH2STMethod().uses_coordinates and not NH2STMethod(neighbour_branch=False).uses_coordinates
    assert get_method("chrep")().uses_coordinates
    assert not get_method("chrep")(losses=("regression",)).uses_coordinates
    for name in ("ridge", "stnet", "bleep", "cmrcnet"):
        assert not get_method(name)().uses_coordinates


@pytest.mark.parametrize(("method", "params"), [("nh2st", {}), ("chrep", {})])
def test_no_spot_coordinates_is_a_clear_error_for_methods_that_use_them(cohort, method, params, refuses):
    adata = cohort.copy()
    del adata.obsm["spatial"]
    refuses(adata, lambda a: fit(a, method, **params), KeyError, rf"'{method}'.*obsm\['spatial'\]")


def test_methods_that_do_not_use_coordinates_fit_and_predict_without_them(cohort, one_torch_thread):
    adata = cohort.copy()
    del adata.obsm["spatial"]
    for method, params in (("ridge", {}), ("nh2st", {"neighbour_branch": False})):
        model = fit(adata, method, **params)
        assert np.isfinite(predicted(adata, model)).all()


def test_nh2st_refuses_spots_without_positions_at_the_model_level():
    rng = np.random.default_rng(0)
    spots = SpotSet(
        coords=np.zeros((40, 2)),
        groups=np.repeat(["a", "b"], 20),
        features=rng.standard_normal((40, 8)).astype(np.float32),
        targets=rng.standard_normal((40, 3)).astype(np.float32),
    )
    with pytest.raises(ValueError, match="same coordinates"):
        NH2STMethod(n_neighbours=4).fit(spots, None, TrainConfig(epochs=1, progress=False))


# --- 4. data that is not log-normalised ---------------------------------------------------------------


def _zscored(a):
    sc.pp.scale(a)


def _counts_in_x(a):
    a.X = a.layers["counts"].copy()


def _never_logged(a):
    a.X = np.expm1(a.X.toarray())
    del a.layers["counts"]


def _logged_twice(a):
    a.X = np.log1p(a.X.toarray())


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (_zscored, "negative values.*scaled or centred"),
        (_counts_in_x, "whole numbers only, i.e. raw counts"),
        (_never_logged, "never logged"),
        (_logged_twice, r"not log1p of `adata.layers\['counts'\]`.*logged twice"),
    ],
)
def test_data_that_is_not_log_normalised_is_refused(cohort, spoil, match, refuses):
    adata = cohort.copy()
    spoil(adata)
    refuses(adata, fit, ValueError, match)
    refuses(adata, lambda a: hx.pp.select_genes(a, 5, inplace=False), ValueError, match)


def test_other_log_normalisations_are_accepted(cohort):
    for target_sum, base in ((1e6, None), (None, 2)):
        adata = cohort.copy()
        adata.X = adata.layers["counts"].copy()
        del adata.uns["log1p"]
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata, base=base)
        assert fit(adata).genes
    without_counts = cohort.copy()
    del without_counts.layers["counts"]
    assert fit(without_counts).genes


@pytest.mark.parametrize("target_sum", [float("nan"), float("inf"), 0, -1.0, "1e4", True])
def test_normalize_refuses_a_bad_target_sum(cohort, target_sum, refuses):
    adata = cohort.copy()
    refuses(adata, lambda a: hx.pp.normalize(a, target_sum=target_sum), ValueError, "target_sum")


def test_normalize_refuses_non_integer_counts_and_logging_twice(cohort, refuses):
    fractional = cohort.copy()
    fractional.X = fractional.layers["counts"] * 1.5
    del fractional.layers["counts"], fractional.uns["log1p"]
    refuses(fractional, hx.pp.normalize, ValueError, r"non-integer values.*round them")
    logged = cohort.copy()
    del logged.layers["counts"]  # X is log-normalised, the counts are gone
    refuses(logged, hx.pp.normalize, ValueError, "already log-normalised.*log it twice")


# --- 5. geometry --------------------------------------------------------------------------------------


def test_embedding_refuses_coordinates_on_another_scale_than_the_recorded_spacing(cohort, refuses):
    adata = cohort.copy()
    adata.obsm["spatial"] = adata.obsm["spatial"] * 0.5  # e.g. pixels of a half-size image
    refuses(
        adata,
        lambda a: hx.tl.embed_patches(a, encoder="colour_texture", patch_size=32, progress=False),
        ValueError,
        "look scaled.*full-resolution pixels",
    )


@pytest.mark.parametrize("mpp", [1e-6, 1e6, float("inf"), float("nan"), 0.0])
def test_embedding_refuses_an_implausible_pixel_size(cohort, mpp, refuses):
    adata = cohort.copy()
    for entry in adata.uns["spatial"].values():
        entry["scalefactors"]["microns_per_pixel"] = mpp
    embed = lambda a: hx.tl.embed_patches(a, encoder="colour_texture", patch_size=32, progress=False)  # noqa: E731
    refuses(
        adata,
        embed,
        ValueError,
        r"pixel size in `uns\['spatial'\]\['S\d'\]\['scalefactors'\]\['microns_per_pixel'\]` is .*(outside|not a positive)",
    )
    refuses(
        cohort.copy(),
        lambda a: hx.tl.embed_patches(a, encoder="colour_texture", mpp=mpp, progress=False),
        ValueError,
        r"pixel size in `mpp` is .*(outside|not a positive)",
    )


# --- 6. determinism on two threads, every method ------------------------------------------------------


@pytest.mark.parametrize("method", available_methods())
def test_every_method_is_deterministic_on_two_threads(cohort, method, two_torch_threads):
    runs = [predicted(cohort, fit(cohort.copy(), method, epochs=1, batch_size=32, seed=5)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


# --- 7. ridge: a bounded number of inner folds ----------------------------------------------------------


def test_ridge_inner_model_selection_uses_at_most_five_grouped_folds(monkeypatch):
    rng = np.random.default_rng(0)
    slides = np.repeat([f"s{i:02d}" for i in range(12)], 15)
    features = rng.standard_normal((len(slides), 20))
    targets = features[:, :3] + rng.standard_normal((len(slides), 3))
    splits = ridge_module.inner_splits(slides)
    assert len(splits) == 5
    for fit_part, validation in splits:
        assert not set(slides[fit_part]) & set(slides[validation])  # whole slides on each side
    assert sorted(np.concatenate([v for _, v in splits])) == list(range(len(slides)))
    assert len(ridge_module.inner_splits(slides[:60])) == 4  # four slides: leave-one-slide-out
    calls = []
    spectrum = ridge_module._spectrum
    monkeypatch.setattr(ridge_module, "_spectrum", lambda x: calls.append(1) or spectrum(x))
    ridge_module.RidgeRegressor().fit(features, targets, slides)
    assert len(calls) == 5 + 1  # five inner folds and the final fit, not one per slide


# --- 8. unclear errors made clear -------------------------------------------------------------------------


def _duplicate_genes(a):
    a.var_names = ["g"] * a.n_vars


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a: fit(a[:0].copy()), ValueError, "0 spots.*needs at least one"),
        (lambda a: fit(a[:0].copy(), "bleep"), ValueError, "0 spots.*needs at least one"),
        (lambda a: fit(a[:, :0].copy()), ValueError, "0 genes"),
        (lambda a: fit(a, lr="0.01"), ValueError, "`lr` must be a positive number"),
        (lambda a: fit(a, seed=-1), ValueError, "`seed` must be an integer"),
        (lambda a: fit(a, seed=1.5), ValueError, "`seed` must be an integer"),
        (lambda a: fit(a, genes="SYN0001"), TypeError, "number of genes or a list"),
        (lambda a: fit(a, genes=np.zeros((2, 2))), TypeError, "flat list"),
        (lambda a: fit(a, genes=0), ValueError, "between 1 and"),
        (lambda a: fit(a, "bleep", top_k="5"), (ValueError, TypeError), "top_k"),
        (lambda a: hx.tl.predict_expression(a[:0].copy(), fit(a.copy())), ValueError, "0 spots"),
        (lambda a: hx.pp.select_genes(a, "5"), ValueError, "`n_top` must be a positive integer"),
    ],
)
def test_bad_arguments_are_clear_errors(cohort, call, error, match, refuses):
    refuses(cohort.copy(), call, error, match)


def test_duplicate_gene_names_are_a_clear_error(cohort, refuses):
    adata = cohort.copy()
    _duplicate_genes(adata)
    refuses(adata, fit, ValueError, r"var_names_make_unique\(\)")


def test_gene_lists_may_be_arrays_or_indexes(cohort):
    names = cohort.var_names[:5]
    for genes in (list(names), np.asarray(names), names, pd.Series(names)):
        assert fit(cohort.copy(), genes=genes).genes == list(names)


@pytest.mark.parametrize("slide", ["", ".", "..", "a/b"])
def test_slide_ids_that_would_be_mangled_on_write_are_refused(cohort, slide, refuses):
    adata = cohort.copy()
    adata.obs["slide"] = adata.obs["slide"].cat.rename_categories({"S1": slide})
    refuses(adata, fit, ValueError, "cannot be stored.*Rename the slide")


@pytest.mark.parametrize("slide", ["S 1", "S1!", "__S1"])
def test_to_spatialdata_names_the_slide_ids_it_cannot_use(cohort, slide):
    adata = cohort.copy()
    adata.obs["slide"] = adata.obs["slide"].cat.rename_categories({"S1": slide})
    adata.uns["spatial"][slide] = adata.uns["spatial"].pop("S1")
    with pytest.raises(ValueError, match=r"cannot name a SpatialData element.*Rename the slide"):
        hx.io.to_spatialdata(adata)


def test_small_held_out_slides_are_flagged_and_left_out_of_the_means(cohort):
    adata = cohort.copy()
    keep = (adata.obs["slide"] != "S3").to_numpy() | (np.cumsum(adata.obs["slide"] == "S3") <= 5)
    adata = adata[keep].copy()
    with pytest.warns(UserWarning, match="Slide 'S3' has only 5 spots"):
        fit(adata, cv="leave_one_slide_out", refit=False)
    folds = adata.uns["histo2expr"]["folds"]
    assert folds.set_index("slide")["small_slide"].to_dict() == {"S1": False, "S2": False, "S3": True}
    assert hx.metrics.summarize(folds)["pcc_acg"] == pytest.approx(folds["pcc_acg"][:2].mean())
    from histo2expr._benchmark import MethodRun, results_json, results_markdown

    run = MethodRun("ridge", folds, 1.0, None)
    report = results_markdown([run], title="t")
    assert "S3 (5 spots)" in report and f"ridge {folds['pcc_acg'].mean():.3f}" in report
    means = results_json([run], settings={})["cross_validation"]["leave_one_slide_out"]["methods"]["ridge"]
    assert means["mean"]["pcc_acg"] == pytest.approx(folds["pcc_acg"][:2].mean())
    assert means["mean_all_slides"]["pcc_acg"] == pytest.approx(folds["pcc_acg"].mean())


# --- CLI: checked before any work, one line, exit status 2 -------------------------------------------------


@pytest.fixture(scope="module")
def cohort_h5ad(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cohort.h5ad"
    cohort.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--genes", "0"], "--genes: must be an integer of at least 1"),
        (["--epochs", "-1"], "--epochs: must be an integer of at least 1"),
        (["--seed", "1.5"], "--seed: must be an integer of at least 0"),
        (["--workers", "-2"], "--workers: must be an integer"),
        (["--patch-size", "99999"], "out of range"),
        (["--encoder", "no_such_net"], "Unknown encoder 'no_such_net'"),
        (["--methods", "ridge,ridge"], "lists a method twice"),
        (["--methods", ","], "names no method"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
        (["--backend", "tensorrt"], "`backend` must be one of"),
        (["--genes", "9999"], "--genes 9999 exceeds the 30 genes"),
        (["--reader", "legacy_st"], "reads a folder"),
    ],
)
def test_cli_checks_arguments_before_any_work(cohort_h5ad, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli, "_embed", lambda *a, **k: pytest.fail("embedded before checking the arguments"))
    argv = [
        "benchmark",
        "--data",
        str(cohort_h5ad),
        "--methods",
        "ridge",
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_file_as_out_folder_and_as_data_folder(cohort_h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_embed", lambda *a, **k: pytest.fail("embedded before checking the arguments"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a dataset")
    assert cli.main(["benchmark", "--data", str(cohort_h5ad), "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["benchmark", "--data", str(a_file), "--out", str(tmp_path / "o")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_refuses_cuda_without_a_gpu(cohort_h5ad, tmp_path, capsys):
    argv = ["benchmark", "--data", str(cohort_h5ad), "--device", "cuda", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "'cuda' is not usable on this machine" in capsys.readouterr().err
