"""Pathology foundation-model encoder presets: architectures, pooling, checkpoint conversion, hub messages."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from histo2expr.models import ENCODER_PRESETS, Encoder, EncoderPreset, build_encoder, register_encoder_preset
from histo2expr.models.presets import hf_dinov2_to_timm

REFERENCE = Path(__file__).parent / "data" / "encoder_presets"
PUBLISHED = json.loads((REFERENCE / "published.json").read_text())
TIMM_PRESETS = sorted(name for name, preset in ENCODER_PRESETS.items() if preset.timm_name is not None)


def _meta_backbone(name: str) -> torch.nn.Module:
    """The preset's full architecture on the meta device: shapes without memory or initialisation time."""
    with torch.device("meta"):
        return ENCODER_PRESETS[name].create_backbone()


def test_the_presets_the_field_uses_are_registered():
    expected = {
        "uni",
        "uni2-h",
        "conch",
        "virchow2",
        "h-optimus-0",
        "h-optimus-1",
        "prov-gigapath",
        "phikon-v2",
    }
    assert expected | {"hibou-b"} <= set(ENCODER_PRESETS)
    for preset in ENCODER_PRESETS.values():
        assert preset.reference.startswith("https://huggingface.co/")
        assert preset.licence


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_state_dict_keys_and_shapes_equal_the_reference(name):
    reference = json.loads(gzip.decompress((REFERENCE / f"{name}.json.gz").read_bytes()))
    actual = {key: list(value.shape) for key, value in _meta_backbone(name).state_dict().items()}
    assert list(actual) == list(reference)
    assert actual == reference


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_architecture_matches_the_published_facts(name):
    facts, preset, backbone = PUBLISHED[name], ENCODER_PRESETS[name], _meta_backbone(name)
    assert backbone.embed_dim == facts["embed_dim"]
    assert len(backbone.blocks) == facts["depth"]
    assert backbone.patch_embed.patch_size == (facts["patch_size"],) * 2
    assert backbone.num_reg_tokens == facts["register_tokens"]
    assert preset.feature_dim == facts["feature_dim"]
    pooled = 2 * backbone.embed_dim if preset.pooling == "class_and_patch_mean" else backbone.num_features
    assert pooled == facts["feature_dim"]
    if "swiglu_hidden" in facts:  # timm packs SwiGLU's gate and value: fc1 is twice the hidden width
        assert backbone.blocks[0].mlp.fc1.out_features == 2 * facts["swiglu_hidden"]
    if "parameters" in facts:
        count = sum(p.numel() for p in backbone.parameters())
        assert abs(count / facts["parameters"] - 1) < 0.035, f"{count / 1e6:.1f}M parameters"


def test_a_preset_runs_with_random_weights():
    torch.manual_seed(0)
    encoder = build_encoder("hibou-b", weights=None).eval()
    assert (encoder.weights, encoder.feature_dim, encoder.name) == ("random", 768, "hibou-b")
    assert encoder.describe()["mean"] == pytest.approx([0.7068, 0.5755, 0.7220])
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        features, tokens = encoder.features_and_tokens(images)
    assert features.shape == (2, 768)
    assert tokens.shape == (2, 256, 768)  # 16 x 16 patch tokens; the class and 4 register tokens dropped
    torch.testing.assert_close(features, encoder(images))


def test_class_and_patch_mean_pooling_skips_the_register_tokens():
    import timm

    backbone = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, depth=1, reg_tokens=4, global_pool="", num_classes=0
    ).eval()
    encoder = Encoder(
        backbone,
        feature_dim=2 * 192,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        name="tiny",
        timm_name="vit_tiny_patch16_224",
        weights="random",
        pooling="class_and_patch_mean",
    )
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.forward_features(encoder.normalize(images))
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
        torch.testing.assert_close(encoder(images), expected)
        torch.testing.assert_close(encoder.features_and_tokens(images)[0], expected)
    assert encoder.describe()["pooling"] == "class_and_patch_mean"


# --- Hugging Face DINOv2 checkpoints (Phikon-v2, Hibou) --------------------------------------------


