import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import histo2expr as hx


class TinyEncoder(nn.Module):
    """A small random CNN: fast enough for unit tests, real enough to carry image signal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def cohort():
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=9, n_genes=40)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder=TinyEncoder(), patch_size=64, progress=False)
    return adata


def test_embed_patches_writes_features_and_encoder_record(cohort):
    features = cohort.obsm["X_histo"]
    # the defaults: the spot view averaged over its 4 quarter turns, then the mean of its 6 nearest spots
    assert features.shape == (cohort.n_obs, 2 * 32) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.std(0).max() > 0
    record = cohort.uns["X_histo"]
    assert record["encoder"]["name"] == "TinyEncoder" and record["encoder"]["weights_sha1"]
    assert record["patches"]["patch_size"] == 64
    assert record["patches"]["tta"] == 4 and record["patches"]["neighbours"] == 6
    assert "context" not in record["patches"]
    assert record["blocks"] == {"spot": [0, 32], "neighbours": [32, 64]}


def test_embed_patches_is_deterministic_and_order_independent(cohort):
    again = cohort[::-1].copy()
    hx.tl.embed_patches(again, encoder=TinyEncoder(), patch_size=64, progress=False)
    np.testing.assert_allclose(again.obsm["X_histo"][::-1], cohort.obsm["X_histo"], rtol=1e-5, atol=1e-6)


def test_cross_validated_fit_writes_out_of_fold_fields(cohort):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, method="ridge", genes=20, cv="leave_one_slide_out", progress=False)
    record = adata.uns["histo2expr"]
    folds = record["folds"]
    assert list(folds["slide"]) == ["S1", "S2", "S3"]
    for column in ("pcc_acg", "pcc_heg50", "pcc_hvg50", "mse", "mae", "n_nan_genes", "n_spots"):
        assert column in folds
    assert (
        folds["pcc_acg"] > 0.1
    ).all()  # random CNN features still carry the programmes (mean predictor: NaN)
    predictions = adata.obsm["histo2expr"]
    assert list(predictions.index) == list(adata.obs_names) and predictions.dtypes.eq(np.float32).all()
    assert 20 <= predictions.shape[1] <= 40 and not predictions.isna().all(axis=0).any()
    assert not adata.layers.keys() - {"counts"}, "no dense prediction layer over all genes"
    assert record["kind"] == "cross_validation" and record["protocol"] == "leave_one_slide_out"
    assert list(adata.obs["histo2expr_fold"].cat.categories) == ["S1", "S2", "S3"]
    assert (adata.obs["histo2expr_fold"].astype(str) == adata.obs["slide"].astype(str)).all()
    assert set(record["gene_pcc"].columns) == {"S1", "S2", "S3"}
    assert record["genes"] == model.genes and len(model.genes) == 20
    assert model.cv_gene_pcc and set(model.cv_gene_pcc) <= set(record["gene_pcc"].index)


def test_cross_validation_without_refit_scores_the_same_and_returns_none(cohort):
    full, scores_only = cohort.copy(), cohort.copy()
    hx.tl.fit_histo2expr(full, method="ridge", genes=20, cv="leave_one_slide_out", progress=False)
    returned = hx.tl.fit_histo2expr(
        scores_only, method="ridge", genes=20, cv="leave_one_slide_out", refit=False, progress=False
    )
    assert returned is None and "genes" not in scores_only.uns["histo2expr"]
    pd.testing.assert_frame_equal(scores_only.uns["histo2expr"]["folds"], full.uns["histo2expr"]["folds"])
    pd.testing.assert_frame_equal(scores_only.obsm["histo2expr"], full.obsm["histo2expr"])
    with pytest.raises(ValueError, match="only makes sense with cross-validation"):
        hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=20, refit=False, progress=False)


def test_fit_records_the_patience_and_precision_it_ran_with(cohort):
    adata = cohort.copy()
    options = {"method": "bleep", "genes": 10, "epochs": 2, "progress": False}
    hx.tl.fit_histo2expr(adata, **options)  # patience=None: the method's own; precision=None: the device's
    params = adata.uns["histo2expr"]["params"]
    assert params["patience"] == 3 == hx.models.get_method("bleep").default_patience
    assert params["precision"] == ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    hx.tl.fit_histo2expr(adata, **options, patience=5, precision="bf16-mixed", key_added="explicit")
    assert adata.uns["explicit"]["params"]["patience"] == 5
    assert adata.uns["explicit"]["params"]["precision"] == "bf16-mixed"


def test_leave_one_patient_out_and_fixed_genes(cohort):
    adata = cohort.copy()
    adata.obs["patient"] = ["P1" if s != "S3" else "P2" for s in adata.obs["slide"]]
    genes = list(adata.var_names[:10])
    hx.tl.fit_histo2expr(
        adata, method="ridge", genes=genes, cv="leave_one_patient_out", patient_key="patient", progress=False
    )
    folds = adata.uns["histo2expr"]["folds"]
    assert sorted(folds["fold"].unique()) == ["P1", "P2"] and len(folds) == 3  # one row per held-out slide
    assert adata.uns["histo2expr"]["genes"] == genes


def test_save_load_and_predict_on_new_slides(cohort, tmp_path):
    model = hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=15, progress=False)
    model.save(tmp_path / "model.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    assert loaded.genes == model.genes and repr(loaded) == repr(model)
    with_genes = cohort.copy()
    assert hx.tl.predict_expression(with_genes, loaded) is None
    predicted = with_genes.obsm["histo2expr_pred"]
    assert list(predicted.columns) == model.genes and np.isfinite(predicted.to_numpy()).all()
    assert with_genes.uns["histo2expr_pred"]["kind"] == "prediction"
    # H&E-only slides: the same return rule and the same fields, whichever genes were measured
    h_and_e_only = cohort[:, :0].copy()
    assert hx.tl.predict_expression(h_and_e_only, model) is None
    pd.testing.assert_frame_equal(h_and_e_only.obsm["histo2expr_pred"], predicted, rtol=1e-5)
    assert (
        "X_histo2expr_pred" in h_and_e_only.obsm and h_and_e_only.uns["histo2expr_pred"]["method"] == "ridge"
    )
    copy = hx.tl.predict_expression(cohort, model, copy=True)
    assert "histo2expr_pred" in copy.obsm and "histo2expr_pred" not in cohort.obsm
    copy_of_he = hx.tl.predict_expression(h_and_e_only, model, copy=True, key_added="again")
    assert type(copy_of_he) is type(copy) and "again" not in h_and_e_only.obsm


def test_models_predict_on_the_device_asked_for(cohort, tmp_path):
    model = hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=10, epochs=2, progress=False)
    model.save(tmp_path / "model.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    assert loaded.device == torch.device("cpu") and loaded.to("cpu") is loaded
    here = hx.tl.predict_expression(cohort.copy(), loaded, device="cpu", copy=True)
    pd.testing.assert_frame_equal(
        here.obsm["histo2expr_pred"],
        hx.tl.predict_expression(cohort, model, copy=True).obsm["histo2expr_pred"],
    )
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' is not usable on this machine"):
            hx.tl.predict_expression(cohort.copy(), loaded, device="cuda")
        assert loaded.device == torch.device("cpu")  # the model stays where it was


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_loaded_model_predicts_on_the_gpu(cohort, tmp_path):
    model = hx.tl.fit_histo2expr(cohort.copy(), method="bleep", genes=10, epochs=2, top_k=10, progress=False)
    model.save(tmp_path / "model.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "model.pt")
    on_cpu = hx.tl.predict_expression(cohort, loaded, copy=True)
    on_gpu = hx.tl.predict_expression(cohort, loaded, device="cuda", copy=True)
    assert loaded.device == torch.device("cpu")
    assert loaded.to("cuda").device.type == "cuda" and next(loaded.method.network.parameters()).is_cuda
    again = hx.tl.predict_expression(cohort, loaded, copy=True)  # bfloat16 autocast on CUDA
    for gpu in (on_gpu, again):
        np.testing.assert_allclose(gpu.obsm["X_histo2expr_pred"], on_cpu.obsm["X_histo2expr_pred"], atol=0.1)


def test_device_of_fit_is_deprecated_for_lightning_flags(cohort):
    with pytest.warns(FutureWarning, match=r"accelerator='cpu', devices=1"):
        hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=10, device="cpu", progress=False)


def test_predict_refuses_another_encoder_or_scale(cohort):
    model = hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=10, progress=False)
    other = cohort.copy()
    other.uns["X_histo"] = {
        **other.uns["X_histo"],
        "encoder": {**other.uns["X_histo"]["encoder"], "weights_sha1": "x"},
    }
    with pytest.raises(ValueError, match="other encoder weights"):
        hx.tl.predict_expression(other, model)
    rescaled = cohort.copy()
    rescaled.uns["X_histo"] = {**rescaled.uns["X_histo"], "patches": {"patch_size": 64, "mpp": 2.0}}
    model.patches = {"patch_size": 64, "mpp": 1.0}
    with pytest.raises(ValueError, match="µm/px"):
        hx.tl.predict_expression(rescaled, model)
    model.patches = {"patch_size": 64, "mpp": 2.0, "tta": 4}
    # the hint re-embeds with the model's options where they differ from embed_patches' defaults
    with pytest.raises(
        ValueError, match=r"embedded with `tta=1`.*`tta=4`.*weights=\.\.\., neighbours=None, key"
    ):
        hx.tl.predict_expression(rescaled, model)
    missing = cohort.copy()
    del missing.obsm["X_histo"]
    with pytest.raises(KeyError, match="embed_patches"):
        hx.tl.predict_expression(missing, model)


def test_fit_bad_input(cohort, tmp_path):
    with pytest.raises(ValueError, match="Unknown method"):
        hx.tl.fit_histo2expr(cohort, method="magic")
    with pytest.raises(KeyError, match="embed_patches"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=10, use_rep="X_nope")
    with pytest.raises(KeyError, match="not in `adata"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=["SYN0001", "NOPE"])
    with pytest.raises(ValueError, match="between 1"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=1000)
    with pytest.raises(ValueError, match="epochs"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=10, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=10, lr=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=10, batch_size=0)
    with pytest.raises(ValueError, match="`patience` must be an integer"):
        hx.tl.fit_histo2expr(cohort, method="bleep", genes=10, patience=0)
    single = cohort[cohort.obs["slide"] == "S1"].copy()
    with pytest.raises(ValueError, match="at least two slides"):
        hx.tl.fit_histo2expr(single, method="ridge", genes=10, cv="leave_one_slide_out")
    raw = cohort.copy()
    del raw.uns["log1p"]
    with pytest.raises(ValueError, match="normalize"):
        hx.tl.fit_histo2expr(raw, method="ridge", genes=10)
    with pytest.raises(ValueError, match="frozen features"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=10, use_rep=None)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a histo2expr model"):
        hx.tl.Histo2ExprModel.load(tmp_path / "junk.pt")


def test_evaluate_expression_on_another_cohort(cohort):
    model = hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=15, progress=False)
    external = hx.datasets.synthetic(n_slides=2, seed=5, spots_per_side=9, n_genes=40)
    hx.pp.normalize(external)
    hx.tl.embed_patches(external, encoder=TinyEncoder(), patch_size=64, progress=False)
    folds = hx.tl.evaluate_expression(external, model)
    assert list(folds["slide"]) == ["S1", "S2"] and (folds["pcc_acg"] > 0.05).all()
    assert set(external.uns["histo2expr_pred"]["gene_pcc"].columns) == {"S1", "S2"}
    assert list(external.obsm["histo2expr_pred"].columns) == model.genes
    fewer_genes = external[:, [g for g in external.var_names if g != model.genes[0]]].copy()
    with pytest.raises(KeyError, match="not in `adata"):
        hx.tl.evaluate_expression(fewer_genes, model)


def test_end_to_end_regime_fit_predict_save_load(tmp_path):
    adata = hx.datasets.synthetic(n_slides=2, seed=0, spots_per_side=6, n_genes=20)
    hx.pp.normalize(adata)
    model = hx.tl.fit_histo2expr(
        adata,
        method="stnet",
        use_rep=None,
        encoder="test_resnet",
        weights=None,
        patch_size=32,
        genes=10,
        cv="leave_one_slide_out",
        epochs=1,
        batch_size=16,
        progress=False,
    )
    assert model.regime == "end2end" and model.patches == {
        "patch_size": 32,
        "mpp": 1.0,
        "spot_diameter_um": 55.0,
        "spot_spacing_um": 100.0,
    }
    assert np.isfinite(adata.uns["histo2expr"]["folds"]["mse"]).all()
    model.save(tmp_path / "e2e.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "e2e.pt")
    out = hx.tl.predict_expression(adata[:, :0].copy(), loaded, copy=True)
    direct = hx.tl.predict_expression(adata[:, :0].copy(), model, copy=True)
    pd.testing.assert_frame_equal(
        out.obsm["histo2expr_pred"], direct.obsm["histo2expr_pred"], rtol=1e-5, atol=1e-6
    )


#: The adapted regime on a random EfficientNet-Lite0 and 32 px patches: seconds on a CPU.
ADAPTED = {
    "regime": "adapted",
    "encoder": "efficientnet_lite0",
    "weights": None,
    "patch_size": 32,
    "views": 4,
    "epochs": 2,
    "batch_size": 16,
    "progress": False,
}


def test_adapted_regime_fit_predict_save_load(cohort, tmp_path):
    adata = cohort.copy()
    model = hx.tl.fit_histo2expr(adata, method="stnet", genes=10, cv="leave_one_slide_out", **ADAPTED)
    params = adata.uns["histo2expr"]["params"]
    assert model.regime == "adapted" and params["regime"] == "adapted" and params["trainable_blocks"] == 1
    assert list(params["activation_cache"]["shape"][:2]) == [adata.n_obs, 4]
    assert np.isfinite(adata.uns["histo2expr"]["folds"]["pcc_acg"]).all()
    # the adapted spot view (1280 features), then the frozen neighbour block of obsm["X_histo"] (32)
    assert model.method.network.image_input.dim == 1280 + 32
    model.save(tmp_path / "adapted.pt")
    loaded = hx.tl.Histo2ExprModel.load(tmp_path / "adapted.pt")
    assert loaded.regime == "adapted"
    new = adata[:, :0].copy()
    out = hx.tl.predict_expression(new, loaded, copy=True)
    direct = hx.tl.predict_expression(new, model, copy=True)
    pd.testing.assert_frame_equal(
        out.obsm["histo2expr_pred"], direct.obsm["histo2expr_pred"], rtol=1e-5, atol=1e-6
    )
    del new.obsm["X_histo"]
    with pytest.raises(KeyError, match="adapted regime"):
        hx.tl.predict_expression(new, loaded)
    alone = hx.tl.fit_histo2expr(adata.copy(), method="stnet", genes=10, use_rep=None, **ADAPTED)
    assert alone.method.network.image_input.dim == 1280 and alone.use_rep is None
    hx.tl.predict_expression(new, alone)  # needs no frozen features
    assert np.isfinite(hx.get.predictions(new, "histo2expr_pred").to_numpy()).all()


def test_adapted_regime_refuses_what_it_cannot_do(cohort):
    without_encoder = {k: v for k, v in ADAPTED.items() if k not in ("encoder", "weights")}
    with pytest.raises(ValueError, match="supports the"):
        hx.tl.fit_histo2expr(cohort.copy(), method="ridge", genes=5, **without_encoder)
    with pytest.raises(ValueError, match="trainable_blocks=7"):
        hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=5, trainable_blocks=7, **ADAPTED)
    with pytest.raises(ValueError, match="EfficientNet-like"):
        hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=5, **{**ADAPTED, "encoder": "test_resnet"})
    with pytest.raises(ValueError, match="views"):
        hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=5, **{**ADAPTED, "views": 3})
    with pytest.raises(ValueError, match="is not one of"):
        hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=5, **{**ADAPTED, "regime": "adaptive"})
    with pytest.raises(ValueError, match="use_rep=None"):
        hx.tl.fit_histo2expr(cohort.copy(), method="stnet", genes=5, regime="end2end")


@pytest.mark.parametrize("method", ["stnet", "chrep"])
def test_adapted_regime_held_out_expression_cannot_influence_its_fold(method, cohort):
    """The held-out slide's activations are cached with the others (only its image), but its expression
    and its patches' training views reach no fit of its fold: its predictions do not move when its
    expression changes."""
    kwargs = {"method": method, "genes": 10, "cv": "leave_one_slide_out", "refit": False, **ADAPTED}
    clean = cohort.copy()
    hx.tl.fit_histo2expr(clean, **kwargs)
    poisoned = cohort.copy()
    held_out = np.flatnonzero((poisoned.obs["slide"] == poisoned.obs["slide"].iloc[-1]).to_numpy())
    counts = poisoned.layers["counts"].toarray()
    counts[held_out] = np.random.default_rng(1).permutation(counts[held_out].T).T * 3.0
    poisoned.layers["counts"] = counts
    hx.pp.normalize(poisoned)
    hx.tl.fit_histo2expr(poisoned, **kwargs)
    clean_kept, poisoned_kept = (
        hx.get.predictions(a).iloc[held_out].dropna(axis=1) for a in (clean, poisoned)
    )
    pd.testing.assert_frame_equal(clean_kept, poisoned_kept[clean_kept.columns])


def test_end_to_end_stain_normalization_is_recorded_and_used_to_predict(cohort):
    adata = hx.datasets.synthetic(n_slides=2, seed=0, spots_per_side=5, n_genes=12)
    hx.pp.normalize(adata)
    params = {"method": "stnet", "use_rep": None, "encoder": "test_resnet", "weights": None, "patch_size": 32}
    model = hx.tl.fit_histo2expr(
        adata, genes=6, epochs=1, batch_size=16, progress=False, stain_normalization="macenko", **params
    )
    assert model.patches["stain_normalization"] == "macenko"
    new, unnormalised = adata[:, :0].copy(), adata[:, :0].copy()
    hx.tl.predict_expression(new, model)
    model.patches = {k: v for k, v in model.patches.items() if k != "stain_normalization"}
    hx.tl.predict_expression(unnormalised, model)
    assert not np.allclose(hx.get.predictions(unnormalised), hx.get.predictions(new))
    with pytest.raises(ValueError, match="end-to-end regime"):
        hx.tl.fit_histo2expr(cohort, method="ridge", genes=5, stain_normalization="macenko", progress=False)


def test_embed_patches_on_spatialdata_writes_its_table(cohort):
    import tifffile
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, TableModel

    one = cohort[cohort.obs["slide"] == "S1"].copy()
    pixels = tifffile.imread(one.uns["spatial"]["S1"]["metadata"]["source_image_path"])
    image = Image2DModel.parse(np.moveaxis(pixels, 2, 0), dims=("c", "y", "x"))
    table = one.copy()
    table.obs["region"] = pd.Categorical(["S1"] * table.n_obs)
    table.obs["spot_id"] = np.arange(table.n_obs)
    table.obs["slide"] = table.obs["slide"].cat.remove_unused_categories()
    del table.obsm["X_histo"]
    table = TableModel.parse(table, region="S1", region_key="region", instance_key="spot_id")
    sdata = SpatialData(images={"S1": image}, tables={"table": table})
    hx.tl.embed_patches(sdata, encoder=TinyEncoder(), patch_size=64, progress=False)
    np.testing.assert_allclose(
        sdata.tables["table"].obsm["X_histo"], one.obsm["X_histo"], rtol=1e-5, atol=1e-6
    )


def test_embed_by_name_matches_a_prebuilt_encoder(cohort):
    """Encoders built from a name run channels-last; the features must not change."""
    small = cohort[:40].copy()
    hx.tl.embed_patches(
        small, encoder="resnet18", weights=None, seed=3, patch_size=64, progress=False, key_added="by_name"
    )
    prebuilt = hx.models.build_encoder("resnet18", weights=None, seed=3)
    hx.tl.embed_patches(small, encoder=prebuilt, patch_size=64, progress=False, key_added="prebuilt")
    np.testing.assert_allclose(small.obsm["by_name"], small.obsm["prebuilt"], rtol=1e-4, atol=1e-4)
    assert small.uns["by_name"]["encoder"]["weights_sha1"] == small.uns["prebuilt"]["encoder"]["weights_sha1"]


class PoolingNet(nn.Module):
    """Average pooling to a 4 x 4 map of 32 px patches: exactly equivariant under flips and quarter turns."""

    num_features = 3

    def forward_features(self, x):
        return nn.functional.avg_pool2d(x, 8)

    def forward_head(self, features):
        return features.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_embed_patches_tta_averages_the_rotated_views(cohort):
    from histo2expr.patches import PatchSource, dihedral

    small = cohort[:30].copy()
    for tta in (1, 4):
        hx.tl.embed_patches(
            small,
            encoder=TinyEncoder(),
            patch_size=64,
            tta=tta,
            neighbours=None,
            progress=False,
            key_added=f"v{tta}",
        )
    assert small.uns["v4"]["patches"]["tta"] == 4 and small.uns["v4"]["blocks"] == {"spot": [0, 32]}
    encoder = hx.models.build_encoder(TinyEncoder()).eval()
    images = torch.from_numpy(
        PatchSource(small, patch_size=64).read(np.arange(30)).transpose(0, 3, 1, 2).copy()
    )
    with torch.no_grad():
        expected = torch.stack([encoder(dihedral(images, k)) for k in range(4)]).mean(0).numpy()
    np.testing.assert_allclose(small.obsm["v4"], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(small.obsm["v4"], small.obsm["v1"], atol=1e-3)
    for bad in (3, True, 0):
        with pytest.raises(ValueError, match="`tta` must be the number of views"):
            hx.tl.embed_patches(small, tta=bad)


def test_embed_patches_tta_turns_each_views_tokens_back(cohort):
    small = cohort[:20].copy()
    for tta in (1, 8):
        hx.tl.embed_patches(
            small, encoder=PoolingNet(), patch_size=32, tokens=2, tta=tta, progress=False, key_added=f"v{tta}"
        )
    # an equivariant encoder: every view, turned back, has the tokens of the patch itself
    np.testing.assert_allclose(small.obsm["v8_tokens"], small.obsm["v1_tokens"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small.obsm["v8"], small.obsm["v1"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(small.obsm["v1_tokens"][:, 0], small.obsm["v1_tokens"][:, 3])


def test_embed_patches_appends_context_and_neighbour_blocks(cohort, token_cnn):
    from histo2expr.models.graphs import spatial_knn
    from histo2expr.patches import PatchSource

    adata = cohort.copy()
    hx.tl.embed_patches(
        adata, encoder=token_cnn(), patch_size=32, tta=1, context=2, neighbours=3, tokens=2, progress=False
    )
    features, record = adata.obsm["X_histo"], adata.uns["X_histo"]
    assert features.shape == (adata.n_obs, 18)
    assert record["blocks"] == {"spot": [0, 6], "context": [6, 12], "neighbours": [12, 18]}
    assert record["patches"]["context"] == 2 and record["patches"]["neighbours"] == 3
    encoder = hx.models.build_encoder(token_cnn()).eval()
    wide = PatchSource(adata, patch_size=32, field=2).read(np.arange(adata.n_obs))
    with torch.no_grad():
        context = encoder(torch.from_numpy(wide.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(features[:, 6:12], context, rtol=1e-4, atol=1e-5)
    # on this square grid the 3rd nearest spot ties with the 4th: all 4 spots at that distance count
    slides = adata.obs["slide"].astype(str).to_numpy()
    coords = adata.obsm["spatial"]
    third = spatial_knn(coords, slides, k=3)[:, -1]
    radius = np.linalg.norm(coords[third] - coords, axis=1)
    distance = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    near = (
        (distance <= radius[:, None] * (1 + 1e-6))
        & (slides[:, None] == slides[None])
        & ~np.eye(len(slides), dtype=bool)
    )
    assert (near.sum(axis=1) >= 3).all() and (near.sum(axis=1) == 4).any()
    expected = np.stack([features[row, :6].mean(axis=0) for row in near])
    np.testing.assert_allclose(features[:, 12:], expected, rtol=1e-5, atol=1e-6)
    tokens = adata.obsm[
        "X_histo_tokens"
    ]  # spot tokens, each followed by the spot's context and neighbour blocks
    assert tokens.shape == (adata.n_obs, 4, 6 + 12)
    np.testing.assert_allclose(tokens[:, 2, 6:], features[:, 6:], rtol=1e-6)
    with pytest.raises(ValueError, match="`neighbours` must be None or a positive integer"):
        hx.tl.embed_patches(adata, neighbours=0)
    # more neighbours than a slide has spots: the mean of the slide's other spots
    one = adata[adata.obs["slide"] == "S1"].copy()
    hx.tl.embed_patches(one, encoder=token_cnn(), patch_size=32, neighbours=500, progress=False)
    spot = one.obsm["X_histo"][:, :6]
    np.testing.assert_allclose(one.obsm["X_histo"][0, 6:], spot[1:].mean(axis=0), rtol=1e-5)
