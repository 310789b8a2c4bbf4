"""The method contract (histo2expr.models.Method), checked for every registered method.

Every test is parametrized over ``available_methods()``: a new method (built in, or installed
through the ``histo2expr.methods`` entry point group) is tested by these without copying them.
Methods run with their default settings on a tiny frozen cohort of three slides: a fit slide, a
validation slide and a held-out slide.
"""

import dataclasses
import io
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import histo2expr as hx
from histo2expr.models import (
    Method,
    MethodSettings,
    SpotSet,
    TrainConfig,
    available_methods,
    base,
    get_method,
)
from histo2expr.models.base import REGIMES

METHODS = available_methods()
#: Settings that 32-pixel test patches need (the default token grid of NH2ST is a 224-pixel patch's).
TINY_PATCH_SETTINGS = {"nh2st": {"token_grid": 1}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 3, "batch_size": 32, "lr": 1e-2, "patience": 2, "progress": False, **changes}
    )


def _slide(rng, name, side, centres, profiles, origin):
    """Spots on a ``side x side`` grid in clusters: features near a cluster centre, expression near its profile."""
    xx, yy = np.meshgrid(np.arange(side), np.arange(side))
    coords = np.c_[xx.ravel(), yy.ravel()] * 100.0 + origin
    labels = (xx.ravel() // 3 + yy.ravel() // 3) % len(centres)
    features = centres[labels] + rng.normal(size=(len(coords), centres.shape[1]))
    targets = profiles[labels] + 0.5 * rng.normal(size=(len(coords), profiles.shape[1]))
    return SpotSet(
        coords=coords,
        groups=np.full(len(coords), name),
        features=features.astype(np.float32),
        targets=targets.astype(np.float32),
    )


@pytest.fixture(scope="module")
def cohort():
    """``(train, validation, held_out)``: 81, 49 and 49 spots with 12 features and 8 standardised genes."""
    rng = np.random.default_rng(0)
    centres, profiles = rng.normal(size=(4, 12)) * 3, rng.normal(size=(4, 8)) * 2
    slides = [
        _slide(rng, name, side, centres, profiles, 5000 * i)
        for i, (name, side) in enumerate([("a", 9), ("b", 7), ("c", 7)])
    ]
    mean, std = slides[0].targets.mean(0), slides[0].targets.std(0)
    for spots in slides:
        spots.targets = ((spots.targets - mean) / std).astype(np.float32)
    return tuple(slides)


@pytest.fixture(scope="module")
def fitted(cohort):
    """Every method fitted once with seed 0, by name."""
    train, validation, _ = cohort
    methods = {}
    for name in METHODS:
        method = get_method(name)()
        method.fit(train, validation, config())
        methods[name] = method
    return methods


def without_targets(spots: SpotSet) -> SpotSet:
    return dataclasses.replace(spots, targets=None)


def state_round_trip(method: Method) -> Method:
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    return type(method).from_state_dict(torch.load(buffer, weights_only=True))


def outputs(method: Method, spots: SpotSet) -> tuple:
    embedding = method.embed(spots)
    return method.predict(spots), embedding, method.confidence(spots, embedding=embedding)


def assert_same_outputs(first: tuple, second: tuple) -> None:
    for a, b in zip(first, second, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            np.testing.assert_array_equal(a, b)


def test_the_builtin_methods_are_registered():
    assert {"ridge", "stnet", "bleep", "chrep", "cmrcnet", "nh2st"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_declarations_and_settings(name):
    cls = get_method(name)
    assert issubclass(cls, Method) and cls.name == name
    assert cls.regimes and set(cls.regimes) <= set(REGIMES)
    assert issubclass(cls.settings_class, MethodSettings)
    assert TrainConfig().for_method(cls).patience == cls.default_patience  # a valid patience
    assert dataclasses.is_dataclass(cls.settings_class) and cls.settings_class.__dataclass_params__.frozen
    method = cls()
    assert isinstance(method.settings, cls.settings_class) and isinstance(method.uses_coordinates, bool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.settings.seed = 1
    with pytest.raises(TypeError, match="has no setting"):
        cls(not_a_setting=1)
    assert cls(cls.settings_class()).settings == method.settings


@pytest.mark.parametrize("name", METHODS)
def test_unfitted_method_is_a_clear_error(name, cohort):
    method = get_method(name)()
    for call in (lambda: method.predict(cohort[2]), lambda: method.embed(cohort[2]), method.state_dict):
        with pytest.raises(RuntimeError, match="not fitted"):
            call()


@pytest.mark.parametrize("name", METHODS)
def test_fit_predict_embed_confidence(name, cohort, fitted):
    method, held_out = fitted[name], cohort[2]
    assert method.report is not None
    predicted, embedding, confidence = outputs(method, without_targets(held_out))
    assert predicted.shape == held_out.targets.shape and predicted.dtype == np.float32
    assert embedding.ndim == 2 and len(embedding) == len(held_out) and embedding.dtype == np.float32
    assert np.isfinite(predicted).all() and np.isfinite(embedding).all()
    if confidence is not None:
        assert confidence.shape == (len(held_out),) and np.isfinite(confidence).all()


@pytest.mark.parametrize("name", METHODS)
def test_fit_leaves_its_inputs_unchanged(name, cohort):
    train, validation, _ = cohort
    before = [
        dataclasses.replace(s, features=s.features.copy(), targets=s.targets.copy())
        for s in (train, validation)
    ]
    get_method(name)().fit(train, validation, config(epochs=1))
    for spots, copy in zip((train, validation), before, strict=True):
        for field in ("coords", "groups", "features", "targets"):
            np.testing.assert_array_equal(getattr(spots, field), getattr(copy, field))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", METHODS)
def test_same_seed_is_bit_identical(name, threads, cohort):
    train, validation, held_out = cohort
    torch.set_num_threads(threads)  # the fixture restores the thread count
    runs = []
    for _ in range(2):
        method = get_method(name)()
        method.fit(train, validation, config(seed=3, epochs=2))
        runs.append(outputs(method, held_out))
    assert_same_outputs(*runs)


@pytest.mark.parametrize("name", METHODS)
def test_coordinates_are_read_only_when_declared(name, cohort):
    """A method whose settings say it does not use the spot centres gives the same results without them (NaN)."""
    if get_method(name)().uses_coordinates:
        pytest.skip(f"{name} reads the spot centres with its default settings (uses_coordinates)")
    unknown = tuple(dataclasses.replace(s, coords=np.full_like(s.coords, np.nan)) for s in cohort)
    runs = []
    for train, validation, held_out in (cohort, unknown):
        method = get_method(name)()
        method.fit(train, validation, config())
        runs.append(outputs(method, held_out))
    assert_same_outputs(*runs)


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip(name, cohort, fitted):
    method, held_out = fitted[name], cohort[2]
    state = method.state_dict()

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool | torch.Tensor)

    assert plain(state), "a state dict holds plain values and tensors only"
    loaded = state_round_trip(method)
    assert type(loaded) is type(method) and loaded.settings == method.settings
    assert_same_outputs(outputs(loaded, held_out), outputs(method, held_out))
    if method.report is not None:
        assert loaded.report == method.report


@pytest.mark.parametrize("name", METHODS)
def test_inference_reads_each_spots_own_image_only(name, cohort, fitted):
    """Held-out poisoning and batch independence: targets are never read, other spots never matter."""
    method, held_out = fitted[name], cohort[2]
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in method.state_dict().items()}
    clean = outputs(method, without_targets(held_out))
    # the held-out slide's expression is never read (poisoned with NaN and huge values)
    poisoned = held_out.targets.copy()
    poisoned[::2] = np.nan
    poisoned[1::2] = 1e6
    assert_same_outputs(outputs(method, dataclasses.replace(held_out, targets=poisoned)), clean)
    # a spot's result depends on its own image only: not on the other spots, their number or order
    order = np.random.default_rng(1).permutation(len(held_out))
    shuffled = outputs(method, without_targets(held_out.subset(order)))
    alone = outputs(method, without_targets(held_out.subset(order[:3])))
    for full, mixed, few in zip(clean, shuffled, alone, strict=True):
        if full is not None:
            np.testing.assert_allclose(mixed, full[order], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(few, full[order[:3]], rtol=1e-5, atol=1e-6)
    # wild features of other spots change nothing, and inference changes nothing of the method
    wild = held_out.features.copy()
    wild[3:] = 1e4
    mixed = outputs(method, SpotSet(coords=held_out.coords, groups=held_out.groups, features=wild))
    for full, part in zip(clean, mixed, strict=True):
        if full is not None:
            np.testing.assert_allclose(part[:3], full[:3], rtol=1e-5, atol=1e-6)
    after = method.state_dict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_end_to_end_fit_and_round_trip(name, patch_spots):
    cls = get_method(name)
    if "end2end" not in cls.regimes:
        pytest.skip(f"{name} has no end-to-end regime")
    spots, slides, _ = patch_spots(5, 12)
    names = sorted(set(slides))
    train = spots(np.flatnonzero(np.isin(slides, names[:3])))
    validation, test = (spots(np.flatnonzero(slides == name)) for name in names[3:])
    settings = dict(TINY_PATCH_SETTINGS.get(name, {}))
    if "encoder" in cls.settings_class.__dataclass_fields__:
        settings.update(encoder="test_resnet", weights=None)
    method = cls(**settings)
    method.fit(train, validation, config(epochs=1, batch_size=8))
    predicted = method.predict(test)
    assert predicted.shape == test.targets.shape and np.isfinite(predicted).all()
    assert_same_outputs(outputs(state_round_trip(method), test), outputs(method, test))


@pytest.fixture(scope="module")
def adapted_spots(patch_spots):
    """``(spots(positions), slides, cache)``: adapted SpotSets over the lower-block activations of a random
    EfficientNet-Lite0 at 32 px (4 dihedral views and a stain-jittered copy cached)."""
    from histo2expr.models import build_encoder
    from histo2expr.models.adapted import ActivationCache, AdaptedViews

    spots, slides, source = patch_spots(5, 12)
    encoder = build_encoder("efficientnet_lite0", weights=None, seed=0)
    views = AdaptedViews(dihedral=4, stain_copies=1, tta=4)
    cache = ActivationCache.build(source, encoder, trainable_blocks=1, views=views, progress=False)

    def adapted(positions):
        return dataclasses.replace(spots(positions), patches=None, activations=cache)

    return adapted, slides, cache


def test_adapted_cache_is_shared_by_seeds_unless_stain_copies_depend_on_them(patch_spots):
    from histo2expr.models import build_encoder
    from histo2expr.models.adapted import ActivationCache, AdaptedViews

    _, _, source = patch_spots(5, 12)
    encoder = build_encoder("efficientnet_lite0", weights=None, seed=0)

    def path(**views):
        built = ActivationCache.build(
            source, encoder, trainable_blocks=1, views=AdaptedViews(dihedral=4, **views), progress=False
        )
        return built.path

    assert path(seed=0) == path(seed=1) == path(seed=1, tta=1)
    assert path(stain_copies=1, seed=0) != path(stain_copies=1, seed=1)


@pytest.mark.parametrize("name", METHODS)
def test_adapted_fit_trains_the_top_and_round_trips(name, adapted_spots):
    cls = get_method(name)
    if "adapted" not in cls.regimes:
        pytest.skip(f"{name} has no adapted regime")
    spots, slides, cache = adapted_spots
    names = sorted(set(slides))
    train = spots(np.flatnonzero(np.isin(slides, names[:3])))
    validation, test = (spots(np.flatnonzero(slides == name)) for name in names[3:])
    method = cls(**TINY_PATCH_SETTINGS.get(name, {}))
    method.fit(train, validation, config(epochs=2, batch_size=8, patience=5))
    top = method.network.image_input.top
    untrained = cache.top_blocks()
    trained_weights, start_weights = top.state_dict(), untrained.state_dict()
    running = [k for k in start_weights if "running" in k]
    assert running and all(
        torch.equal(trained_weights[k], start_weights[k]) for k in running
    )  # BatchNorm kept
    if name != "chrep" or method.report.best_epoch is not None:  # chrep may keep its untrained encoder
        assert any(
            not torch.equal(trained_weights[k], start_weights[k]) for k in start_weights if k not in running
        )
    predicted = method.predict(without_targets(test))
    assert predicted.shape == test.targets.shape and np.isfinite(predicted).all()
    assert_same_outputs(outputs(state_round_trip(method), test), outputs(method, test))
    alone = method.predict(without_targets(test.subset(np.arange(3))))  # each spot from its own image
    np.testing.assert_allclose(
        alone, predicted[:3], rtol=1e-4, atol=1e-4
    )  # convolutions differ by batch size
    frozen = SpotSet(coords=test.coords, groups=test.groups, features=np.zeros((len(test), 4), np.float32))
    with pytest.raises(ValueError, match="adapted"):
        method.predict(frozen)


@pytest.fixture(scope="module")
def small_adata():
    adata = hx.datasets.synthetic(n_slides=2, seed=0, spots_per_side=10, n_genes=30)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
    return adata


@pytest.mark.parametrize("name", METHODS)
def test_held_out_slide_cannot_influence_its_fold(name, small_adata):
    """Poison the held-out slide's expression and half its features: the other half's out-of-fold
    predictions must not move (gene choice, standardisation, weights, galleries and early stopping
    see the training slide only, and each spot is predicted from its own image)."""
    kwargs = {
        "method": name,
        "genes": 10,
        "cv": "leave_one_slide_out",
        "epochs": 2,
        "refit": False,
        "progress": False,
    }
    clean = small_adata.copy()
    hx.tl.fit_histo2expr(clean, **kwargs)
    poisoned = small_adata.copy()
    held_out = np.flatnonzero((poisoned.obs["slide"] == poisoned.obs["slide"].iloc[-1]).to_numpy())
    counts = poisoned.layers["counts"].toarray()  # still valid data: other genes, three times the depth
    counts[held_out] = np.random.default_rng(1).permutation(counts[held_out].T).T * 3.0
    poisoned.layers["counts"] = counts
    hx.pp.normalize(poisoned)
    poisoned.obsm["X_histo"][held_out[::2]] *= 50.0
    hx.tl.fit_histo2expr(poisoned, **kwargs)
    kept = held_out[1::2]
    # the other fold trains on the poisoned slide and may choose other genes: this fold's genes are compared
    clean_kept, poisoned_kept = (hx.get.predictions(a).iloc[kept].dropna(axis=1) for a in (clean, poisoned))
    assert set(clean_kept.columns) == set(poisoned_kept.columns)
    pd.testing.assert_frame_equal(clean_kept, poisoned_kept[clean_kept.columns])


# --- methods of other packages ---------------------------------------------------------------------------


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """The example of docs/adding_a_method.md installed as the package ``histo2expr_mlp`` (a module and its
    ``.dist-info`` with an entry point in the group ``histo2expr.methods``), as ``pip install`` would."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md").read_text(encoding="utf-8")
    code = next(
        block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "class MLPMethod" in block
    )
    (tmp_path / "histo2expr_mlp.py").write_text(code, encoding="utf-8")
    info = tmp_path / "histo2expr_mlp-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: histo2expr-mlp\nVersion: 0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[histo2expr.methods]\nmlp = histo2expr_mlp:MLPMethod\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_READ", False)  # as in a new process, after `pip install`
    yield
    base._REGISTRY.pop("mlp", None)
    base._SEEN_ENTRY_POINTS.discard(("mlp", "histo2expr_mlp:MLPMethod"))
    sys.modules.pop("histo2expr_mlp", None)


def test_a_method_of_another_package_registers_by_entry_point_and_keeps_the_contract(
    installed_example, cohort, small_adata
):
    assert "mlp" in available_methods()  # found through its entry point, never imported by hand
    assert get_method("mlp").__module__ == "histo2expr_mlp"
    train, validation, _ = cohort
    method = get_method("mlp")(hidden=16)
    method.fit(train, validation, config())
    fitted = {"mlp": method}
    test_declarations_and_settings("mlp")
    test_unfitted_method_is_a_clear_error("mlp", cohort)
    test_fit_predict_embed_confidence("mlp", cohort, fitted)
    test_fit_leaves_its_inputs_unchanged("mlp", cohort)
    for threads in (1, 2):
        test_same_seed_is_bit_identical("mlp", threads, cohort)
    test_state_round_trip("mlp", cohort, fitted)
    test_inference_reads_each_spots_own_image_only("mlp", cohort, fitted)
    test_held_out_slide_cannot_influence_its_fold("mlp", small_adata)
    assert set(method.report.train_terms) == {"mse"}


def test_a_broken_entry_point_is_skipped_with_a_warning(tmp_path, monkeypatch):
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[histo2expr.methods]\nbroken = no_such_module:Method\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_READ", False)
    with pytest.warns(RuntimeWarning, match="'broken'.*could not be loaded"):
        names = available_methods()
    assert "broken" not in names and "ridge" in names
    base._SEEN_ENTRY_POINTS.discard(("broken", "no_such_module:Method"))


def test_a_name_cannot_be_taken_twice():
    class Impostor(get_method("ridge")):
        pass

    with pytest.raises(ValueError, match="'ridge' is taken"):
        base.register_method(Impostor)
