import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import histo2expr as hx
from histo2expr.metrics import pcc_acg
from histo2expr.models.base import SpotSet, TrainConfig, concat_spots, get_method
from histo2expr.models.cmrcnet import (
    CrossModalReconstruction,
    cmrcnet_loss,
    mask_elements,
    reconstruction_error,
)
from histo2expr.models.layers import ImageInput, pool_token_grid
from histo2expr.models.losses import bleep_loss

SMALL = {
    "projection_dim": 16,
    "reconstruction_dim": 16,
    "gene_tokens": 2,
    "cross_heads": 2,
    "fusion_heads": 4,
    "mlp_ratio": 2.0,
    "top_k": 10,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    values = {"epochs": 10, "batch_size": 32, "lr": 1e-2, "patience": 4, "progress": False}
    return TrainConfig(**{**values, **changes})


def cmrcnet(**params):
    return get_method("cmrcnet")(**{**SMALL, **params})


def token_cohort(seed=0, n_slides=4, n=60, t=4, d=12, g=6):
    """Slides whose spots carry ``t`` tokens each; latent programmes drive the tokens (plus noise) and expression."""
    rng = np.random.default_rng(seed)
    loadings, profiles = rng.normal(size=(3, d)) * 2, rng.normal(size=(3, g))
    slides = []
    for s in range(n_slides):
        programmes = rng.normal(size=(n, 3))
        tokens = (
            programmes[:, None, :] @ loadings + 0.5 * rng.normal(size=(n, t, d)) + rng.normal(size=d) * 0.2
        )
        targets = programmes @ profiles + 0.2 * rng.normal(size=(n, g))
        slides.append(
            SpotSet(
                coords=rng.uniform(0, 1000, size=(n, 2)),
                groups=np.full(n, f"s{s}"),
                features=tokens.astype(np.float32),
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
    return token_cohort()


# --- losses and masking ---------------------------------------------------------------------------------


def test_reconstruction_errors_and_total_loss_by_hand():
    rebuilt = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 4.0]])
    # squared errors 1, 1, 0, 4 -> mean 1.5; cosines 0 and 1 -> 1 - mean = 0.5
    assert float(reconstruction_error(rebuilt, target, "mse")) == pytest.approx(1.5)
    assert float(reconstruction_error(rebuilt, target, "cosine")) == pytest.approx(0.5)
    assert float(cmrcnet_loss(torch.tensor(1.0), torch.tensor(3.0))) == pytest.approx(math.log(8))
    assert float(cmrcnet_loss(torch.tensor(0.0), torch.tensor(0.0))) == 0
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_error(rebuilt, target[:1])
    with pytest.raises(ValueError, match="kind"):
        reconstruction_error(rebuilt, target, "l1")


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.7])
def test_masking_rate_is_honoured(rate):
    values = torch.ones(100, 50, 40)
    masked = mask_elements(values, rate, generator=torch.Generator().manual_seed(0))
    assert float((masked == 0).float().mean()) == pytest.approx(rate, abs=0.01)
    assert set(masked.unique().tolist()) <= {0.0, 1.0}  # zeroed, not rescaled like dropout
    again = mask_elements(values, rate, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(masked.numpy(), again.numpy())


def test_reconstruction_masks_the_projected_tokens_at_the_rate(monkeypatch):
    from histo2expr.models import cmrcnet as module

    seen = []

    def spy(values, rate, *, generator=None):
        out = mask_elements(values, rate, generator=generator)
        seen.append((values.shape, float((out == 0).float().mean()), rate))
        return out

    monkeypatch.setattr(module, "mask_elements", spy)
    torch.manual_seed(0)
    rec = CrossModalReconstruction(
        12, 6, 16, 8, mask_rate=0.7, gene_tokens=2, gene_dropout=0.25, cross_heads=2,
        fusion_heads=4, fusion_blocks=2, mlp_ratio=2.0,
    )  # fmt: skip
    tokens, expression = torch.randn(64, 9, 12), torch.randn(64, 6)
    out = rec(tokens, expression)
    assert out.shape == (64, 8)  # F_r mapped to the target's width
    ((shape, fraction, rate),) = seen
    assert shape == (64, 9, 16) and rate == 0.7 and fraction == pytest.approx(0.7, abs=0.02)
    rec.eval()  # a fixed mask in evaluation mode: validation losses are comparable across epochs
    np.testing.assert_array_equal(rec(tokens, expression).detach(), rec(tokens, expression).detach())


def test_fusion_blocks_have_their_own_weights_and_gene_tokens_their_shape():
    rec = CrossModalReconstruction(
        12, 6, 16, 16, mask_rate=0.5, gene_tokens=8, gene_dropout=0.25, cross_heads=4,
        fusion_heads=8, fusion_blocks=2, mlp_ratio=4.0,
    )  # fmt: skip
    assert rec.gene_tokens(torch.randn(3, 6)).shape == (3, 8, 16)
    first, second = (dict(block.named_parameters()) for block in rec.blocks)
    assert first.keys() == second.keys()
    assert all(first[k].data_ptr() != second[k].data_ptr() for k in first)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert rec.cross.num_heads == 4 and all(
        b.attention.num_heads == b.cross.attention.num_heads == 8 for b in rec.blocks
    )
    assert isinstance(rec.output, torch.nn.Identity)


def test_loss_is_the_log_balanced_sum_of_its_terms(cohort):
    train, _, _ = cohort
    method = cmrcnet(reconstruction_loss="cosine")
    method.n_genes = train.targets.shape[1]
    torch.manual_seed(0)
    image_input = ImageInput.fit(train, encoder="efficientnet_lite0", weights=None)
    network = method.build(image_input, method.n_genes).eval()
    prepared = image_input.prepare(train)
    batch = {
        "features": torch.as_tensor(prepared.features[:20]),
        "targets": torch.as_tensor(train.targets[:20]),
    }
    with torch.no_grad():
        image = network.image_head(batch["features"].mean(1))
        gene = network.gene_head(batch["targets"])
        rebuilt = network.reconstruction(batch["features"], batch["targets"])
        expected = math.log1p(float(bleep_loss(image, gene))) + math.log1p(
            float((1 - F.cosine_similarity(rebuilt, image, dim=1)).mean())
        )
        output = network.loss(batch)
        assert float(output.loss) == pytest.approx(expected, rel=1e-5)
        assert float(output.terms["contrastive"]) == pytest.approx(float(bleep_loss(image, gene)), rel=1e-5)
        method.settings = dataclasses.replace(method.settings, reconstruction_target="expression")
        network = method.build(image_input, method.n_genes).eval()
        image, gene = network.image_head(batch["features"].mean(1)), network.gene_head(batch["targets"])
        rebuilt = network.reconstruction(batch["features"], batch["targets"])
        expected = math.log1p(float(bleep_loss(image, gene))) + math.log1p(
            float((1 - F.cosine_similarity(rebuilt, gene, dim=1)).mean())
        )
        assert float(network.loss(batch).loss) == pytest.approx(expected, rel=1e-5)


# --- the method -----------------------------------------------------------------------------------------


def test_beats_the_mean_predictor(cohort):
    assert get_method("cmrcnet").token_input and not get_method("bleep").token_input
    train, validation, test = cohort
    method = cmrcnet()
    report = method.fit(train, validation, config())
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and pred.dtype == np.float32
    mean_mse = np.mean((train.targets.mean(0) - test.targets) ** 2)
    assert np.mean((pred - test.targets) ** 2) < 0.7 * mean_mse
    assert pcc_acg(test.targets, pred) > 0.5
    assert len(report.validation_loss) == len(report.train_loss)
    assert method.embed(test).shape == (len(test), 16)
    assert set(report.train_terms) == {"contrastive", "reconstruction"}


def test_reconstruction_off_is_bleep_bit_for_bit(cohort):
    pooled = [SpotSet(s.coords, s.groups, features=s.features.mean(1), targets=s.targets) for s in cohort]
    bleep = get_method("bleep")(projection_dim=16, top_k=10)
    bleep.fit(pooled[0], pooled[1], config(epochs=3))
    off = cmrcnet(reconstruction=False, average_epochs=None, early_stopping="loss")
    off.fit(pooled[0], pooled[1], config(epochs=3))
    assert off.network.reconstruction is None
    np.testing.assert_array_equal(off.predict(pooled[2]), bleep.predict(pooled[2]))
    on = cmrcnet()
    on.fit(pooled[0], pooled[1], config(epochs=3))
    assert not np.array_equal(on.predict(pooled[2]), bleep.predict(pooled[2]))


def test_training_averages_the_weights_by_default(cohort, monkeypatch):
    from histo2expr.models import layers

    options = []

    def spy(*args, **kwargs):
        options.append(kwargs.get("average_epochs"))
        return train_network(*args, **kwargs)

    train_network = layers.train_network
    monkeypatch.setattr(layers, "train_network", spy)
    train, validation, test = cohort
    averaged, plain = cmrcnet(), cmrcnet(average_epochs=None)
    averaged.fit(train, validation, config(epochs=4))
    plain.fit(train, validation, config(epochs=4))
    assert options == [3.0, None]
    assert not np.array_equal(averaged.embed(test), plain.embed(test))


def test_retrieval_uses_the_training_spots_only(cohort):
    train, validation, test = cohort
    method = cmrcnet()
    method.fit(train, validation, config(epochs=4))
    pred = method.predict(test)
    gallery = np.concatenate([train.targets, validation.targets])
    np.testing.assert_array_equal(method.gallery.values.numpy(), gallery)
    # every prediction is the plain mean of top_k gallery rows, so it lies within the gallery's range
    assert (pred >= gallery.min(0) - 1e-5).all() and (pred <= gallery.max(0) + 1e-5).all()
    changed = SpotSet(train.coords, train.groups, features=train.features, targets=train.targets[::-1].copy())
    other = cmrcnet()
    other.fit(changed, validation, config(epochs=4))
    assert not np.allclose(other.predict(test), pred)


def _record_validation_galleries(monkeypatch) -> list:
    """Patch the retrieval validation plan so that each pass's gallery values are recorded (returned list)."""
    from histo2expr.models.bleep import RetrievalValidation

    seen = []
    start = RetrievalValidation.on_validation_epoch_start

    def recording(plan):
        start(plan)
        seen.append(plan.gallery.values.numpy().copy())

    monkeypatch.setattr(RetrievalValidation, "on_validation_epoch_start", recording)
    return seen


@pytest.mark.parametrize("method", ["cmrcnet", "bleep"])
def test_pcc_early_stopping_scores_the_retrieval_from_the_fit_spots(cohort, method, monkeypatch):
    train, validation, _ = cohort
    if method == "bleep":  # pooled features
        train, validation = (SpotSet(s.coords, s.groups, features=s.features.mean(1), targets=s.targets)
                             for s in (train, validation))  # fmt: skip
        fitted = get_method("bleep")(projection_dim=16, top_k=SMALL["top_k"], early_stopping="pcc")
    else:
        fitted = cmrcnet(early_stopping="pcc", average_epochs=None)
    galleries = _record_validation_galleries(monkeypatch)
    report = fitted.fit(train, validation, config(epochs=1))
    # by hand, with the weights kept (epoch 0's, the only one): queries of the validation spots against
    # keys of the fit spots' expression, the plain mean of the top_k nearest, gene-wise PCC
    network = fitted.network.eval()
    with torch.no_grad():
        keys = network.gene_head(torch.from_numpy(train.targets)).numpy()
    queries = fitted.embed(validation)
    similarity = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, : SMALL["top_k"]]
    predicted = train.targets[nearest].mean(axis=1)
    pcc = np.mean(
        [np.corrcoef(predicted[:, g], validation.targets[:, g])[0, 1] for g in range(train.targets.shape[1])]
    )
    assert report.validation_loss == pytest.approx([1 - pcc], abs=1e-5)
    assert len(galleries) == 1


