"""Ensembles of a trained method: members on rotating inner validation slides, averaged, saved and loaded."""

import dataclasses

import numpy as np
import pytest

import histo2expr as hx
from histo2expr._validation import log_expression
from histo2expr.models import Ensemble, get_method
from histo2expr.models.base import SpotSet, TrainConfig
from histo2expr.models.ensemble import member_seed, method_from_state
from histo2expr.splits import inner_validation_split, inner_validation_splits

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*share their patient with training slides"),
]

FIT = {"genes": 12, "epochs": 3, "batch_size": 16, "progress": False}


@pytest.fixture(scope="module")
def cohort():
    """Four synthetic slides with frozen features that carry the expression (a random projection of it)."""
    adata = hx.datasets.synthetic(n_slides=4, seed=0, spots_per_side=6, n_genes=30)
    hx.pp.normalize(adata)
    rng = np.random.default_rng(0)
    expression = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X)
    signal = expression @ rng.normal(size=(adata.n_vars, 16))
    adata.obsm["X_histo"] = (signal + rng.normal(size=signal.shape)).astype(np.float32)
    return adata


def spots(adata, positions, targets=None) -> SpotSet:
    return SpotSet(
        coords=np.asarray(adata.obsm["spatial"], dtype=float)[positions],
        groups=adata.obs["slide"].astype(str).to_numpy()[positions],
        features=adata.obsm["X_histo"][positions],
        targets=targets,
    )


def test_rotating_splits_start_with_the_single_split_and_validate_on_other_slides():
    groups = np.repeat(["a", "b", "c", "d", "e"], 4)
    splits = inner_validation_splits(groups, 6, seed=3)
    fit, validation, how = inner_validation_split(groups, seed=3)
    np.testing.assert_array_equal(splits[0][0], fit)
    np.testing.assert_array_equal(splits[0][1], validation)
    held = [tuple(sorted(set(groups[v]))) for _, v, _ in splits]
    assert how == "by slide" and all(len(h) == 1 for h in held)
    assert len(set(held[:5])) == 5 and held[5] == held[0], "five disjoint validation slides, then again"
    for fit, validation, _ in splits:
        assert not set(groups[fit]) & set(groups[validation])
        assert len(fit) + len(validation) == len(groups)
    by_spot = inner_validation_splits(np.repeat("a", 20), 3, fraction=0.25, seed=1)
    parts = [set(v) for _, v, how in by_spot]
    assert all(how == "by spot" and len(p) == 5 for p, (_, _, how) in zip(parts, by_spot, strict=True))
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]), "one slide: disjoint validation spots"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_splits"):
            inner_validation_splits(groups, bad)


def test_ensemble_predicts_the_mean_of_its_members_fitted_separately(cohort):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, method="stnet", ensemble=3, seed=4, **FIT)
    assert isinstance(model.method, Ensemble) and len(model.method.members) == 3
    assert model.method.settings.ensemble == 3 and model.method.name == "stnet"
    slides = adata.obs["slide"].astype(str).to_numpy()
    targets = model.scaler.transform(log_expression(adata, model.genes))
    config = TrainConfig(epochs=3, batch_size=16, progress=False)
    members = []
    for i, (fit, validation, _) in enumerate(inner_validation_splits(slides, 3, seed=4)):
        member = get_method("stnet")()
        member.fit(
            spots(adata, fit, targets[fit]),
            spots(adata, validation, targets[validation]),
            dataclasses.replace(config, seed=member_seed(4, i)),
        )
        members.append(member)
    everything = spots(adata, np.arange(adata.n_obs))
    separately = [m.predict(everything) for m in members]
    np.testing.assert_array_equal(model.method.predict(everything), np.mean(separately, axis=0))
    assert not np.allclose(separately[0], separately[1]), "the members differ"
    single = hx.tl.fit_histo2expr(cohort.copy(), method="stnet", seed=4, **FIT)
    np.testing.assert_array_equal(single.method.predict(everything), separately[0])
    # the embedding: members side by side, scaled so that squared distances are the members' mean
    embedding = model.method.embed(everything)
    blocks = [m.embed(everything) for m in members]
    distance = ((embedding[0] - embedding[1:]) ** 2).sum(axis=1)
    mean_distance = np.mean([((b[0] - b[1:]) ** 2).sum(axis=1) for b in blocks], axis=0)
    np.testing.assert_allclose(distance, mean_distance, rtol=1e-4)
    assert model.method.report.notes["members"][2]["best_epoch"] == members[2].report.best_epoch


