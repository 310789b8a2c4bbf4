import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from histo2expr.metrics import pcc_acg
from histo2expr.models.base import SpotSet, TrainConfig, get_method
from histo2expr.models.layers import ProjectionHead
from histo2expr.models.losses import bleep_loss, pcc_loss
from histo2expr.models.retrieval import cosine_topk, faiss_available
from histo2expr.patches import dihedral

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    values = {"epochs": 40, "batch_size": 32, "lr": 1e-2, "patience": 5, "progress": False}
    return TrainConfig(**{**values, **changes})


def frozen_spots(features, targets=None, slide="a") -> SpotSet:
    n = len(features)
    return SpotSet(coords=np.zeros((n, 2)), groups=np.full(n, slide), features=features, targets=targets)


def linear_cohort(rng, n=300, d=12, g=6, noise=0.3):
    """Features with a few wild scales and expression linear in them: train / validation / test."""
    features = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, size=d) + rng.normal(scale=20, size=d)
    signal = ((features - features.mean(0)) / features.std(0)) @ rng.normal(size=(d, g)) / np.sqrt(d)
    targets = signal + noise * rng.normal(size=(n, g))
    targets = ((targets - targets.mean(0)) / targets.std(0)).astype(np.float32)
    parts = np.split(np.arange(n), [int(0.6 * n), int(0.8 * n)])
    return [frozen_spots(features[p], targets[p], slide=s) for p, s in zip(parts, "abc", strict=True)]