def test_pcc_early_stopping_never_puts_validation_expression_in_the_gallery(cohort, monkeypatch):
    train, validation, _ = cohort
    galleries = _record_validation_galleries(monkeypatch)
    method = cmrcnet()  # early_stopping="pcc" by default
    report = method.fit(train, validation, config(epochs=4, patience=10))
    assert len(galleries) == len(report.validation_loss) == 4
    for values in galleries:  # exactly the fit spots' expression, row for row
        np.testing.assert_array_equal(values, train.targets)
    # the validation spots' expression chooses the epoch only: it changes no gallery of the validation passes
    shuffled = SpotSet(validation.coords, validation.groups, features=validation.features,
                       targets=validation.targets[::-1].copy())  # fmt: skip
    galleries.clear()
    cmrcnet(early_stopping="pcc").fit(train, shuffled, config(epochs=4, patience=10))
    for values in galleries:
        np.testing.assert_array_equal(values, train.targets)
    # early_stopping="loss" stops on the training loss, with no retrieval gallery during training
    galleries.clear()
    cmrcnet(early_stopping="loss").fit(train, validation, config(epochs=2))
    assert galleries == []


def test_top_k_500_setting_and_gallery_bound(cohort):
    train, validation, test = cohort
    method = cmrcnet(top_k=len(train) + len(validation))
    method.fit(train, validation, config(epochs=2))
    gallery_mean = np.concatenate([train.targets, validation.targets]).mean(0)
    np.testing.assert_allclose(method.predict(test), np.tile(gallery_mean, (len(test), 1)), atol=1e-5)
    with pytest.raises(ValueError, match=r"top_k=500.*retrieval gallery"):
        cmrcnet(top_k=500).fit(train, validation, config(epochs=1))


