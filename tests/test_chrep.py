import math

import numpy as np
import pytest
import torch
from torch import nn

import histo2expr as hx
from histo2expr.metrics import pcc_acg
from histo2expr.models import chrep as chrep_module
from histo2expr.models import gallery as gallery_module
from histo2expr.models import training
from histo2expr.models.base import SpotSet, TrainConfig, concat_spots, get_method
from histo2expr.models.chrep import (
    FourierCoordinates,
    neighbourhood_batches,
    normalise_coordinates,
    spatial_neighbourhoods,
)
from histo2expr.models.layers import ImageInput
from histo2expr.models.losses import info_nce, regression_loss, topology_loss, topology_prior
from histo2expr.models.training import seed_everything

SMALL = {
    "adapter_hidden": 16,
    "embedding_dim": 16,
    "projection_dim": 8,
    "correction_hidden": 8,
    "top_k": 10,
    "neighbourhood_size": 8,
    "knn": 3,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    values = {"epochs": 8, "batch_size": 32, "lr": 1e-2, "patience": 3, "progress": False}
    return TrainConfig(**{**values, **changes})


def chrep(**params):
    return get_method("chrep")(**{**SMALL, **params})


def spatial_cohort(seed=0, n_slides=4, side=8, d=12, g=6):
    """Slides on a square grid; smooth spatial programmes drive features (with a slide shift) and expression."""
    rng = np.random.default_rng(seed)
    loadings, profiles = rng.normal(size=(3, d)) * 2, rng.normal(size=(3, g))
    slides = []
    for s in range(n_slides):
        xx, yy = np.meshgrid(np.arange(side), np.arange(side))
        grid = np.c_[xx.ravel(), yy.ravel()].astype(float)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        programmes = np.c_[
            np.sin(grid[:, 0] / 2 + phase[0]),
            np.cos(grid[:, 1] / 2 + phase[1]),
            np.sin(grid.sum(1) / 3 + phase[2]),
        ]
        features = (
            programmes @ loadings + 0.3 * rng.normal(size=(len(grid), d)) + rng.normal(size=d) * 0.2 + 3
        )
        targets = programmes @ profiles + 0.2 * rng.normal(size=(len(grid), g))
        slides.append(
            SpotSet(
                coords=grid * 150.0 + 1000 * s,  # pixels, a different origin on every slide
                groups=np.full(len(grid), f"s{s}"),
                features=features.astype(np.float32),
                targets=targets.astype(np.float32),
            )
        )
    train = concat_spots(slides[: n_slides - 2])
    mean, std = train.targets.mean(0), train.targets.std(0)
    for spots in slides:
        spots.targets = ((spots.targets - mean) / std).astype(np.float32)
    return concat_spots(slides[: n_slides - 2]), slides[n_slides - 2], slides[n_slides - 1]


@pytest.fixture(scope="module")
def cohort():
    return spatial_cohort()


def softmax_retrieval(queries, gallery, values, k, tau):
    """Cosine top-k with softmax(similarity / tau) weights, written out in numpy."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    out = np.zeros((len(queries), values.shape[1]))
    for i, row in enumerate(sims):
        top = np.argsort(-row, kind="stable")[:k]
        weights = np.exp((row[top] - row[top].max()) / tau)
        out[i] = (weights / weights.sum()) @ values[top]
    return out


# --- losses --------------------------------------------------------------------------------------------


def test_regression_loss_is_mse_plus_mae_plus_pcc_term(rng):
    target = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    assert float(regression_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    # perfectly correlated (affine) prediction: the PCC term is 0, only MSE + MAE remain
    pred = 2 * target + 1
    diff = (pred - target).numpy()
    expected = (diff**2).mean() + np.abs(diff).mean()
    assert float(regression_loss(pred, target)) == pytest.approx(expected, rel=1e-6)
    # by hand: one gene, truth (0, 1), prediction (1, 2): MSE 1 + MAE 1 + PCC term 0
    assert float(
        regression_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [1.0]]))
    ) == pytest.approx(2)
    # anti-correlated prediction adds 2
    assert float(regression_loss(-target, target)) == pytest.approx(
        4 * (target**2).mean().item() + 2 * target.abs().mean().item() + 2, rel=1e-5
    )


def test_info_nce_by_hand_and_near_zero_when_aligned():
    eye = torch.eye(2)
    # logits diag(s, s) off-diagonal 0: each direction -log(e^s / (e^s + 1)) = log(1 + e^-s)
    assert float(info_nce(eye, eye, 0.0)) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert float(info_nce(3 * eye, eye, math.log(2.0))) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    four = torch.eye(4)
    assert float(info_nce(four, four, math.log(100.0))) < 1e-10
    # the logit scale is clamped at max_scale (CLIP: 100)
    assert float(info_nce(eye, eye, 50.0, max_scale=2.0)) == pytest.approx(
        math.log(1 + math.exp(-2)), rel=1e-6
    )
    # symmetric: swapping the modalities gives the same loss; gradients reach the learnable scale
    a, b = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.randn(5, 3)
    scale = torch.tensor(1.0, requires_grad=True)
    loss = info_nce(a, b, scale)
    assert float(loss.detach()) == pytest.approx(float(info_nce(b, a, 1.0)), rel=1e-6)
    loss.backward()
    assert scale.grad is not None and float(scale.grad) != 0
    with pytest.raises(ValueError, match="same shape"):
        info_nce(a, b[:, :2], 0.0)


def test_topology_prior_of_a_chain_by_hand():
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    groups = torch.zeros(3, dtype=torch.long)
    prior = topology_prior(coords, groups, knn=1, hops=2, decay=0.5)
    # kNN (k=1): 0->1, 1->0 (tie with 2, first position wins), 2->1; symmetric: edges 0-1, 1-2.
    # 1 hop: 0-1 and 1-2 (beta_1 = 1); exactly 2 hops: 0-2 (beta_2 = 0.5)
    expected = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.0]])
    torch.testing.assert_close(prior, expected)
    # one hop only: the 0-2 pair is not a neighbour
    torch.testing.assert_close(topology_prior(coords, groups, knn=1, hops=1), (expected == 1).float())


def test_spots_of_two_slides_are_never_neighbours():
    coords = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]])
    groups = torch.tensor([0, 1, 0, 1])  # each spot's nearest spot is of the other slide
    prior = topology_prior(coords, groups, knn=3, hops=3)
    assert float(prior[groups[:, None] != groups[None, :]].abs().sum()) == 0
    assert float(prior[0, 2]) == 1 and float(prior[1, 3]) == 1


def test_topology_loss_by_hand():
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    groups = torch.zeros(3, dtype=torch.long)
    # 1-hop prior of the chain, row-normalised: [0, 1, 0], [.5, 0, .5], [0, 1, 0]
    matching = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # cos 0-1 = cos 1-2 > 0, cos 0-2 = 0
    assert float(topology_loss(matching, coords, groups, knn=1, hops=1)) == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(3, 2)  # rows of S: [0, .5, .5], [.5, 0, .5], [.5, .5, 0]
    assert float(topology_loss(same, coords, groups, knn=1, hops=1)) == pytest.approx((0.5 + 0 + 0.5) / 3)
    # a spot of another slide, identical to spot 0, takes no part (no neighbour; never in S)
    coords4 = torch.cat([coords, torch.tensor([[0.0, 0.0]])])
    groups4 = torch.tensor([0, 0, 0, 1])
    z4 = torch.cat([same, torch.ones(1, 2)])
    assert float(topology_loss(z4, coords4, groups4, knn=1, hops=1)) == pytest.approx(1 / 3)


def test_fourier_features_and_per_slide_normalisation():
    features = FourierCoordinates(2)(torch.tensor([[0.0, 0.5]]))
    expected = [0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, -1.0]  # c, sin(pi c, 2 pi c), cos(...)
    np.testing.assert_allclose(features.numpy()[0], expected, atol=1e-6)
    coords = np.array([[100.0, 50.0], [300.0, 150.0], [5.0, 5.0], [5.0, 6.0]])
    groups = np.array(["a", "a", "b", "b"])
    np.testing.assert_allclose(normalise_coordinates(coords, groups), [[0, 0], [1, 0.5], [0, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"slide 'b'.*obsm\['spatial'\]"):
        normalise_coordinates(np.array([[1.0, 2.0], [3.0, 4.0], [7.0, 7.0], [7.0, 7.0]]), groups)


# --- spatially coherent batches ------------------------------------------------------------------------


def test_neighbourhoods_are_one_slide_compact_and_cover_every_spot(cohort):
    train = cohort[0]
    hoods = spatial_neighbourhoods(train.coords, train.groups, size=8, seed=0, epoch=0)
    every = np.concatenate(hoods)
    assert sorted(every) == list(range(len(train)))  # each spot exactly once per epoch
    for hood in hoods:
        assert len(set(train.groups[hood])) == 1
    # the first neighbourhood of a slide is its seed's 8 nearest spots: within 2 grid steps (150 px)
    first = hoods[0]
    spread = np.abs(train.coords[first] - train.coords[first[0]]).max()
    assert spread <= 2 * 150 and len(first) == 8
    again = spatial_neighbourhoods(train.coords, train.groups, size=8, seed=0, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(hoods, again, strict=True))
    other = spatial_neighbourhoods(train.coords, train.groups, size=8, seed=0, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(hoods, other, strict=False))


def test_batches_hold_whole_neighbourhoods_and_are_deterministic(cohort):
    train = cohort[0]
    args = {"size": 8, "batch_size": 32, "seed": 3}
    batches = neighbourhood_batches(train.coords, train.groups, epoch=0, **args)
    assert sorted(np.concatenate(batches)) == list(range(len(train)))
    assert all(2 <= len(b) <= 32 for b in batches)
    hoods = spatial_neighbourhoods(train.coords, train.groups, size=8, seed=3, epoch=0)
    where = {int(spot): i for i, hood in enumerate(hoods) for spot in hood}
    for batch in batches:  # a neighbourhood is never split between batches
        for i in {where[int(s)] for s in batch}:
            assert set(hoods[i]) <= set(batch.tolist())
    assert len({len(set(train.groups[b])) for b in batches} - {1}) > 0  # batches mix slides
    same = neighbourhood_batches(train.coords, train.groups, epoch=0, **args)
    assert all(np.array_equal(a, b) for a, b in zip(batches, same, strict=True))
    assert not np.array_equal(
        np.concatenate(batches),
        np.concatenate(neighbourhood_batches(train.coords, train.groups, epoch=1, **args)),
    )


def test_training_uses_the_coherent_batches(cohort, monkeypatch):
    train, validation, _ = cohort
    seen = []
    original = chrep_module.neighbourhood_batches

    def spy(*args, **kwargs):
        seen.append(kwargs["epoch"])
        return original(*args, **kwargs)

    monkeypatch.setattr(chrep_module, "neighbourhood_batches", spy)
    chrep(calibration="estimate").fit(train, validation, config(epochs=2, patience=5))
    assert seen == [0, 1]
    seen.clear()
    chrep(calibration="estimate", losses=("regression", "contrastive")).fit(
        train, validation, config(epochs=2)
    )
    assert seen == []  # without the topology loss, batches are shuffled as usual


# --- the method -----------------------------------------------------------------------------------------


def test_beats_the_mean_predictor(cohort):
    train, validation, test = cohort
    method = chrep()
    report = method.fit(train, validation, config())
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and pred.dtype == np.float32
    mean_mse = np.mean((train.targets.mean(0) - test.targets) ** 2)
    assert np.mean((pred - test.targets) ** 2) < 0.6 * mean_mse
    assert pcc_acg(test.targets, pred) > 0.6
    assert len(report.validation_loss) == len(report.train_loss)
    assert {"untrained_validation_loss", "representation_kept", "correction"} <= set(report.notes)
    assert set(report.train_terms) == {"regression", "contrastive", "topology"}
    assert method.embed(test).shape == (len(test), train.features.shape[1])  # q, the retrieval query


def test_estimate_is_the_softmax_weighted_retrieval_by_hand(cohort):
    train, validation, test = cohort
    method = chrep(calibration="estimate", estimate_temperature=0.05)
    method.fit(train, validation, config(epochs=3))
    assert "correction" not in method.report.notes
    gallery = np.concatenate([train.targets, validation.targets])
    np.testing.assert_array_equal(method.gallery.values.numpy(), gallery)
    np.testing.assert_allclose(
        method.gallery.keys.numpy(), np.concatenate([method.embed(train), method.embed(validation)])
    )
    expected = softmax_retrieval(method.embed(test), method.gallery.keys.numpy(), gallery, 10, 0.05)
    np.testing.assert_allclose(method.predict(test), expected, atol=1e-5)


def test_untrained_fallbacks_give_retrieval_on_the_backbone_features(cohort, monkeypatch):
    """When neither the training nor the correction beats r = 0 / the untrained encoder on validation,
    both are undone: the prediction is the retrieval on the frozen features themselves."""
    train, validation, test = cohort
    original = training.BestWeights.on_validation_end

    def untrained_wins(self, trainer, plan):
        original(self, trainer, plan)
        if trainer.state.fn != "fit":  # the validation run before training scores best
            self.best = -math.inf

    monkeypatch.setattr(training.BestWeights, "on_validation_end", untrained_wins)
    method = chrep(estimate_temperature=0.1)
    report = method.fit(train, validation, config(epochs=3))
    assert report.notes["representation_kept"] is False and report.notes["correction"]["kept"] is False
    assert report.best_epoch is None and len(report.validation_loss) > 0
    np.testing.assert_allclose(method.embed(test), test.features, rtol=1e-5, atol=1e-5)
    gallery_features = np.concatenate([train.features, validation.features])
    gallery = np.concatenate([train.targets, validation.targets])
    expected = softmax_retrieval(test.features, gallery_features, gallery, 10, 0.1)
    np.testing.assert_allclose(method.predict(test), expected, atol=1e-4)


def test_correction_kept_only_when_it_beats_the_estimate_on_validation(cohort):
    train, validation, test = cohort
    method = chrep(calibration="estimate+correction")
    report = method.fit(train, validation, config())
    notes = report.notes["correction"]
    assert notes["kept"] == (min(notes["validation_loss"]) < notes["zero_correction_loss"])
    residual = method.predict(test) - chrep_estimate_only(method, test)
    assert np.abs(residual).max() > 0 if notes["kept"] else np.abs(residual).max() == 0


def chrep_estimate_only(method, data):
    return method.gallery.predict(method.embed(data))


def test_the_gallery_is_the_fit_and_validation_spots(cohort):
    train, validation, test = cohort
    method = chrep()
    method.fit(train, validation, config())
    pred = method.predict(test)
    assert len(method.gallery) == len(train) + len(validation)
    changed = SpotSet(
        coords=train.coords, groups=train.groups, features=train.features, targets=train.targets[::-1].copy()
    )
    other = chrep()
    other.fit(changed, validation, config())
    assert not np.allclose(other.predict(test), pred)


@pytest.mark.parametrize("own_slide", [True, False])
def test_correction_training_excludes_self_and_optionally_own_slide(cohort, monkeypatch, own_slide):
    train, validation, _ = cohort
    calls = []
    original = gallery_module.cosine_topk

    def spy(queries, gallery, k, **kwargs):
        calls.append((len(queries), len(gallery), kwargs))
        return original(queries, gallery, k, **kwargs)

    monkeypatch.setattr(gallery_module, "cosine_topk", spy)
    method = chrep(exclude_own_slide=own_slide)
    report = method.fit(train, validation, config(epochs=2))
    correction_calls = [kw for nq, ng, kw in calls if kw.get("exclude_self")]
    assert len(correction_calls) == 1  # the fit spots' estimates, computed once
    (kwargs,) = correction_calls
    assert ("query_groups" in kwargs) == own_slide
    if own_slide:
        np.testing.assert_array_equal(kwargs["query_groups"], train.groups)
        np.testing.assert_array_equal(kwargs["gallery_groups"], train.groups)
    assert report.notes["correction"]["own_slide_excluded"] == own_slide
    # everything else (validation criterion, validation estimates) retrieves from the fit spots only
    assert all(ng == len(train) for _, ng, kw in calls if not kw.get("exclude_self"))


def test_own_slide_exclusion_needs_two_fit_slides(cohort):
    train, validation, _ = cohort
    one_slide = train.subset(np.flatnonzero(train.groups == "s0"))
    report = chrep().fit(one_slide, validation, config(epochs=2))
    assert report.notes["correction"]["own_slide_excluded"] is False


@pytest.mark.parametrize("calibration", chrep_module.CALIBRATIONS)
def test_every_calibration_runs(cohort, calibration):
    train, validation, test = cohort
    method = chrep(calibration=calibration)
    method.fit(train, validation, config(epochs=3))
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and np.isfinite(pred).all()
    queries = torch.from_numpy(method.embed(test))
    with torch.no_grad():
        residual = method.network.correction(queries).numpy()
    if calibration == "correction":
        np.testing.assert_allclose(pred, residual, atol=1e-5)
    else:
        np.testing.assert_allclose(pred, chrep_estimate_only(method, test) + residual, atol=1e-5)


def test_the_magnitude_constraint_shrinks_the_correction(cohort):
    train, _, test = cohort
    residuals = {}
    for calibration in ("estimate+correction", "estimate+correction+constraint"):
        method = chrep(calibration=calibration, correction_penalty=20.0)
        method.fit(train, None, config(epochs=5))  # no validation: the trained correction is kept
        with torch.no_grad():
            residuals[calibration] = method.network.correction(torch.from_numpy(method.embed(test))).numpy()
    free, constrained = (np.mean(r**2) for r in residuals.values())
    assert 0 < constrained < 0.5 * free


@pytest.mark.parametrize(
    ("losses", "trained", "untouched"),
    [
        (("regression", "contrastive"), {"head", "gene_encoder", "fuse"}, set()),
        (("regression", "topology"), {"head", "gene_encoder"}, {"fuse", "image_projection"}),
        (("contrastive", "topology"), {"gene_encoder", "fuse"}, {"head"}),
        (("regression",), {"head"}, {"gene_encoder", "fuse"}),
    ],
)
def test_every_loss_subset_trains_its_branches(cohort, losses, trained, untouched):
    train, _, _ = cohort
    cfg = config(epochs=2)
    method = chrep(losses=losses, calibration="estimate")
    method.fit(train, None, cfg)
    seed_everything(cfg.seed)  # the network as start_fit built it, before training
    initial = method.build(
        ImageInput.fit(train, encoder="efficientnet_lite0", weights=None), train.targets.shape[1]
    )
    for name in trained | untouched:
        before = nn.utils.parameters_to_vector(getattr(initial, name).parameters())
        after = nn.utils.parameters_to_vector(getattr(method.network, name).parameters())
        assert torch.equal(before, after) == (name in untouched), name


# --- end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_cohort(patch_spots):
    """Three tiny synthetic slides as patches: fit spots (two slides), validation and test spots (the third)."""
    spots, slides, _ = patch_spots(3, 12)
    last = np.flatnonzero(slides == slides[-1])
    return spots(np.flatnonzero(slides != slides[-1])), spots(last[::2]), spots(last[1::2])


def test_end2end_one_epoch_and_round_trip(patch_cohort, tiny_encoder, round_trip):
    train, validation, test = patch_cohort
    method = chrep(encoder=tiny_encoder(), weights=None, top_k=5, neighbourhood_size=6, knn=2)
    report = method.fit(train, validation, config(epochs=1, batch_size=12))
    assert len(report.train_loss) == 1 and np.isfinite(report.train_loss[0])
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and np.isfinite(pred).all()
    assert method.embed(test).shape == (len(test), 6)
    loaded = round_trip(method, encoder=tiny_encoder())
    np.testing.assert_array_equal(loaded.predict(test), pred)


def test_fit_histo2expr_cross_validates_chrep():
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=9, n_genes=30)
    hx.pp.normalize(adata)
    rng = np.random.default_rng(0)
    expression = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    adata.obsm["X_histo"] = (
        expression @ rng.normal(size=(30, 8)) + rng.normal(size=(adata.n_obs, 8))
    ).astype(np.float32)
    hx.tl.fit_histo2expr(
        adata,
        method="chrep",
        genes=10,
        cv="leave_one_slide_out",
        epochs=3,
        batch_size=32,
        progress=False,
        **SMALL,
    )
    folds = adata.uns["histo2expr"]["folds"]
    assert len(folds) == 3 and np.isfinite(folds["pcc_acg"]).all()


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"calibration": "retrieval"}, "calibration"),
        ({"losses": ()}, "non-empty"),
        ({"losses": ("regression", "mse")}, r"unknown: \['mse'\]"),
        ({"knn": 8, "neighbourhood_size": 8}, "must exceed `knn=8`"),
        ({"hop_decay": 0.0}, "hop_decay"),
        ({"top_k": 0}, "top_k"),
        ({"estimate_temperature": 0}, "estimate_temperature"),
        ({"correction_penalty": -1.0}, "correction_penalty"),
        ({"exclude_own_slide": "yes"}, "exclude_own_slide"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chrep(**params)


def test_bad_data_is_a_clear_error(cohort):
    train, validation, _ = cohort
    flat = SpotSet(
        coords=np.zeros_like(train.coords),
        groups=train.groups,
        features=train.features,
        targets=train.targets,
    )
    with pytest.raises(ValueError, match=r"obsm\['spatial'\]"):
        chrep().fit(flat, validation, config(epochs=1))
    chrep(losses=("regression",)).fit(flat, validation, config(epochs=1))  # coordinates are not needed then
    with pytest.raises(ValueError, match="exceeds the batch size 8"):
        chrep(neighbourhood_size=12).fit(train, validation, config(batch_size=8))
    small = train.subset(np.arange(30))
    with pytest.raises(ValueError, match=r"top_k=50.*retrieval gallery"):
        chrep(top_k=50).fit(small, validation.subset(np.arange(10)), config(epochs=1))
    with pytest.raises(ValueError, match=r"top_k=30.*smaller than the 30 fit spots"):
        chrep(top_k=30).fit(small, validation, config(epochs=1))
    with pytest.raises(ValueError, match=r"exclude_own_slide=False"):
        chrep(top_k=70).fit(train, validation, config(epochs=1))  # 64 spots of the other fit slide