def test_members_validate_on_different_training_slides_of_each_fold(cohort):
    adata = cohort.copy()
    hx.tl.fit_histo2expr(adata, method="stnet", ensemble=3, cv="leave_one_slide_out", refit=False, **FIT)
    folds = adata.uns["histo2expr"]["folds"]
    for held_out, validation, epochs in zip(
        folds["slide"], folds["inner_validation"], folds["best_epochs"], strict=True
    ):
        slides = validation.split("; ")
        assert len(set(slides)) == 3, "three members, three validation slides"
        assert held_out not in slides, "never the held-out slide"
        assert len(epochs.split("; ")) == 3
    plain = cohort.copy()
    hx.tl.fit_histo2expr(plain, method="stnet", cv="leave_one_slide_out", refit=False, **FIT)
    assert all(len(v.split("; ")) == 1 for v in plain.uns["histo2expr"]["folds"]["inner_validation"])


def test_ensemble_saves_and_loads_bit_identically(cohort, tmp_path):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, method="bleep", ensemble=2, **FIT)
    model.save(tmp_path / "ensemble.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "ensemble.pt")
    assert isinstance(loaded.method, Ensemble) and loaded.method.settings.ensemble == 2
    everything = spots(adata, np.arange(adata.n_obs))
    for name in ("predict", "embed"):
        np.testing.assert_array_equal(
            getattr(loaded.method, name)(everything), getattr(model.method, name)(everything)
        )
    confidence = model.method.confidence(everything)
    members = [m.confidence(everything) for m in model.method.members]
    np.testing.assert_allclose(confidence, np.mean(members, axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        model.method.confidence(everything, embedding=model.method.embed(everything)), confidence, rtol=1e-5
    )
    hx.tl.predict_expression(adata, loaded, key_added="again")
    hx.tl.predict_expression(adata, model, key_added="first")
    np.testing.assert_array_equal(adata.obsm["again"].to_numpy(), adata.obsm["first"].to_numpy())


def test_a_single_network_state_loads_as_one_network(cohort):
    """States saved before the `ensemble` setting (no such key) are one network, whatever the default."""
    model = hx.tl.fit_histo2expr(cohort.copy(), method="nh2st", ensemble=1, **FIT)
    state = model.method.state_dict()
    del state["settings"]["ensemble"]
    loaded = method_from_state("nh2st", state)
    assert not isinstance(loaded, Ensemble) and loaded.settings.ensemble == 1
    everything = spots(cohort, np.arange(cohort.n_obs))
    np.testing.assert_array_equal(loaded.predict(everything), model.method.predict(everything))


def test_bad_ensemble_sizes_and_untrained_methods_are_refused(cohort):
    for bad in (0, -2, 2.5, "3", True):
        with pytest.raises(ValueError, match="`ensemble` must be a positive integer"):
            hx.tl.fit_histo2expr(cohort.copy(), method="stnet", ensemble=bad, **FIT)
    for method in ("ridge", "hest_ridge"):
        with pytest.raises(ValueError, match="has no `ensemble` setting"):
            hx.tl.fit_histo2expr(cohort.copy(), method=method, ensemble=3, genes=12, progress=False)
    with pytest.raises(TypeError, match="fitted member by member"):
        Ensemble([get_method("stnet")()]).fit(spots(cohort, np.arange(4)), None, TrainConfig())