def clustered_cohort(rng, n=320, d=10, g=8, n_clusters=4):
    """Spots in clusters: features near a cluster centre, expression near the cluster's profile."""
    labels = rng.integers(n_clusters, size=n)
    centres, profiles = rng.normal(size=(n_clusters, d)) * 3, rng.normal(size=(n_clusters, g)) * 2
    features = centres[labels] + rng.normal(size=(n, d))
    targets = profiles[labels] + 0.5 * rng.normal(size=(n, g))
    targets = ((targets - targets.mean(0)) / targets.std(0)).astype(np.float32)
    parts = np.split(np.arange(n), [n // 2, 3 * n // 4])
    return [frozen_spots(features[p], targets[p], slide=s) for p, s in zip(parts, "abc", strict=True)]


@pytest.fixture(scope="module")
def patch_cohort(patch_spots):
    """Two tiny synthetic slides: end-to-end training spots (slide 0), validation and test spots (slide 1)."""
    spots, slides, source = patch_spots(2, 20)
    first = np.flatnonzero(slides == slides[0])
    other = np.flatnonzero(slides != slides[0])
    return spots(first), spots(other[::2]), spots(other[1::2]), source


# --- losses and layers -------------------------------------------------------------------------------


def test_bleep_loss_two_by_two_by_hand():
    eye = torch.eye(2)
    # logits = I, targets = rows of softmax(I): (e, 1) / (1 + e); both directions alike
    expected = math.log(1 + math.e) - math.e / (1 + math.e)
    assert float(bleep_loss(eye, eye)) == pytest.approx(expected, rel=1e-6)


def _bleep_reference(image, gene, tau):
    """Direct numpy computation with explicit loops over the batch."""
    image, gene = image.astype(np.float64), gene.astype(np.float64)
    logits = gene @ image.T / tau
    sims = (image @ image.T + gene @ gene.T) / 2 * tau
    targets = np.exp(sims - sims.max(1, keepdims=True))
    targets /= targets.sum(1, keepdims=True)

    def log_softmax(row):
        return row - row.max() - np.log(np.exp(row - row.max()).sum())

    total = 0.0
    for i in range(len(image)):
        spot_loss = -(targets[i] * log_softmax(logits[i])).sum()  # expression i against all images
        image_loss = -(targets[:, i] * log_softmax(logits[:, i])).sum()  # image i against all expressions
        total += (spot_loss + image_loss) / 2
    return total / len(image)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_bleep_loss_matches_numpy_and_keeps_its_axes(rng, tau):
    image, gene = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    loss = float(bleep_loss(torch.from_numpy(image), torch.from_numpy(gene), temperature=tau))
    assert loss == pytest.approx(_bleep_reference(image, gene, tau), rel=1e-5)
    swapped = float(bleep_loss(torch.from_numpy(gene), torch.from_numpy(image), temperature=tau))
    assert swapped == pytest.approx(_bleep_reference(gene, image, tau), rel=1e-5)
    assert abs(swapped - loss) > 1e-4  # the roles of image and expression are not interchangeable


def test_bleep_loss_symmetries_and_errors(rng):
    image = torch.from_numpy(rng.normal(size=(5, 3)).astype(np.float32))
    gene = torch.from_numpy(rng.normal(size=(5, 3)).astype(np.float32))
    loss = float(bleep_loss(image, gene))
    # the order of the spots in the batch does not matter
    order = torch.from_numpy(rng.permutation(5))
    assert float(bleep_loss(image[order], gene[order])) == pytest.approx(loss, rel=1e-5)
    # only dot products matter: rotating both embeddings together changes nothing
    rotation = torch.from_numpy(np.linalg.qr(rng.normal(size=(3, 3)))[0].astype(np.float32))
    assert float(bleep_loss(image @ rotation, gene @ rotation)) == pytest.approx(loss, rel=1e-5)
    # identical embeddings: the expression -> image direction reaches its minimum, the targets' entropy
    x = image.numpy()
    targets = torch.softmax(image @ image.T, dim=-1).numpy()
    entropy = -(targets * np.log(targets)).sum(1).mean()
    assert float(bleep_loss(image, image)) == pytest.approx(_bleep_reference(x, x, 1.0), rel=1e-5)
    assert float(bleep_loss(image, image)) >= entropy - 1e-6
    with pytest.raises(ValueError, match="same shape"):
        bleep_loss(image, gene[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        bleep_loss(image, gene, temperature=0.0)


def test_pcc_loss_perfect_anti_and_constant(rng):
    target = torch.from_numpy(rng.normal(size=(10, 4)).astype(np.float32))
    assert float(pcc_loss(2 * target + 3, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(pcc_loss(-target, target)) == pytest.approx(2.0, abs=1e-6)
    constant = target.clone()
    constant[:, 0] = 1.0  # one gene constant in the prediction: correlation 0 for that gene
    assert float(pcc_loss(constant, target)) == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 spots"):
        pcc_loss(target[:1], target[:1])


def test_projection_head_shapes_and_residual(rng):
    head = ProjectionHead(7, out_dim=5, dropout=0.1).eval()
    x = torch.from_numpy(rng.normal(size=(3, 7)).astype(np.float32))
    out = head(x)
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out.mean(1).detach(), 0, atol=1e-5)  # ends with a LayerNorm
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.bias.zero_()
    # without the second branch only the residual (the first linear's output) is normalised
    expected = nn.functional.layer_norm(head.projection(x), (5,), head.norm.weight, head.norm.bias)
    torch.testing.assert_close(head(x), expected)
    assert [type(m).__name__ for m in head.children()] == ["Linear", "GELU", "Linear", "Dropout", "LayerNorm"]


# --- stnet ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("closed_form", [True, False])
def test_stnet_frozen_learns_a_linear_signal(rng, closed_form):
    train, validation, test = linear_cohort(rng)
    method = get_method("stnet")(closed_form=closed_form)
    report = method.fit(train, validation, config())
    pred = method.predict(test)
    assert pred.shape == test.targets.shape
    assert pred.dtype == np.float32
    assert pcc_acg(test.targets, pred) > 0.8
    mean_mse = np.mean((train.targets.mean(0) - test.targets) ** 2)
    assert np.mean((pred - test.targets) ** 2) < 0.5 * mean_mse
    assert method.embed(test).shape == (len(test), 12)
    assert (
        len(report.validation_loss)
        == len(report.train_loss)
        == (0 if closed_form else len(report.train_loss))
    )


def test_stnet_closed_form_head_is_the_penalised_least_squares_optimum(rng):
    train, validation, _ = linear_cohort(rng, n=200, d=30, noise=2.0)
    method = get_method("stnet")(alphas=(0.01, 1.0, 100.0))
    notes = method.fit(train, validation, config()).notes
    assert (
        notes["solver"] == "closed_form"
        and notes["alpha"] == (0.01, 1.0, 100.0)[np.argmax(notes["validation_pcc"])]
    )
    # the head was solved on the training and validation spots: the ridge objective's gradient vanishes there
    x = torch.as_tensor(np.concatenate([method.embed(train), method.embed(validation)]), dtype=torch.float64)
    y = torch.as_tensor(np.concatenate([train.targets, validation.targets]), dtype=torch.float64)
    head = method.network.head.layers[-1]
    weight = head.weight.detach().double().requires_grad_()
    bias = head.bias.detach().double().requires_grad_()
    objective = ((x @ weight.T + bias - y) ** 2).sum() + notes["alpha"] * len(x) * (weight**2).sum()
    objective.backward()
    assert weight.grad.abs().max() < 1e-3 * len(x) and bias.grad.abs().max() < 1e-3 * len(x)
    # without validation spots the middle penalty is used
    assert get_method("stnet")(alphas=(0.01, 1.0, 100.0)).fit(train, None, config()).notes["alpha"] == 1.0


def test_stnet_early_stopping_keeps_the_best_validation_epoch(rng):
    train, validation, _ = linear_cohort(rng, n=100, d=40, noise=3.0)  # overfits fast
    method = get_method("stnet")(hidden=64)
    report = method.fit(train, validation, config(epochs=200, patience=3, lr=3e-2))
    assert report.best_epoch == int(np.argmin(report.validation_loss))
    assert len(report.train_loss) == report.best_epoch + 4 < 200  # stopped `patience` epochs later
    # the weights kept are the best epoch's: their validation MSE is the recorded best loss
    mse = np.mean((method.predict(validation) - validation.targets) ** 2)
    assert mse == pytest.approx(report.validation_loss[report.best_epoch], rel=1e-5)
    # patience=None is the method's own default_patience: here 3, the same fit as patience=3
    patient = type("PatientSTNet", (type(method),), {"default_patience": 3})(hidden=64)
    own = patient.fit(train, validation, config(epochs=200, patience=None, lr=3e-2))
    assert own.validation_loss == report.validation_loss and own.best_epoch == report.best_epoch


def test_stnet_end2end_prediction_is_the_mean_over_8_views(patch_cohort, tiny_encoder):
    train, validation, test, source = patch_cohort
    mine = tiny_encoder()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    method = get_method("stnet")(encoder=mine, weights=None)
    report = method.fit(train, validation, config(epochs=1, batch_size=8))
    assert len(report.train_loss) == 1
    for key, value in mine.state_dict().items():  # the caller's module is copied, not trained in place
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    pred = method.predict(test)
    # a spot's prediction does not depend on the rest of its batch (evaluation mode, BatchNorm included)
    np.testing.assert_allclose(method.predict(test.subset(np.arange(3))), pred[:3], atol=1e-6)
    encoder, head = method.network.image_input.encoder, method.network.head
    images = torch.from_numpy(source.read(test.indices)).permute(0, 3, 1, 2)
    with torch.no_grad():
        views = [head(encoder(dihedral(images, k))).numpy() for k in range(8)]
        features = [encoder(dihedral(images, k)).numpy() for k in range(8)]
    np.testing.assert_allclose(pred, np.mean(views, axis=0), atol=1e-5)
    np.testing.assert_allclose(method.embed(test), np.mean(features, axis=0), atol=1e-5)
    assert not np.allclose(views[0], views[5], atol=1e-4)  # the views do differ
    method.settings = dataclasses.replace(method.settings, tta=False)
    np.testing.assert_allclose(method.predict(test), views[0], atol=1e-5)


# --- bleep ---------------------------------------------------------------------------------------------


def test_bleep_frozen_retrieves_training_spots_only(rng):
    train, validation, test = clustered_cohort(rng)
    method = get_method("bleep")(projection_dim=32, top_k=10)
    method.fit(train, validation, config(epochs=30))
    pred = method.predict(test)
    gallery = np.concatenate([train.targets, validation.targets])
    np.testing.assert_array_equal(method.gallery.values.numpy(), gallery)
    _, indices = cosine_topk(method.embed(test), method.gallery.keys, 10)
    np.testing.assert_allclose(pred, gallery[indices].mean(axis=1), atol=1e-6)
    # the training expression changes the predictions (held-out spots never do: the contract tests)
    changed = frozen_spots(train.features, train.targets[::-1].copy(), slide="a")
    other = get_method("bleep")(projection_dim=32, top_k=10)
    other.fit(changed, validation, config(epochs=30))
    assert not np.allclose(other.predict(test), pred)


def test_bleep_frozen_beats_the_mean_predictor_on_clusters(rng):
    train, validation, test = clustered_cohort(rng)
    method = get_method("bleep")(projection_dim=32, top_k=10)
    method.fit(train, validation, config(epochs=30))
    pred = method.predict(test)
    assert pred.shape == test.targets.shape
    mean_mse = np.mean((train.targets.mean(0) - test.targets) ** 2)
    assert np.mean((pred - test.targets) ** 2) < 0.5 * mean_mse
    assert pcc_acg(test.targets, pred) > 0.7
    assert method.embed(test).shape == (len(test), 32)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")
def test_bleep_predicts_with_the_ivf_gallery_index(rng, round_trip):
    train, validation, test = clustered_cohort(rng)
    exact = get_method("bleep")(projection_dim=32, top_k=10)
    exact.fit(train, validation, config(epochs=5))
    method = get_method("bleep")(projection_dim=32, top_k=10, gallery_index="ivf")
    method.fit(train, validation, config(epochs=5))
    assert (method.gallery.index, exact.gallery.index) == ("ivf", "exact")
    np.testing.assert_array_equal(method.gallery.keys.numpy(), exact.gallery.keys.numpy())  # same seeded fit
    # a gallery this small has fewer than 16 lists, all scanned: only the 4-bit codes' ranking is approximate
    assert np.mean(np.abs(method.predict(test) - exact.predict(test))) < 0.1 * np.mean(
        np.abs(exact.predict(test))
    )
    loaded = round_trip(method)
    assert loaded.gallery.index == "ivf"
    np.testing.assert_array_equal(loaded.predict(test), method.predict(test))
    with pytest.raises(ValueError, match="`gallery_index` must be one of"):
        get_method("bleep")(gallery_index="hnsw")


def test_bleep_top_k_larger_than_the_gallery_is_an_error(rng):
    train, validation, _ = clustered_cohort(rng, n=40)
    with pytest.raises(ValueError, match=r"top_k=50.*30 training and validation spots"):
        get_method("bleep")().fit(train, validation, config(epochs=1))


def test_custom_encoder_state_needs_a_module_of_the_same_architecture(patch_cohort, tiny_encoder, round_trip):
    train, validation, test, _ = patch_cohort
    custom = get_method("stnet")(encoder=tiny_encoder())
    custom.fit(train, validation, config(epochs=1, batch_size=8))
    assert custom.state_dict()["settings"]["encoder"] == "TinyEncoder"
    with pytest.raises(ValueError, match="custom encoder module"):
        round_trip(custom)
    loaded = round_trip(custom, encoder=tiny_encoder())
    np.testing.assert_array_equal(loaded.predict(test), custom.predict(test))


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("stnet", {"hidden": 0}, "hidden"),
        ("stnet", {"dropout": 1.0}, "dropout"),
        ("stnet", {"tta": "yes"}, "tta"),
        ("stnet", {"closed_form": 1}, "closed_form"),
        ("stnet", {"alphas": (1.0, -1.0)}, "alphas"),
        ("stnet", {"encoder": 3}, "encoder"),
        ("bleep", {"top_k": 0}, "top_k"),
        ("bleep", {"temperature": 0}, "temperature"),
        ("bleep", {"projection_dim": 2.5}, "projection_dim"),
    ],
)
def test_bad_parameters_are_clear_errors(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        get_method(name)(**params)


def test_wrong_data_is_a_clear_error(rng, patch_cohort):
    train, validation, test = linear_cohort(rng, n=60)
    method = get_method("stnet")()
    with pytest.raises(ValueError, match="targets"):
        method.fit(frozen_spots(train.features), None, config(epochs=1))
    with pytest.raises(ValueError, match="6 genes"):
        method.fit(train, frozen_spots(validation.features, validation.targets[:, :2]), config(epochs=1))
    method.fit(train, validation, config(epochs=1))
    with pytest.raises(ValueError, match="12 features"):
        method.predict(frozen_spots(test.features[:, :5]))
    with pytest.raises(ValueError, match="'frozen' regime but got 'end2end'"):
        method.predict(patch_cohort[2])
