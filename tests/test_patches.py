from __future__ import annotations

import pickle
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from scipy import sparse

from histo2expr.io._image import PAD_VALUE
from histo2expr.patches import (
    Augment,
    PatchDataset,
    PatchSource,
    StainVectors,
    dihedral,
    dihedral_views,
    hed_jitter,
    macenko_stains,
    normalize_stains,
    patch_loader,
)
from histo2expr.patches._stain import REFERENCE_STAINS, from_optical_density, optical_density

RED = (255, 0, 0)


def write_image(path, pixels):
    if path.suffix == ".tif":
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    return path


def make_adata(tmp_path, slides, *, suffix=".tif"):
    """AnnData following the histo2expr data model; ``slides`` = {id: (pixels, [(x, y), ...], mpp)}."""
    names, slide_ids, coords, spatial = [], [], [], {}
    for slide, (pixels, spots, mpp) in slides.items():
        path = write_image(tmp_path / f"{slide}{suffix}", pixels)
        for number, (x, y) in enumerate(spots):
            names.append(f"{slide}_{number}")
            slide_ids.append(slide)
            coords.append((x, y))
        scalefactors = {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 10.0}
        if mpp is not None:
            scalefactors["microns_per_pixel"] = mpp
        spatial[slide] = {
            "images": {"hires": np.ascontiguousarray(pixels[::2, ::2])},
            "scalefactors": scalefactors,
            "metadata": {"source_image_path": str(path.resolve()), "microns_per_pixel_source": "argument"},
        }
    obs = pd.DataFrame({"slide": pd.Categorical(slide_ids)}, index=names)
    adata = ad.AnnData(sparse.csr_matrix((len(names), 2), dtype=np.float32), obs=obs)
    adata.var_names = ["GENE1", "GENE2"]
    adata.obsm["spatial"] = np.asarray(coords, dtype=float)
    adata.uns["spatial"] = spatial
    return adata