def test_larger_token_grids_are_pooled_to_token_grid(cohort):
    rng = np.random.default_rng(1)
    grid = [
        SpotSet(s.coords, s.groups, features=np.repeat(s.features, 4, axis=1) + 0.1 * rng.normal(size=(len(s), 16, 12)).astype(np.float32), targets=s.targets)
        for s in cohort
    ]  # fmt: skip
    method = cmrcnet(token_grid=2)
    method.fit(grid[0], grid[1], config(epochs=1))
    batch = {"features": torch.as_tensor(grid[2].features[:3])}
    pooled = method.network.tokens(batch)
    assert pooled.shape == (3, 4, 12)
    np.testing.assert_allclose(pooled, pool_token_grid(batch["features"], 2))
    assert cmrcnet(token_grid=None).fit(grid[0], grid[1], config(epochs=1)) is not None


def test_settings_survive_the_state(cohort, round_trip):
    train, validation, _ = cohort
    method = cmrcnet(mask_rate=0.3, reconstruction_target="expression")
    method.fit(train, validation, config(epochs=2))
    loaded = round_trip(method)
    assert loaded.settings == method.settings
    assert loaded.network.reconstruction is not None and loaded.network.reconstruction.mask_rate == 0.3


def test_end2end_one_epoch_and_round_trip(patch_spots, tiny_encoder, round_trip):
    spots, slides, _ = patch_spots(3, 12)
    last = np.flatnonzero(slides == slides[-1])
    train, validation, test = spots(np.flatnonzero(slides != slides[-1])), spots(last[::2]), spots(last[1::2])
    method = cmrcnet(encoder=tiny_encoder(), weights=None, top_k=5)
    report = method.fit(train, validation, config(epochs=1, batch_size=12))
    assert len(report.train_loss) == 1 and np.isfinite(report.train_loss[0])
    assert method.network.image_input.token_dim == 6  # no forward_features: the pooled features are one token
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and np.isfinite(pred).all()
    loaded = round_trip(method, encoder=tiny_encoder())
    np.testing.assert_array_equal(loaded.predict(test), pred)


