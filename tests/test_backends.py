"""Inference backends of embed_patches: ONNX Runtime keeps the features, 'auto' picks safely, errors are clear."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import histo2expr as hx
from histo2expr.models import InferenceEncoder, build_encoder
from histo2expr.models import backends as backends_module
from histo2expr.models.backends import check_backend, resolve_backend

CPU = torch.device("cpu")


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).numpy()


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """Seeded synthetic H&E-like patches: smooth pink/purple fields with dark nuclei, uint8 (B, 3, 64, 64)."""
    rng = np.random.default_rng(0)
    n, side = 7, 64
    yy, xx = np.mgrid[:side, :side]
    images = np.empty((n, side, side, 3), dtype=np.float64)
    for i in range(n):
        images[i] = [235, 180, 215] - rng.uniform(0, 60, 3) * np.sin(xx / rng.uniform(5, 20))[..., None]
        for _ in range(12):  # nuclei
            (cy, cx), r = rng.uniform(0, side, 2), rng.uniform(2, 5)
            images[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [90, 60, 150]
    images += rng.normal(0, 6, images.shape)
    return torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).copy())


def test_auto_runs_efficientnet_lite_with_onnx_runtime_only_where_measured(tiny_encoder):
    lite = build_encoder("efficientnet_lite0", weights=None)
    onnx = "onnx" if backends_module.onnx_available() else "torch"
    assert InferenceEncoder(lite, device=CPU).backend == onnx
    assert resolve_backend("auto", lite, torch.device("cuda")) == "torch"  # no GPU needed to decide
    assert InferenceEncoder(build_encoder(tiny_encoder()), device=CPU).backend == "torch"
    assert InferenceEncoder(lite, backend="torch", device=CPU).backend == "torch"


def test_auto_falls_back_to_torch_without_onnx_runtime(monkeypatch):
    monkeypatch.setattr(backends_module, "find_spec", lambda name: None)
    lite = build_encoder("efficientnet_lite0", weights=None)
    assert InferenceEncoder(lite, device=CPU).backend == "torch"
    with pytest.raises(ImportError, match=r"histo2expr\[onnx\]"):
        InferenceEncoder(lite, backend="onnx", device=CPU)


@pytest.mark.skipif(
    not backends_module.onnx_available(), reason="needs the onnx extra (onnxruntime, onnx, onnxscript)"
)
def test_auto_falls_back_to_torch_with_a_warning_when_the_export_fails(patches, monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("the exporter does not know this operator")

    monkeypatch.setattr(backends_module, "export_onnx", failing_export)
    encoder = build_encoder("efficientnet_lite0", weights=None).eval()
    runner = InferenceEncoder(encoder, device=CPU)
    assert runner.backend == "onnx"
    with pytest.warns(RuntimeWarning, match="running it with PyTorch instead"):
        features, _ = runner(patches[:2])
    assert runner.backend == "torch"
    torch.testing.assert_close(features, InferenceEncoder(encoder, backend="torch")(patches[:2])[0])
    with pytest.raises(RuntimeError, match="does not know this operator"):  # asked for: no fallback
        InferenceEncoder(encoder, backend="onnx")(patches[:2])


@pytest.mark.skipif(
    not backends_module.onnx_available(), reason="needs the onnx extra (onnxruntime, onnx, onnxscript)"
)
def test_auto_falls_back_to_torch_with_a_warning_when_the_onnx_features_differ(
    patches, monkeypatch, tmp_path
):
    monkeypatch.setenv("HISTO2EXPR_CACHE_DIR", str(tmp_path))  # the wrong export below stays out of the cache
    encoder = build_encoder("efficientnet_lite0", weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same features: no fallback, no warning
        runner = InferenceEncoder(encoder, device=CPU)
        runner(patches)
    assert runner.backend == "onnx"

    export = backends_module.export_onnx

    def export_of_other_weights(encoder, path, shape, *, tokens):
        other = copy.deepcopy(encoder)
        with torch.no_grad():
            for parameter in other.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
        export(other, path, shape, tokens=tokens)

    monkeypatch.setattr(backends_module, "export_onnx", export_of_other_weights)
    shifted = torch.nn.functional.pad(patches, (0, 8, 0, 8))  # another patch shape: another export
    runner = InferenceEncoder(encoder, device=CPU)
    with pytest.warns(RuntimeWarning, match=r"differ from PyTorch's \(cosine 0\.\d+ < 0\.999\)"):
        features, _ = runner(shifted)
    assert runner.backend == "torch"
    torch.testing.assert_close(features, InferenceEncoder(encoder, backend="torch")(shifted)[0])


def test_unusable_backends_are_clear_errors(monkeypatch):
    lite = build_encoder("efficientnet_lite0", weights=None)
    with pytest.raises(ValueError, match=r"`backend` must be one of .* got .tensorrt."):
        InferenceEncoder(lite, backend="tensorrt", device=CPU)
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_backend("onnx", torch.device("cuda"))
    monkeypatch.setattr(backends_module, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match="native bfloat16"):
        InferenceEncoder(lite, backend="bf16", device=CPU)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_only_avx512_bf16_or_amx_count_as_native_bfloat16(monkeypatch, avx512_bf16, amx, native):
    # oneDNN emulates bfloat16 with AVX-512 alone (slower than float32): such a CPU is not native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    assert backends_module.cpu_supports_bf16() is native


@pytest.mark.skipif(
    not backends_module.onnx_available(), reason="needs the onnx extra (onnxruntime, onnx, onnxscript)"
)
def test_onnx_keeps_features_and_tokens_of_any_batch_and_caches_the_export(patches, monkeypatch):
    encoder = build_encoder("efficientnet_lite0", weights=None).eval()
    reference, reference_tokens = InferenceEncoder(encoder, backend="torch", tokens=True)(patches)
    onnx = InferenceEncoder(encoder, backend="onnx", tokens=True)
    for rows in (slice(None), slice(0, 1), slice(1, 4)):  # one export serves every batch size
        features, tokens = onnx(patches[rows])
        assert features.dtype == torch.float32 and features.shape == reference[rows].shape
        assert cosine(features, reference[rows]).min() >= 0.999
        torch.testing.assert_close(features, reference[rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tokens, reference_tokens[rows], rtol=1e-4, atol=1e-4)

    def no_export(*args, **kwargs):
        raise AssertionError("the cached export should have been used")

    monkeypatch.setattr(backends_module, "export_onnx", no_export)
    features, tokens = InferenceEncoder(encoder, backend="onnx", tokens=True)(patches)
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-4)
    retrained = build_encoder("efficientnet_lite0", weights=encoder.backbone.state_dict()).eval()
    with torch.no_grad():
        next(retrained.parameters()).add_(0.1)
    with pytest.raises(AssertionError, match="cached export"):  # other weights: another export
        InferenceEncoder(retrained, backend="onnx")(patches)
    with pytest.raises(TypeError, match="uint8"):
        onnx(patches.float() / 255)


@pytest.mark.skipif(
    not backends_module.onnx_available(), reason="needs the onnx extra (onnxruntime, onnx, onnxscript)"
)
def test_embed_patches_with_onnx_matches_torch_for_a_custom_module(tiny_encoder):
    adata = hx.datasets.synthetic(n_slides=2, seed=0, spots_per_side=5, n_genes=10)
    encoder = tiny_encoder()
    hx.tl.embed_patches(adata, encoder=encoder, patch_size=32, backend="torch", progress=False)
    hx.tl.embed_patches(
        adata, encoder=encoder, patch_size=32, backend="onnx", batch_size=16, progress=False, key_added="onnx"
    )
    assert adata.uns["X_histo"]["backend"] == "torch" and adata.uns["onnx"]["backend"] == "onnx"
    assert adata.uns["X_histo"]["encoder"] == adata.uns["onnx"]["encoder"]  # the same encoder for predict
    torch.testing.assert_close(
        torch.from_numpy(adata.obsm["onnx"]), torch.from_numpy(adata.obsm["X_histo"]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(not backends_module.cpu_supports_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_autocast_stays_close_for_a_vision_transformer(patches):
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16_224", weights=None, img_size=64).eval()
    reference, _ = InferenceEncoder(encoder, backend="torch")(patches)
    features, _ = InferenceEncoder(encoder, backend="bf16")(patches)
    assert not torch.equal(features.float(), reference)  # bfloat16 did run
    assert cosine(features, reference).min() >= 0.99


@pytest.mark.realdata
@pytest.mark.skipif(
    not backends_module.onnx_available(), reason="needs the onnx extra (onnxruntime, onnx, onnxscript)"
)
def test_onnx_features_of_real_her2st_patches_match_float32(her2st_path):
    adata = hx.io.read_legacy_st(her2st_path, sections=["B4", "C3"])  # one section of each patient
    adata = adata[np.linspace(0, adata.n_obs - 1, 32).round().astype(int)].copy()
    kwargs = {"encoder": "efficientnet_lite0", "weights": "imagenet", "patch_size": 224, "progress": False}
    hx.tl.embed_patches(adata, backend="torch", **kwargs)
    hx.tl.embed_patches(adata, backend="onnx", key_added="onnx", **kwargs)
    similarity = cosine(torch.from_numpy(adata.obsm["onnx"]), torch.from_numpy(adata.obsm["X_histo"]))
    assert similarity.min() >= 0.999