def _published_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo transformers 5's renaming of DINOv2 checkpoints (its conversion_mapping), i.e. the published keys."""
    out = {}
    for key, tensor in state.items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            up = state[key.replace("gate_proj", "up_proj")]
            out[key.replace("gate_proj", "weights_in")] = torch.cat([tensor, up], dim=0)
            continue
        for new, old in (
            ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"),
            ("mlp.down_proj", "mlp.weights_out"),
        ):
            key = key.replace(new, old)
        out[key] = tensor
    return out


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, True)], ids=["phikon-like", "hibou-like"])
def test_hf_dinov2_checkpoint_computes_the_same_in_timm(registers, swiglu, tmp_path, monkeypatch):
    transformers = pytest.importorskip(
        "transformers", reason="`transformers` is the reference for the conversion"
    )
    from safetensors.torch import save_file
    from timm.layers import SwiGLUPacked

    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    model_class = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    extra = {"num_register_tokens": registers} if registers else {}
    config = config_class(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        **extra,
    )
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with torch.no_grad():  # make layer scales, norms and tokens distinct so that a swap would show
        for name, parameter in reference.named_parameters():
            if "lambda1" in name or "norm" in name or "token" in name or "position" in name:
                parameter.copy_(torch.randn_like(parameter))
    published = _published_naming(reference.state_dict())
    assert any("attention.attention.query" in k for k in published)
    kwargs = {
        "img_size": 56,
        "patch_size": 14,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "init_values": 1.0,
    }
    if registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    if swiglu:  # transformers' SwiGLU width: (int(4 * 64 * 2 / 3) + 7) // 8 * 8 = 176, packed twice
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * 176 / 64)
    preset = EncoderPreset(
        name="tiny-dinov2",
        hub_id="nobody/tiny-dinov2",
        timm_name="vit_base_patch16_224",
        timm_kwargs=lambda: dict(kwargs),
        checkpoint_format="hf_dinov2",
        feature_dim=64,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        licence="test",
        reference="https://huggingface.co/nobody/tiny-dinov2",
    )
    monkeypatch.setitem(ENCODER_PRESETS, preset.name, preset)
    save_file(published, tmp_path / "model.safetensors")
    encoder = build_encoder("tiny-dinov2", weights=tmp_path / "model.safetensors").eval()
    assert encoder.weights == str(tmp_path / "model.safetensors")
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        expected = reference(pixel_values=encoder.normalize(images))
        torch.testing.assert_close(encoder(images), expected.pooler_output, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            encoder.backbone.forward_features(encoder.normalize(images)),
            expected.last_hidden_state,
            atol=1e-5,
            rtol=1e-4,
        )


def test_hf_dinov2_conversion_refuses_unknown_keys():
    with pytest.raises(ValueError, match="no timm counterpart"):
        hf_dinov2_to_timm({"pooler.dense.weight": torch.zeros(2, 2)}, no_embed_class=False)
    with pytest.raises(ValueError, match="lacks its query, key or value"):
        hf_dinov2_to_timm(
            {"encoder.layer.0.attention.attention.query.weight": torch.zeros(2, 2)}, no_embed_class=False
        )


# --- weights: hub, gated, offline, local, errors -----------------------------------------------------


def _hub_error(kind: str) -> Exception:
    from huggingface_hub import errors

    error = getattr(errors, kind).__new__(getattr(errors, kind))
    Exception.__init__(error, f"simulated {kind}")
    return error


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("GatedRepoError", "are gated: request access on the model page"),
        ("RepositoryNotFoundError", "Gated models answer so without a token"),
    ],
)
def test_gated_model_without_access_names_the_fix(monkeypatch, kind, message):
    import timm.models

    def refuse(*args, **kwargs):
        raise _hub_error(kind)

    monkeypatch.setattr(timm.models, "load_state_dict_from_hf", refuse)
    with pytest.raises(RuntimeError, match=message) as info:
        build_encoder("uni2-h")
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in str(info.value)
    assert "HF_TOKEN" in str(info.value)
    assert "weights=" in str(info.value)  # the local-file way out


def test_machine_without_network_names_the_fix(monkeypatch, tmp_path):
    """A real call into huggingface_hub in offline mode with an empty cache: what a machine without network sees."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="cannot reach the hub") as info:
        build_encoder("h-optimus-0")
    assert "local Hugging Face cache" in str(info.value)
    assert "weights=" in str(info.value)


def test_preset_weight_errors():
    with pytest.raises(ValueError, match="has no ImageNet weights"):
        build_encoder("uni", weights="imagenet")
    with pytest.raises(ValueError, match="does not match encoder 'hibou-b'"):
        build_encoder("hibou-b", weights=None, feature_dim=1024)
    with pytest.raises(TypeError, match="num_classes"):
        build_encoder("hibou-b", weights=None, num_classes=3)
    with pytest.raises(ValueError, match=re.escape("do not fit VisionTransformer")):
        build_encoder("hibou-b", weights={"cls_token": torch.zeros(1, 1, 768)})


def test_conch_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(
        ImportError, match=re.escape("pip install git+https://github.com/Mahmoodlab/CONCH.git")
    ):
        build_encoder("conch")
    with pytest.raises(TypeError, match="not a timm model"):
        build_encoder("conch", drop_path_rate=0.1)


def test_register_encoder_preset(monkeypatch):
    preset = EncoderPreset(
        name="my-vit",
        hub_id="me/my-vit",
        timm_name="vit_tiny_patch16_224",
        timm_kwargs=lambda: {"img_size": 32},
        feature_dim=192,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        licence="MIT",
    )
    monkeypatch.setitem(ENCODER_PRESETS, "my-vit", preset)  # restored after the test
    with pytest.raises(ValueError, match="already registered"):
        register_encoder_preset(preset)
    assert register_encoder_preset(preset, overwrite=True) is preset
    encoder = build_encoder("my-vit", weights=None)
    assert encoder.feature_dim == 192
    with pytest.raises(ValueError, match="pooling"):
        EncoderPreset(
            name="x", hub_id="x/x", timm_name="t", feature_dim=1, mean=(0,) * 3, std=(1,) * 3, pooling="max"
        )
    with pytest.raises(ValueError, match="exactly one of"):
        EncoderPreset(name="x", hub_id="x/x", feature_dim=1, mean=(0,) * 3, std=(1,) * 3)