# --- tokens through tl -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _token_adata():
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=9, n_genes=30)
    hx.pp.normalize(adata)
    rng = np.random.default_rng(0)
    expression = adata.X.toarray()
    pooled = expression @ rng.normal(size=(30, 8)) + rng.normal(size=(adata.n_obs, 8))
    adata.obsm["X_histo"] = pooled.astype(np.float32)
    adata.obsm["X_histo_tokens"] = (pooled[:, None, :] + rng.normal(size=(adata.n_obs, 4, 8))).astype(
        np.float32
    )
    return adata


@pytest.fixture
def token_adata(_token_adata):
    return _token_adata.copy()


def test_fit_and_predict_use_the_tokens(token_adata, tmp_path):
    adata = token_adata
    model = hx.tl.fit_histo2expr(
        adata, method="cmrcnet", genes=10, cv="leave_one_slide_out", epochs=2, progress=False, **SMALL
    )
    params = adata.uns["histo2expr"]["params"]
    assert params["token_rep"] == "X_histo_tokens" and params["n_tokens"] == 4 and params["n_features"] == 8
    assert (
        model.token_rep == "X_histo_tokens" and np.isfinite(adata.uns["histo2expr"]["folds"]["pcc_acg"]).all()
    )
    hx.tl.predict_expression(adata, model, key_added="new")
    model.save(tmp_path / "model.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    hx.tl.predict_expression(adata, loaded, key_added="loaded")
    np.testing.assert_array_equal(adata.obsm["loaded"], adata.obsm["new"])
    # the tokens matter: other tokens give other predictions
    adata.obsm["X_histo_tokens"] = adata.obsm["X_histo_tokens"][:, ::-1].copy() * 0.5
    hx.tl.predict_expression(adata, loaded, key_added="other")
    assert not np.array_equal(adata.obsm["other"], adata.obsm["new"])
    adata.obsm["X_histo_tokens"] = adata.obsm["X_histo_tokens"][:, :1]
    with pytest.raises(ValueError, match=r"tokens=2, key_added='X_histo'"):
        hx.tl.predict_expression(adata, loaded)
    del adata.obsm["X_histo_tokens"]
    with pytest.raises(KeyError, match=r"embed_patches\(adata, tokens=3"):
        hx.tl.predict_expression(adata, loaded)


def test_without_tokens_the_pooled_features_are_one_token_with_a_warning(token_adata):
    adata = token_adata
    del adata.obsm["X_histo_tokens"]
    with pytest.warns(
        UserWarning, match=r"single token.*embed_patches\(adata, tokens=3, key_added='X_histo'\)"
    ):
        model = hx.tl.fit_histo2expr(adata, method="cmrcnet", genes=10, epochs=1, progress=False, **SMALL)
    assert model.token_rep is None and adata.uns["histo2expr"]["params"]["n_tokens"] == 0
    hx.tl.predict_expression(adata, model)
    assert np.isfinite(hx.get.predictions(adata, "histo2expr_pred")[model.genes].to_numpy()).all()


def test_other_methods_ignore_tokens_and_refuse_them_directly(token_adata, cohort):
    model = hx.tl.fit_histo2expr(token_adata, method="ridge", genes=10, progress=False)
    assert model.token_rep is None and token_adata.uns["histo2expr"]["params"]["n_tokens"] == 0
    train, validation, _ = cohort
    for name in ("ridge", "bleep"):
        with pytest.raises(ValueError, match=r"takes one feature vector per spot.*features.mean\(axis=1\)"):
            get_method(name)().fit(train, validation, config(epochs=1))
    with pytest.raises(ValueError, match="spots, tokens, features"):
        SpotSet(coords=np.zeros((2, 2)), groups=np.zeros(2), features=np.zeros((2, 1, 1, 3)))


def test_embed_patches_writes_pooled_tokens(token_cnn):
    adata = hx.datasets.synthetic(n_slides=1, seed=0, spots_per_side=4, n_genes=5)
    hx.tl.embed_patches(
        adata, encoder=token_cnn(), patch_size=32, tokens=2, neighbours=None, device="cpu", progress=False
    )
    tokens = adata.obsm["X_histo_tokens"]
    assert tokens.shape == (adata.n_obs, 4, 6) and tokens.dtype == np.float32
    assert adata.uns["X_histo"]["tokens"] == {"key": "X_histo_tokens", "grid": 2, "n_tokens": 4}
    # 2 x 2 equal bins of the 4 x 4 map: the mean of the tokens is the pooled feature vector
    np.testing.assert_allclose(tokens.mean(axis=1), adata.obsm["X_histo"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(tokens[:, 0], tokens[:, 3])
    with pytest.raises(ValueError, match="between 1 and the encoder's own grid side 4"):
        hx.tl.embed_patches(adata, encoder=token_cnn(), patch_size=32, tokens=5, progress=False)
    hx.tl.embed_patches(adata, encoder=token_cnn(), patch_size=32, progress=False)
    assert "X_histo_tokens" not in adata.obsm and "tokens" not in adata.uns["X_histo"]
    with pytest.raises(ValueError, match="`tokens` must be None or a positive integer \\(the side"):
        hx.tl.embed_patches(adata, tokens=0)
    with pytest.raises(ValueError, match="has no token map"):
        hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, tokens=1, progress=False)


def test_token_grid_pooling_by_hand():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, row-major
    np.testing.assert_array_equal(pool_token_grid(tokens, 2).flatten(), [2.5, 4.5, 10.5, 12.5])
    with pytest.raises(ValueError, match="not a square grid"):
        pool_token_grid(torch.zeros(1, 5, 2), 2)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"mask_rate": 1.0}, "mask_rate"),
        ({"mask_rate": -0.1}, "mask_rate"),
        ({"reconstruction_loss": "l1"}, r"reconstruction_loss.*\['mse', 'cosine'\]"),
        ({"reconstruction_target": "genes"}, r"reconstruction_target.*\['image', 'expression'\]"),
        ({"reconstruction": "yes"}, "reconstruction"),
        ({"gene_tokens": 0}, "gene_tokens"),
        ({"fusion_blocks": 0}, "fusion_blocks"),
        ({"fusion_heads": 3}, r"fusion_heads=3.*must divide `reconstruction_dim=16`"),
        ({"token_grid": 0}, "token_grid"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"gene_dropout": 1}, "gene_dropout"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": 0}, "temperature"),
        ({"average_epochs": 0}, "average_epochs"),
        ({"early_stopping": "mse"}, r"early_stopping.*\['loss', 'pcc'\]"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cmrcnet(**params)


def test_wrong_data_is_a_clear_error(cohort):
    train, validation, test = cohort
    method = cmrcnet()
    method.fit(train, validation, config(epochs=1))
    wrong = SpotSet(test.coords, test.groups, features=test.features[:, :, :5], targets=test.targets)
    with pytest.raises(ValueError, match="fitted on 12 features per spot"):
        method.predict(wrong)
