"""Which predictions can be trusted: conformal intervals, per-gene predictability, out-of-distribution scores."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import histo2expr as hx
from histo2expr._predictability import gene_predictability
from histo2expr.tl._intervals import Calibration, conformal_quantile
from histo2expr.tl._ood import NeighbourReference

FIT = {"method": "ridge", "genes": 8, "cv": "leave_one_slide_out", "progress": False}


def exchangeable_cohort(n_slides: int = 6, spots: int = 80, *, seed: int = 0, shift: float = 0.0) -> AnnData:
    """Slides drawn alike: Poisson counts log-linear in random features (no slide effect), normalised.

    ``shift`` moves every feature of every spot (a slide unlike the others) without changing the counts' law.
    """
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(99).normal(0, 0.5, (6, 12))
    features = rng.normal(0, 1, (n_slides * spots, 6))
    counts = rng.poisson(np.exp(1.5 + features @ weights)).astype(np.float32)
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"slide": pd.Categorical(np.repeat([f"S{i + seed * 100}" for i in range(n_slides)], spots))},
            index=[f"spot{seed}_{i}" for i in range(len(counts))],
        ),
        var=pd.DataFrame(index=[f"G{j}" for j in range(counts.shape[1])]),
    )
    adata.obsm["X_histo"] = (features + shift).astype(np.float32)
    hx.pp.normalize(adata)
    return adata


@pytest.fixture(scope="module")
def cohort() -> AnnData:
    return exchangeable_cohort()


@pytest.fixture(scope="module")
def fitted(cohort):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, intervals=True, **FIT)
    return adata, model


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1.0, 20.0)[:, None] * np.array([1.0, 2.0])  # n = 19
    np.testing.assert_array_equal(conformal_quantile(scores, 0.9), [18.0, 36.0])  # ceil(20 * 0.9) = 18th
    np.testing.assert_array_equal(conformal_quantile(scores, 0.5), [10.0, 20.0])
    with pytest.raises(ValueError, match=r"too few for intervals at level 0.99.*at least 99 spots"):
        conformal_quantile(scores, 0.99)


def test_cross_validation_records_intervals_coverage_and_ood(fitted):
    adata, _ = fitted
    record = adata.uns["histo2expr"]
    lower, upper = hx.get.intervals(adata)
    predicted = hx.get.predictions(adata)
    assert lower.shape == upper.shape == predicted.shape and list(lower.columns) == list(predicted.columns)
    known = predicted.notna().to_numpy()
    assert (lower.to_numpy()[known] <= predicted.to_numpy()[known]).all()
    assert (upper.to_numpy()[known] >= predicted.to_numpy()[known]).all()
    assert (lower.to_numpy()[known] >= 0).all()
    assert record["intervals"]["level"] == 0.9 and record["intervals"]["kind"] == "adaptive"
    coverage, width = record["interval_coverage"], record["interval_width"]
    assert list(coverage.columns) == list(record["folds"]["slide"]) == list(width.columns)
    # the recorded coverage is that of the stored intervals against the measured expression
    truth = adata[:, predicted.columns].X.toarray()
    covered = (truth >= lower.to_numpy()) & (truth <= upper.to_numpy())
    slides = adata.obs["slide"].astype(str).to_numpy()
    for row in record["folds"].itertuples():
        on_slide = slides == row.slide
        genes = coverage[row.slide].dropna().index
        columns = predicted.columns.get_indexer(genes)
        np.testing.assert_allclose(
            coverage[row.slide][genes], covered[np.ix_(on_slide, columns)].mean(axis=0)
        )
        assert row.coverage == pytest.approx(coverage[row.slide].mean())
        assert row.interval_width == pytest.approx(width[row.slide].mean())
    p_values = adata.obs["histo2expr_ood_pvalue"].to_numpy()
    assert ((p_values > 0) & (p_values <= 1)).all()
    assert (adata.obs["histo2expr_difficulty"] > 0).all()


@pytest.mark.parametrize("kind", ["adaptive", "constant"])
def test_coverage_on_exchangeable_slides_is_close_to_nominal(cohort, kind):
    adata = cohort.copy()
    hx.tl.fit_histo2expr(adata, intervals=kind, level=0.8, refit=False, **FIT)
    folds = adata.uns["histo2expr"]["folds"]
    assert folds["coverage"].mean() == pytest.approx(0.8, abs=0.04)
    assert folds["coverage"].min() > 0.7
    if kind == "constant":  # one half-width per gene: the same width on every spot
        lower, upper = hx.get.intervals(adata)
        width = (upper - lower).where(lower > 0)  # not clipped at zero
        spread = width.groupby(adata.obs["slide"].to_numpy()).std()
        assert (spread.fillna(0) < 1e-5).all().all() and spread.notna().any().any()


def test_adaptive_intervals_are_wider_far_from_the_training_spots(fitted):
    adata, _ = fitted
    lower, upper = hx.get.intervals(adata)
    width = (upper - lower).mean(axis=1).to_numpy()
    difficulty = adata.obs["histo2expr_difficulty"].to_numpy()
    assert np.corrcoef(width, difficulty)[0, 1] > 0.5


@pytest.mark.parametrize("calibration", ["pooled", "shift"])
def test_held_out_slide_cannot_change_its_intervals(cohort, calibration):
    """Poison the held-out slide's expression: its intervals and OOD scores must not move, others' do."""
    clean = cohort.copy()
    options = {"intervals": True, "interval_calibration": calibration, "refit": False, **FIT}
    hx.tl.fit_histo2expr(clean, **options)
    poisoned = cohort.copy()
    held = (poisoned.obs["slide"] == "S2").to_numpy()
    counts = poisoned.layers["counts"].toarray()
    counts[held] = np.random.default_rng(1).permutation(counts[held].T).T * 3.0
    poisoned.layers["counts"] = sp.csr_matrix(counts)
    hx.pp.normalize(poisoned)
    hx.tl.fit_histo2expr(poisoned, **options)
    for clean_bound, poisoned_bound in zip(hx.get.intervals(clean), hx.get.intervals(poisoned), strict=True):
        clean_held, poisoned_held = clean_bound[held].dropna(axis=1), poisoned_bound[held].dropna(axis=1)
        pd.testing.assert_frame_equal(clean_held, poisoned_held[clean_held.columns])
        assert not clean_bound[~held].equals(poisoned_bound[~held])  # S2 calibrates the other folds
    pd.testing.assert_series_equal(
        clean.obs["histo2expr_ood_pvalue"][held], poisoned.obs["histo2expr_ood_pvalue"][held]
    )


def test_intervals_and_scores_are_deterministic_with_a_seed(cohort, fitted):
    adata, model = fitted
    again = cohort.copy()
    model_again = hx.tl.fit_histo2expr(again, intervals=True, **FIT)
    for first, second in zip(hx.get.intervals(adata), hx.get.intervals(again), strict=True):
        pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(adata.obs, again.obs)
    new = exchangeable_cohort(1, seed=3)
    predictions = []
    for m in (model, model_again):
        out = hx.tl.predict_expression(new, m, copy=True)
        predictions.append((*hx.get.intervals(out), out.obs))
    for first, second in zip(*predictions, strict=True):
        pd.testing.assert_frame_equal(first, second)


def test_predict_writes_intervals_ood_scores_and_predictability(fitted, tmp_path):
    adata, model = fitted
    new = exchangeable_cohort(1, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a slide like the training slides: no warning
        hx.tl.predict_expression(new, model)
    record = new.uns["histo2expr_pred"]
    lower, upper = hx.get.intervals(new)
    predicted = hx.get.predictions(new)
    assert (lower <= predicted).all().all() and (upper >= predicted).all().all()
    assert record["intervals"]["level"] == 0.9
    assert record["shift"]["ood_fraction"].iloc[0] < 0.2
    truth = new[:, predicted.columns].X.toarray()
    assert ((truth >= lower.to_numpy()) & (truth <= upper.to_numpy())).mean() == pytest.approx(0.9, abs=0.06)
    # the model keeps all of it through save / load
    model.save(tmp_path / "model.pt")
    again = hx.tl.predict_expression(new, hx.tl.Histo2ExprModel.load(tmp_path / "model.pt"), copy=True)
    for first, second in zip(hx.get.intervals(new), hx.get.intervals(again), strict=True):
        pd.testing.assert_frame_equal(first, second)
    # predictability travels into the virtual-ST AnnData: trustworthy genes in one line
    virtual = hx.get.predicted_adata(new)
    trusted = virtual[:, virtual.var["predictable"]]
    expected = adata.var.loc[virtual.var_names, "histo2expr_predictable"].to_numpy()
    np.testing.assert_array_equal(virtual.var["predictable"].to_numpy(), expected)
    assert 0 < trusted.n_vars
    np.testing.assert_allclose(virtual.layers["lower"], lower[virtual.var_names].to_numpy())


def test_a_slide_far_from_the_training_data_is_flagged(fitted):
    _, model = fitted
    far = exchangeable_cohort(1, seed=4, shift=6.0)
    with pytest.warns(UserWarning, match=r"Slide 'S400' is far from the training data: 100% of its spots"):
        hx.tl.predict_expression(far, model)
    shift = far.uns["histo2expr_pred"]["shift"]
    assert shift["ood_fraction"].iloc[0] == 1.0 and shift["distance_ratio"].iloc[0] > 3
    assert (far.obs["histo2expr_pred_ood_pvalue"] < 0.05).all()


def test_ood_p_values_of_unseen_like_slides_are_uniform():
    rng = np.random.default_rng(0)
    reference = NeighbourReference.build(rng.normal(size=(600, 5)), np.repeat(np.arange(6), 100), seed=0)
    _, p_values = reference.scores(rng.normal(size=(2000, 5)))
    for alpha in (0.05, 0.2, 0.5):
        assert np.mean(p_values <= alpha) == pytest.approx(alpha, abs=0.04)


def test_gene_predictability_is_a_t_interval_over_held_out_slides():
    table = pd.DataFrame(
        {"A": [0.3, 0.0, 0.5], "B": [0.5, 0.1, np.nan], "C": [0.4, -0.1, np.nan]},
        index=pd.Index(["g1", "g2", "g3"], name="gene"),
    )
    out = gene_predictability(table)
    values = np.array([0.3, 0.5, 0.4])
    half = 4.302652729911275 * values.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert out.loc["g1", "cv_pcc"] == pytest.approx(0.4)
    assert out.loc["g1", "cv_pcc_low"] == pytest.approx(0.4 - half)
    assert out.loc["g1", "cv_pcc_high"] == pytest.approx(0.4 + half)
    assert out.loc["g1", "predictable"] and not out.loc["g2", "predictable"]
    assert (
        np.isnan(out.loc["g3", "cv_pcc_low"]) and not out.loc["g3", "predictable"]
    )  # one slide: no interval


def test_cross_validation_writes_predictability_to_var(fitted):
    adata, _ = fitted
    expected = gene_predictability(adata.uns["histo2expr"]["gene_pcc"])
    for column in expected:
        stored = adata.var[f"histo2expr_{column}"].reindex(expected.index)
        np.testing.assert_allclose(
            stored.to_numpy(dtype=float), expected[column].to_numpy(dtype=float), rtol=1e-6
        )
    unpredicted = adata.var_names.difference(expected.index)
    assert adata.var.loc[unpredicted, "histo2expr_cv_pcc"].isna().all()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"level": 0.0}, r"`level` must be a probability strictly between 0 and 1"),
        ({"level": 1.0}, r"`level` must be a probability strictly between 0 and 1"),
        ({"level": True}, r"`level` must be a probability"),
        ({"intervals": "wide"}, r"`intervals` must be True, False, or one of \['adaptive', 'constant'\]"),
        ({"calibration_folds": 1}, r"`calibration_folds` must be an integer between 2 and 5"),
        ({"level": 0.999}, r"calibration spots are too few for intervals at level 0.999"),
    ],
)
def test_bad_interval_parameters_are_refused_and_change_nothing(cohort, refuses, params, match):
    adata = cohort.copy()
    refuses(
        adata, lambda a: hx.tl.fit_histo2expr(a, **{"intervals": True, **params}, **FIT), ValueError, match
    )


def test_intervals_need_two_training_slides_per_model(refuses):
    adata = exchangeable_cohort(2, spots=40)
    refuses(
        adata,
        lambda a: hx.tl.fit_histo2expr(a, intervals=True, **FIT),
        ValueError,
        "every model needs at least two training slides; here one has 1",
    )


def test_intervals_accessor_explains_what_is_missing(cohort):
    adata = cohort.copy()
    hx.tl.fit_histo2expr(adata, refit=False, **FIT)
    with pytest.raises(KeyError, match=r"has no prediction intervals.*intervals=True"):
        hx.get.intervals(adata)


@pytest.fixture
def _agg_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


@pytest.fixture(scope="module")
def imaged():
    """A synthetic cohort with H&E, cross-validated with intervals, and a new slide predicted."""
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=6, n_genes=24)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # slides of one patient
        model = hx.tl.fit_histo2expr(adata, intervals=True, **{**FIT, "genes": 10})
    new = hx.datasets.synthetic(n_slides=1, seed=7, spots_per_side=6, n_genes=24)
    hx.pp.normalize(new)
    hx.tl.embed_patches(new, encoder="colour_texture", patch_size=32, progress=False)
    hx.tl.predict_expression(new, model)
    return adata, new


@pytest.mark.usefixtures("_agg_figures")
def test_interval_coverage_plot_shows_each_slide_against_the_level(imaged):
    adata, _ = imaged
    record = adata.uns["histo2expr"]
    ax = hx.pl.interval_coverage(adata, show=False)
    means = [
        line.get_ydata()[0]
        for line in ax.lines
        if len(line.get_xdata()) == 2 and np.ptp(line.get_ydata()) == 0
    ]
    nominal = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(nominal) == 1 and nominal[0].get_ydata()[0] == 0.9
    np.testing.assert_allclose(sorted(m for m in means if m != 0.9), sorted(record["folds"]["coverage"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(record["folds"]["slide"])
    assert (
        sum(len(c.get_offsets()) for c in ax.collections) == record["interval_coverage"].notna().sum().sum()
    )
    plain = adata.copy()
    hx.tl.fit_histo2expr(plain, key_added="plain", refit=False, **{**FIT, "genes": 10})
    with pytest.raises(KeyError, match="no interval coverage"):
        hx.pl.interval_coverage(plain, "plain", show=False)


@pytest.mark.usefixtures("_agg_figures")
@pytest.mark.parametrize(
    ("value", "gene"), [("width", None), ("width", "first"), ("ood", None), ("difficulty", None)]
)
def test_spatial_uncertainty_colours_every_spot_of_the_slide(imaged, value, gene):
    from matplotlib.collections import PatchCollection

    _, new = imaged
    lower, upper = hx.get.intervals(new)
    gene = lower.columns[0] if gene == "first" else gene
    ax = hx.pl.spatial_uncertainty(new, gene, key="histo2expr_pred", value=value, show=False)
    spots = next(c for c in ax.collections if isinstance(c, PatchCollection))
    expected = {
        "width": (upper - lower).mean(axis=1).to_numpy()
        if gene is None
        else (upper - lower)[gene].to_numpy(),
        "ood": -np.log10(new.obs["histo2expr_pred_ood_pvalue"].to_numpy()),
        "difficulty": new.obs["histo2expr_pred_difficulty"].to_numpy(),
    }[value]
    np.testing.assert_allclose(spots.get_array(), expected, rtol=1e-6)
    assert len(spots.get_paths()) == new.n_obs and len(ax.images) == 1
    with pytest.raises(ValueError, match=r"`value` must be one of .*, got 'noise'"):
        hx.pl.spatial_uncertainty(new, key="histo2expr_pred", value="noise", show=False)


def top_down(ax):
    """The y tick labels from the top of the axes down."""
    ticks = sorted(
        zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True), reverse=True
    )
    return [label for _, label in ticks]


@pytest.mark.usefixtures("_agg_figures")
def test_gene_predictability_plot_ranks_genes_with_their_intervals(imaged):
    adata, new = imaged
    ax = hx.pl.gene_predictability(adata, n_genes=5, show=False)
    expected = gene_predictability(adata.uns["histo2expr"]["gene_pcc"]).sort_values("cv_pcc", ascending=False)
    assert top_down(ax) == list(expected.index[:5])  # best gene at the top
    points = np.concatenate([line.get_xdata() for line in ax.lines if line.get_marker() == "o"])
    np.testing.assert_allclose(np.sort(points), np.sort(expected["cv_pcc"].to_numpy()[:5]))
    # the predictions of the refitted model carry the same ranking
    ax = hx.pl.gene_predictability(new, "histo2expr_pred", n_genes=5, show=False)
    assert top_down(ax) == list(expected.index[:5])


def test_evaluate_expression_measures_coverage_on_another_cohort(fitted, tmp_path):
    import anndata as ad

    _, model = fitted
    other = exchangeable_cohort(2, seed=5)
    folds = hx.tl.evaluate_expression(other, model)
    record = other.uns["histo2expr_pred"]
    lower, upper = hx.get.intervals(other)
    truth = other[:, model.genes].X.toarray()
    covered = (truth >= lower[model.genes].to_numpy()) & (truth <= upper[model.genes].to_numpy())
    slides = other.obs["slide"].astype(str).to_numpy()
    for row in folds.itertuples():
        assert row.coverage == pytest.approx(covered[slides == row.slide].mean())
    assert folds["coverage"].mean() == pytest.approx(0.9, abs=0.06)
    assert list(record["interval_coverage"].columns) == list(folds["slide"])
    # everything written is h5ad-serialisable
    other.write_h5ad(tmp_path / "evaluated.h5ad")
    back = ad.read_h5ad(tmp_path / "evaluated.h5ad")
    pd.testing.assert_frame_equal(hx.get.intervals(back)[0], lower)
    assert back.uns["histo2expr_pred"]["intervals"]["kind"] == "adaptive"


def test_intervals_work_for_a_torch_method(one_torch_thread):
    adata = exchangeable_cohort(4, spots=50)
    hx.tl.fit_histo2expr(
        adata,
        intervals="constant",
        calibration_folds=2,
        refit=False,
        **{**FIT, "method": "bleep", "epochs": 2, "batch_size": 32},
    )
    folds = adata.uns["histo2expr"]["folds"]
    assert folds["coverage"].between(0.5, 1.0).all() and (folds["interval_width"] > 0).all()
    lower, upper = hx.get.intervals(adata)
    assert ((upper >= lower) | upper.isna()).all().all() and upper.notna().any().any()


def test_a_model_fitted_without_cv_is_calibrated_on_all_its_slides(cohort):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, intervals="constant", **{**FIT, "cv": None})
    calibration = model.trust["calibration"]
    assert calibration["n_spots"] == adata.n_obs and calibration["n_slides"] == 6
    assert model.trust["predictability"] is None  # no held-out slides, no predictability
    assert not any(c.startswith("histo2expr_") for c in adata.var)
    new = exchangeable_cohort(1, seed=3)
    hx.tl.predict_expression(new, model)
    lower, upper = hx.get.intervals(new)
    width = (upper - lower)[(lower > 0).all(axis=1)]
    np.testing.assert_allclose(width.iloc[0].to_numpy(), 2 * np.asarray(calibration["quantile"]), rtol=1e-5)
    assert not hx.get.predicted_adata(new).var["predictable"].any()


def test_per_slide_calibration_takes_the_largest_quantile_of_the_calibration_slides():
    adata = exchangeable_cohort(2, spots=60, seed=4)
    both = {"method": "ridge", "genes": 8, "progress": False, "intervals": "constant", "level": 0.8}
    pooled = hx.tl.fit_histo2expr(adata.copy(), **both)
    per_slide = hx.tl.fit_histo2expr(adata.copy(), interval_calibration="per_slide", **both)
    # the calibration residuals: each slide predicted by the method fitted on the other one
    genes = list(per_slide.genes)
    hx.tl.fit_histo2expr(
        adata, method="ridge", genes=genes, cv="leave_one_slide_out", refit=False, progress=False
    )
    residual = np.abs(adata[:, genes].X.toarray() - hx.get.predictions(adata)[genes].to_numpy())
    slides = adata.obs["slide"].to_numpy()
    per_slide_quantiles = [conformal_quantile(residual[slides == s], 0.8) for s in np.unique(slides)]
    np.testing.assert_allclose(
        per_slide.trust["calibration"]["quantile"], np.max(per_slide_quantiles, axis=0)
    )
    np.testing.assert_allclose(pooled.trust["calibration"]["quantile"], conformal_quantile(residual, 0.8))
    assert adata.uns["histo2expr"]["params"]["interval_calibration"] == "shift"


def test_per_slide_calibration_needs_enough_spots_on_every_slide(refuses):
    adata = exchangeable_cohort(3, spots=40)
    adata = adata[
        ~adata.obs_names.isin(adata.obs_names[adata.obs["slide"] == "S0"][5:])
    ].copy()  # S0: 5 spots
    refuses(
        adata,
        lambda a: hx.tl.fit_histo2expr(a, intervals=True, interval_calibration="per_slide", **FIT),
        ValueError,
        r"Slide 'S0': 5 calibration spots are too few for intervals at level 0.9.*interval_calibration='pooled'",
    )


def test_shift_calibration_widens_only_slides_farther_than_an_unseen_training_slide():
    calibration = Calibration(
        level=0.9, kind="adaptive", quantile=np.array([1.0, 2.0]), n_spots=50, n_slides=5
    )
    shifted = Calibration(**{**calibration.__dict__, "rule": "shift"})
    predicted = np.full((6, 2), 10.0)
    difficulty = np.array([0.5, 0.9, 1.1, 1.5, 2.0, 3.0])  # near: median 0.9; far: median 2.0
    slides = np.array(["near"] * 3 + ["far"] * 3)
    pooled_lower, pooled_upper = calibration.bounds(predicted, difficulty, slides)
    lower, upper = shifted.bounds(predicted, difficulty, slides)
    near, far = slides == "near", slides == "far"
    np.testing.assert_array_equal(lower[near], pooled_lower[near])
    np.testing.assert_array_equal(upper[near], pooled_upper[near])
    np.testing.assert_allclose(upper[far] - predicted[far], 2.0 * (pooled_upper[far] - predicted[far]))
    # the factor is the slide's, from all its spots: one slide alone gets the same intervals
    np.testing.assert_array_equal(shifted.bounds(predicted[far], difficulty[far], slides[far])[1], upper[far])
    # a model saved before the rule was kept is pooled
    state = shifted.state_dict()
    assert Calibration.from_state_dict(state).rule == "shift"
    assert Calibration.from_state_dict({k: v for k, v in state.items() if k != "rule"}).rule == "pooled"


def test_shift_calibration_widens_a_far_slide_by_its_distance_ratio(cohort, tmp_path):
    both = {**FIT, "cv": None, "intervals": True}
    pooled = hx.tl.fit_histo2expr(cohort.copy(), interval_calibration="pooled", **both)
    shifted = hx.tl.fit_histo2expr(cohort.copy(), **both)  # the default
    np.testing.assert_array_equal(
        pooled.trust["calibration"]["quantile"], shifted.trust["calibration"]["quantile"]
    )
    shifted.save(tmp_path / "model.pt")
    shifted = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    for shift in (0.0, 1.0):  # like the training slides, and farther
        new = exchangeable_cohort(1, seed=5, shift=shift)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the far slide's warning
            outs = [hx.tl.predict_expression(new, model, copy=True) for model in (pooled, shifted)]
        ratio = outs[1].uns["histo2expr_pred"]["shift"]["distance_ratio"].iloc[0]
        (_, pooled_upper), (_, upper) = (hx.get.intervals(out) for out in outs)
        predicted = hx.get.predictions(outs[0])
        np.testing.assert_allclose(upper - predicted, max(1.0, ratio) * (pooled_upper - predicted), rtol=1e-5)
        assert (ratio > 1.2) == (shift > 0)
    assert "widened" in outs[1].uns["histo2expr_pred"]["intervals"]["calibration"]