def textured(height, width, seed=0):
    """Smooth random colour texture: no two dihedral views of a patch coincide."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def physical_pattern(height, width, mpp):
    """RGB image of one smooth physical pattern (periods in µm), sampled at pixel centres."""
    y, x = ((np.mgrid[0:height, 0:width] + 0.5) * mpp).astype(float)
    red = 128 + 90 * np.sin(2 * np.pi * x / 40) * np.cos(2 * np.pi * y / 56)
    green = 128 + 90 * np.cos(2 * np.pi * (x + y) / 48)
    blue = np.full_like(x, 128)
    return np.rint(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


@pytest.fixture
def two_slides(tmp_path):
    spots_a = [(x, y) for y in range(20, 100, 20) for x in range(20, 140, 20)]
    spots_b = [(x, y) for y in range(25, 90, 15) for x in range(25, 100, 15)]
    return make_adata(
        tmp_path,
        {"A": (textured(120, 160, seed=1), spots_a, 0.5), "B": (textured(100, 120, seed=2), spots_b, 0.5)},
    )


@pytest.mark.parametrize("suffix", [".tif", ".png"])
@pytest.mark.parametrize("patch_size", [33, 32])
def test_marker_lands_in_patch_centre(tmp_path, suffix, patch_size):
    pixels = np.full((90, 130, 3), 128, dtype=np.uint8)
    pixels[40, 70] = RED  # row 40 = y, column 70 = x
    adata = make_adata(tmp_path, {"S": (pixels, [(70.0, 40.0), (20.0, 20.0)], 0.5)}, suffix=suffix)
    patch = PatchSource(adata, patch_size=patch_size)[0]
    assert patch.shape == (patch_size, patch_size, 3)
    assert patch.dtype == np.uint8
    red = np.argwhere((patch == RED).all(axis=-1))
    np.testing.assert_array_equal(red, [[patch_size // 2, patch_size // 2]])


def test_subpixel_centres_round_to_nearest_pixel(tmp_path):
    pixels = np.full((60, 60, 3), 128, dtype=np.uint8)
    pixels[30, 30] = RED
    adata = make_adata(tmp_path, {"S": (pixels, [(30.4, 29.6), (29.6, 30.4)], 0.5)})
    source = PatchSource(adata, patch_size=9)
    for patch in source.read([0, 1]):
        assert tuple(patch[4, 4]) == RED


def test_border_is_padded_with_white(tmp_path):
    pixels = np.zeros((50, 40, 3), dtype=np.uint8)
    adata = make_adata(tmp_path, {"S": (pixels, [(2.0, 3.0), (39.0, 49.0)], 0.5)})
    source = PatchSource(adata, patch_size=16)
    corner = source[0]  # window rows 3-8 .. , columns 2-8 ..: 5 rows and 6 columns fall outside
    inside = np.zeros((16, 16), dtype=bool)
    inside[5:, 6:] = True
    assert (corner[inside] == 0).all()
    assert (corner[~inside] == PAD_VALUE).all()
    far = source[1]  # rows 41..56 and columns 31..46: the last 7 rows and 7 columns are outside
    assert (far[:9, :9] == 0).all()
    assert (far[9:] == PAD_VALUE).all() and (far[:, 9:] == PAD_VALUE).all()


def test_slides_at_different_mpp_give_the_same_field_of_view(tmp_path):
    # The same physical pattern scanned at 0.5 and at 1.0 µm/px; spots at the same physical places.
    microns = [(50.0, 60.0), (90.0, 40.0), (70.0, 75.0)]
    fine = physical_pattern(300, 300, 0.5)
    coarse = physical_pattern(150, 150, 1.0)
    adata = make_adata(
        tmp_path,
        {
            "fine": (fine, [(x / 0.5, y / 0.5) for x, y in microns], 0.5),
            "coarse": (coarse, [(x / 1.0, y / 1.0) for x, y in microns], 1.0),
        },
    )
    source = PatchSource(adata, patch_size=40, mpp=1.0)
    assert source.describe()["slides"]["fine"]["crop_px"] == 80
    assert source.describe()["slides"]["coarse"]["crop_px"] == 40
    codes = source.slide_codes
    fine_idx = np.flatnonzero(codes == source.slides.index("fine"))
    coarse_idx = np.flatnonzero(codes == source.slides.index("coarse"))
    fine_patches = source.read(fine_idx).astype(int)
    coarse_patches = source.read(coarse_idx).astype(int)
    assert np.abs(fine_patches - coarse_patches).max() <= 6
    assert np.abs(fine_patches - coarse_patches).mean() < 1.5
    # at 0.5 µm/px the same 40 px patch shows half the field of view, and differs clearly
    half = PatchSource(adata, patch_size=40, mpp=0.5)
    assert np.abs(half.read(fine_idx).astype(int) - coarse_patches).mean() > 10


def test_mpp_none_keeps_native_resolution_when_slides_agree(tmp_path):
    pixels = textured(80, 80)
    adata = make_adata(tmp_path, {"A": (pixels, [(40, 40)], 0.50), "B": (pixels, [(40, 40)], 0.505)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = PatchSource(adata, patch_size=24)
    assert source.mpp == pytest.approx(0.5025)
    assert {s["crop_px"] for s in source.describe()["slides"].values()} == {24}
    np.testing.assert_array_equal(source[0], source[1])


def test_mpp_none_with_mixed_resolutions_warns_and_resamples(tmp_path):
    adata = make_adata(
        tmp_path,
        {
            "A": (textured(80, 80), [(40, 40)], 0.5),
            "B": (textured(80, 80), [(40, 40)], 1.0),
            "C": (textured(80, 80), [(40, 40)], 1.0),
        },
    )
    with pytest.warns(UserWarning, match=r"resampled") as record:
        source = PatchSource(adata, patch_size=20)
    assert "'A'" in str(record[0].message) and "'B'" not in str(record[0].message)
    assert source.mpp == 1.0
    assert source.describe()["slides"]["A"]["crop_px"] == 40
    assert source[0].shape == (20, 20, 3)


def test_describe_records_the_geometry(two_slides):
    description = PatchSource(two_slides, patch_size=16, mpp=0.25).describe()
    assert description == {
        "patch_size": 16,
        "mpp": 0.25,
        "field": 1.0,
        "stain_normalization": None,
        "pad_value": 255,
        "slides": {
            "A": {"microns_per_pixel": 0.5, "crop_px": 8},
            "B": {"microns_per_pixel": 0.5, "crop_px": 8},
        },
    }


def test_a_context_view_is_a_wider_field_shrunk_to_the_patch(two_slides):
    spot = PatchSource(two_slides, patch_size=8)
    context = PatchSource(two_slides, patch_size=8, field=3)
    wide = PatchSource(two_slides, patch_size=24)  # the same field at full resolution
    assert context.describe()["field"] == 3.0 and context.describe()["slides"]["A"]["crop_px"] == 24
    assert context[5].shape == (8, 8, 3) and "field 3 patches" in repr(context)
    expected = np.asarray(
        Image.fromarray(wide[5]).resize((8, 8), Image.Resampling.BILINEAR, reducing_gap=3.0)
    )
    np.testing.assert_array_equal(context[5], expected)
    np.testing.assert_array_equal(wide[5][8:16, 8:16], spot[5])  # both centred on the spot
    with pytest.raises(ValueError, match=r"field=0\.5"):
        PatchSource(two_slides, field=0.5)
    with pytest.raises(TypeError, match="field"):
        PatchSource(two_slides, field="wide")


def test_hires_fallback_scales_the_spot_centres(tmp_path):
    pixels = np.full((100, 100, 3), 128, dtype=np.uint8)
    adata = make_adata(tmp_path, {"S": (pixels, [(60.0, 40.0)], 0.5)})
    hires = np.full((50, 50, 3), 128, dtype=np.uint8)
    hires[20, 30] = RED  # full-resolution (60, 40) at tissue_hires_scalef 0.5
    adata.uns["spatial"]["S"]["images"]["hires"] = hires
    del adata.uns["spatial"]["S"]["metadata"]["source_image_path"]
    with pytest.warns(UserWarning, match="downscaled"):
        source = PatchSource(adata, patch_size=11)
    assert source.describe()["slides"]["S"]["microns_per_pixel"] == 1.0
    assert tuple(source[0][5, 5]) == RED


def test_spatialdata_spots_are_placed_through_their_transformation():
    pytest.importorskip("spatialdata")
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Translation

    pixels = np.full((90, 130, 3), 128, dtype=np.uint8)
    pixels[40, 70] = RED
    # circles in their own frame, shifted by (+10, +5) px onto the image
    shapes = ShapesModel.parse(
        np.array([[60.0, 35.0], [10.0, 10.0]]),
        geometry=0,
        radius=np.full(2, 5.0),
        transformations={"global": Translation([10, 5], axes=("x", "y"))},
    )
    obs = pd.DataFrame(
        {"slide": pd.Categorical(["S", "S"]), "region": pd.Categorical(["spots"] * 2), "spot": shapes.index},
        index=["S_0", "S_1"],
    )
    table = TableModel.parse(
        ad.AnnData(np.zeros((2, 1), dtype=np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="spot",
    )
    image = Image2DModel.parse(pixels.transpose(2, 0, 1), dims=("c", "y", "x"))
    sdata = SpatialData(images={"S": image}, shapes={"spots": shapes}, tables={"table": table})
    source = PatchSource(sdata, patch_size=15)
    assert len(source) == 2 and source.mpp is None
    assert tuple(source[0][7, 7]) == RED
    with pytest.raises(ValueError, match="AnnData only"):
        PatchSource(sdata, patch_size=15, spatial_key="X_other")


def test_spot_outside_the_image_is_an_error_naming_slide_count_and_size(tmp_path):
    adata = make_adata(tmp_path, {"S": (textured(100, 200), [(10, 10), (250, 50), (20, -3)], 0.5)})
    with pytest.raises(ValueError, match=r"2 of 3 spots of slide 'S'.*200 x 100 px"):
        PatchSource(adata, patch_size=16)


def test_mpp_needs_the_slides_pixel_size(tmp_path):
    adata = make_adata(tmp_path, {"S": (textured(60, 60), [(30, 30)], None)})
    with pytest.raises(ValueError, match=r"scalefactors'\]\['microns_per_pixel'\]"):
        PatchSource(adata, patch_size=16, mpp=0.5)
    source = PatchSource(adata, patch_size=16)  # native pixels when the scale is unknown everywhere
    assert source.mpp is None
    assert source[0].shape == (16, 16, 3)


def test_partly_unknown_pixel_sizes_are_an_error(tmp_path):
    adata = make_adata(
        tmp_path, {"A": (textured(60, 60), [(30, 30)], 0.5), "B": (textured(60, 60), [(30, 30)], None)}
    )
    with pytest.raises(ValueError, match=r"\['B'\] have no microns_per_pixel"):
        PatchSource(adata, patch_size=16)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patch_size": 0}, ValueError, "out of range"),
        ({"patch_size": 10_000}, ValueError, "out of range"),
        ({"patch_size": 22.5}, TypeError, "integer"),
        ({"mpp": -1.0}, ValueError, "not a positive number"),
        ({"mpp": float("nan")}, ValueError, "not a positive number"),
        ({"mpp": 500.0}, ValueError, "outside the 0.02-20 µm"),
        ({"mpp": 0.05}, ValueError, "resample slide 'A'"),
        ({"slide_key": "sample"}, KeyError, "slide_key='sample'"),
    ],
)
def test_bad_arguments_are_refused(two_slides, kwargs, error, match):
    with pytest.raises(error, match=match):
        PatchSource(two_slides, **kwargs)


def test_read_and_slide_order(two_slides):
    source = PatchSource(two_slides, patch_size=12)
    n_a = int((two_slides.obs["slide"] == "A").sum())
    picked = np.array([n_a + 2, 0, n_a, 3, 1])
    batch = source.read(picked)
    np.testing.assert_array_equal(batch, np.stack([source[int(i)] for i in picked]))
    np.testing.assert_array_equal(source.slide_order(picked), [0, 3, 1, n_a + 2, n_a])
    np.testing.assert_array_equal(source.slide_order(), np.arange(len(source)))
    with pytest.raises(IndexError, match="outside range"):
        source.read([0, len(source)])
    with pytest.raises(TypeError, match="integer spot positions"):
        source.read([0.5, 1.0])
    with pytest.raises(IndexError):
        source[len(source)]
    np.testing.assert_array_equal(source[-1], source[len(source) - 1])


def test_source_maps_one_slide_at_a_time_and_pickles_without_pixels(two_slides):
    source = PatchSource(two_slides, patch_size=12)
    codes = source.slide_codes
    source[int(np.flatnonzero(codes == 0)[0])]
    code, first = source._open
    assert code == 0 and first.pixels is not None
    source[int(np.flatnonzero(codes == 1)[0])]
    code, second = source._open
    assert code == 1 and second is not first
    # the SlideImage objects themselves are never mapped; a pickle carries no pixels
    assert all(slide.image._mapped is None for slide in source._images)
    payload = pickle.dumps(source)
    assert len(payload) < 20_000
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone.read(np.arange(len(source))), source.read(np.arange(len(source))))


def test_eval_dataset_is_the_source_itself(two_slides):
    source = PatchSource(two_slides, patch_size=12)
    dataset = PatchDataset(source, indices=[5, 0, 7])
    assert len(dataset) == 3
    item = dataset[0]
    assert item["index"] == 5
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 12, 12)
    np.testing.assert_array_equal(item["image"].numpy().transpose(1, 2, 0), source[5])
    dataset.set_epoch(4)
    np.testing.assert_array_equal(dataset[0]["image"].numpy().transpose(1, 2, 0), source[5])


def test_augmentation_is_determined_by_seed_epoch_and_index(two_slides):
    source = PatchSource(two_slides, patch_size=16)
    dataset = PatchDataset(source, augment=True, seed=3)
    again = PatchDataset(source, augment=True, seed=3)
    other_seed = PatchDataset(source, augment=True, seed=4)
    first = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    assert torch.equal(first, torch.stack([again[i]["image"] for i in range(len(dataset))]))
    assert not torch.equal(first, torch.stack([other_seed[i]["image"] for i in range(len(dataset))]))
    dataset.set_epoch(1)
    second = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    assert not torch.equal(first, second)
    assert torch.equal(second[2], dataset[(2, 1)]["image"])  # an explicit epoch wins over set_epoch
    assert torch.equal(first[2], dataset[(2, 0)]["image"])


def test_augment_is_a_dihedral_view_plus_light_colour_jitter():
    patch = textured(24, 24)
    views = dihedral_views(patch, axes=(0, 1))
    geometric = Augment(brightness=0, contrast=0, saturation=0, hue=0)
    for seed in range(6):
        out = geometric(patch, np.random.default_rng(seed))
        assert any(np.array_equal(out, view) for view in views)
    jittered = Augment(dihedral=False)(patch, np.random.default_rng(0))
    assert jittered.dtype == np.uint8 and jittered.shape == patch.shape
    change = np.abs(jittered.astype(int) - patch.astype(int))
    assert 0 < change.mean() < 25
    identity = Augment(dihedral=False, brightness=0, contrast=0, saturation=0, hue=0)
    np.testing.assert_array_equal(identity(patch, np.random.default_rng(0)), patch)
    with pytest.raises(ValueError, match="brightness"):
        Augment(brightness=1.5)
    with pytest.raises(ValueError, match="hue"):
        Augment(hue=0.9)


def test_dihedral_views_are_the_eight_distinct_symmetries():
    batch = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    views = dihedral_views(batch, axes=(1, 2))
    assert len(views) == 8
    np.testing.assert_array_equal(views[0], batch)
    assert len({view.tobytes() for view in views}) == 8
    # closed under composition: transforming any view gives another view
    keys = {view.tobytes() for view in views}
    assert all(dihedral(view, k, axes=(1, 2)).tobytes() in keys for view in views for k in range(8))
    tensor = torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())
    for k, view in enumerate(dihedral_views(tensor)):
        np.testing.assert_array_equal(view.numpy().transpose(0, 2, 3, 1), views[k])
    with pytest.raises(ValueError, match="0 to 7"):
        dihedral(batch, 8)


def _batches(loader):
    return [(batch["image"].clone(), batch["index"].clone()) for batch in loader]


@pytest.mark.parametrize("augment", [False, True])
def test_loader_with_workers_matches_loader_without(two_slides, augment):
    source = PatchSource(two_slides, patch_size=16)
    kwargs = {"batch_size": 7, "augment": augment, "shuffle": augment, "seed": 1}
    serial = _batches(patch_loader(source, num_workers=0, **kwargs))
    parallel = _batches(patch_loader(source, num_workers=2, **kwargs))
    assert len(serial) == len(parallel) == int(np.ceil(len(source) / 7))
    for (images, indices), (images_w, indices_w) in zip(serial, parallel, strict=True):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        assert torch.equal(indices, indices_w)
        assert torch.equal(images, images_w)


def test_persistent_workers_see_each_new_epoch(two_slides):
    source = PatchSource(two_slides, patch_size=16)
    kwargs = {"batch_size": 8, "augment": True, "shuffle": True, "seed": 2}
    serial = patch_loader(source, num_workers=0, **kwargs)
    persistent = patch_loader(source, num_workers=2, persistent_workers=True, **kwargs)
    epochs = [(_batches(serial), _batches(persistent)) for _ in range(2)]
    for expected, got in epochs:
        for (images, indices), (images_w, indices_w) in zip(expected, got, strict=True):
            assert torch.equal(indices, indices_w) and torch.equal(images, images_w)
    # the same spot is augmented differently in the second epoch
    by_index = [
        {int(i): image for images, indices in got for i, image in zip(indices, images, strict=True)}
        for _, got in epochs
    ]
    changed = [not torch.equal(by_index[0][i], by_index[1][i]) for i in range(len(source))]
    assert np.mean(changed) > 0.5


def test_eval_loader_visits_slides_one_after_the_other(two_slides):
    source = PatchSource(two_slides, patch_size=8)
    rng = np.random.default_rng(0)
    indices = rng.permutation(len(source))[: len(source) - 3]
    loader = patch_loader(source, indices=indices, batch_size=5)
    served = torch.cat([batch["index"] for batch in loader]).numpy()
    assert sorted(served) == sorted(indices)
    codes = source.slide_codes[served]
    assert (np.diff(codes) >= 0).all() and len(np.unique(codes)) == 2
    # within a slide the requested order is kept
    np.testing.assert_array_equal(served, source.slide_order(indices))
    again = torch.cat([batch["index"] for batch in loader]).numpy()
    np.testing.assert_array_equal(again, served)


def test_train_loader_shuffles_with_a_seed_per_epoch(two_slides):
    source = PatchSource(two_slides, patch_size=8)

    def order(loader):
        return torch.cat([batch["index"] for batch in loader]).numpy()

    loader = patch_loader(source, batch_size=6, shuffle=True, seed=5)
    epoch0, epoch1 = order(loader), order(loader)
    assert sorted(epoch0) == list(range(len(source))) and sorted(epoch1) == sorted(epoch0)
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.sort(epoch0))
    replay = patch_loader(source, batch_size=6, shuffle=True, seed=5)
    np.testing.assert_array_equal(order(replay), epoch0)
    replay.sampler.set_epoch(1)
    np.testing.assert_array_equal(order(replay), epoch1)


def test_loader_arguments_are_checked(two_slides):
    source = PatchSource(two_slides, patch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        patch_loader(source, batch_size=0)
    with pytest.raises(TypeError, match="augment"):
        patch_loader(source, augment="yes")
    with pytest.raises(ValueError, match="seed"):
        patch_loader(source, seed=-1)


@pytest.mark.realdata
def test_her2st_patches_at_spot_centres(her2st_path):
    from histo2expr.io import read_legacy_st

    adata = read_legacy_st(her2st_path, sections=["B4"])
    source = PatchSource(adata, patch_size=224)
    assert source.slides == ["B4"]
    assert len(source) == adata.n_obs > 200
    assert source.mpp == pytest.approx(adata.uns["spatial"]["B4"]["scalefactors"]["microns_per_pixel"])
    patches = source.read(np.arange(0, len(source), 10))
    assert patches.shape == (len(range(0, len(source), 10)), 224, 224, 3)
    assert patches.dtype == np.uint8
    # spots under tissue: stained, textured, not glass
    assert (patches.reshape(len(patches), -1).std(axis=1) > 10).all()
    assert (patches.reshape(len(patches), -1).mean(axis=1) < 235).mean() > 0.9


# Stain vectors: Macenko's estimate and normalisation, HED jitter, and their use in PatchSource.

#: Stains of a "purple" scanner, unlike the reference (columns: haematoxylin, eosin).
SHIFTED = np.array([[0.70, 0.30], [0.62, 0.85], [0.35, 0.43]])


def unit(matrix):
    return matrix / np.linalg.norm(matrix, axis=0)


def concentrations(height, width, seed=0):
    """Smooth haematoxylin and eosin maps ``(H, W, 2)`` with pure-H, pure-E and empty regions."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, size=(height // 6 + 1, width // 6 + 1, 2))
    maps = np.stack(
        [
            np.asarray(Image.fromarray(small[..., c].astype(np.float32)).resize((width, height)))
            for c in range(2)
        ],
        axis=-1,
    )
    maps[..., 0] *= 1.6  # haematoxylin darker than eosin, as in H&E
    maps[: height // 4, :, 1] = 0  # pure haematoxylin
    maps[-height // 4 :, :, 0] = 0  # pure eosin
    maps[:, : width // 8] = 0  # glass
    return maps


def stained(maps, matrix):
    """uint8 RGB of concentration ``maps`` under the stain ``matrix`` (Beer-Lambert)."""
    return from_optical_density(maps @ unit(matrix).T)


def test_optical_density_round_trips():
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(-1, 3)
    np.testing.assert_array_equal(from_optical_density(optical_density(pixels)), pixels)


@pytest.mark.parametrize("matrix", [REFERENCE_STAINS.matrix, SHIFTED])
def test_macenko_recovers_the_stain_vectors_of_a_synthetic_image(matrix):
    image = stained(concentrations(96, 96), matrix)
    found = macenko_stains(image)
    cosines = (found.matrix * unit(matrix)).sum(axis=0)
    assert cosines.min() > 0.995  # haematoxylin first, eosin second
    assert np.allclose(np.linalg.norm(found.matrix, axis=0), 1)


def test_normalising_a_stain_shifted_image_recovers_the_original():
    maps = concentrations(96, 96, seed=1)
    original = stained(maps, REFERENCE_STAINS.matrix)
    shifted = stained(0.7 * maps, SHIFTED)  # other stain colours, and paler
    assert np.abs(shifted.astype(int) - original.astype(int)).mean() > 10
    restored = normalize_stains(shifted, macenko_stains(shifted), target=macenko_stains(original))
    assert restored.shape == original.shape and restored.dtype == np.uint8
    assert np.abs(restored.astype(int) - original.astype(int)).mean() < 2


def test_macenko_refuses_an_image_without_tissue():
    with pytest.raises(ValueError, match="stained tissue"):
        macenko_stains(np.full((20, 20, 3), 250, dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        macenko_stains(np.zeros((20, 20, 3), dtype=np.float32))


def test_hed_jitter_is_the_identity_at_rest_and_moves_the_stains():
    from skimage.color import hed_from_rgb

    image = stained(concentrations(48, 48, seed=2), REFERENCE_STAINS.matrix)
    np.testing.assert_array_equal(hed_jitter(image, [1, 1], [0, 0]), image)

    def stain_amounts(pixels):
        return (optical_density(pixels).reshape(-1, 3) @ hed_from_rgb).mean(axis=0)

    more_haematoxylin = hed_jitter(image, [1.3, 1.0], [0, 0])
    before, after = stain_amounts(image), stain_amounts(more_haematoxylin)
    assert after[0] > 1.2 * before[0]
    assert abs(after[1] - before[1]) < 0.05 * abs(before[1]) + 1e-3


def test_augment_stain_jitter_keeps_the_other_draws():
    patch = stained(concentrations(24, 24, seed=3), REFERENCE_STAINS.matrix)
    plain, jittered = Augment(), Augment(stain=0.3)
    for seed in range(4):
        a, b = plain(patch, np.random.default_rng(seed)), jittered(patch, np.random.default_rng(seed))
        assert a.shape == b.shape and not np.array_equal(a, b)
        np.testing.assert_array_equal(b, jittered(patch, np.random.default_rng(seed)))
    # without colour jitter and flips, the stain jitter alone is what changes the patch
    only_stain = Augment(dihedral=False, stain=0.3, brightness=0, contrast=0, saturation=0, hue=0)
    assert not np.array_equal(only_stain(patch, np.random.default_rng(0)), patch)
    with pytest.raises(ValueError, match="stain"):
        Augment(stain=1.0)


def make_stained_slides(tmp_path):
    """Two slides of the same tissue under different stains (and one spot grid)."""
    maps = concentrations(120, 120, seed=4)
    spots = [(x, y) for y in range(30, 100, 20) for x in range(30, 100, 20)]
    return make_adata(
        tmp_path,
        {
            "reference": (stained(maps, REFERENCE_STAINS.matrix), spots, 0.5),
            "shifted": (stained(0.8 * maps, SHIFTED), spots, 0.5),
        },
    )


def test_patch_source_normalises_each_slide_by_its_own_stains(tmp_path):
    adata = make_stained_slides(tmp_path)
    raw = PatchSource(adata, patch_size=16)
    normalised = PatchSource(adata, patch_size=16, stain_normalization="macenko")
    n = len(raw) // 2  # spot i of "reference" sits where spot n + i of "shifted" does

    def gap(source):
        return np.mean([np.abs(source[i].astype(int) - source[n + i].astype(int)).mean() for i in range(n)])

    assert gap(normalised) < 0.2 * gap(raw)
    record = normalised.describe()
    assert record["stain_normalization"] == "macenko"
    assert isinstance(normalised.stains[0], StainVectors)
    assert np.allclose(record["slides"]["shifted"]["stains"]["matrix"], normalised.stains[1].matrix)
    assert (
        raw.describe()["stain_normalization"] is None and "stains" not in raw.describe()["slides"]["shifted"]
    )
    with pytest.raises(ValueError, match="stain_normalization"):
        PatchSource(adata, stain_normalization="reinhard")
