"""hx.settings: CPU threads that respect the process's limits, a bounded cache written atomically, the image guard."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import histo2expr as hx
from histo2expr import _settings
from histo2expr._cache import atomic_path, make_room
from histo2expr.io._image import LazyImage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder for this test; its images sub-folder."""
    monkeypatch.setattr(hx.settings, "cache_dir", tmp_path / "cache")
    return tmp_path / "cache" / "images"


def files_in(folder: Path) -> list[str]:
    """Every file name in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- threads -------------------------------------------------------------------------------------------


def test_settings_validate_and_print():
    with pytest.raises(ValueError, match="None or a positive integer"):
        hx.settings.n_threads = 0
    with pytest.raises(ValueError, match="positive number of bytes"):
        hx.settings.cache_max_bytes = None
    with pytest.raises(ValueError, match="max_image_pixels"):
        hx.settings.max_image_pixels = -5
    assert "n_threads = 1" in repr(hx.settings)  # the test session runs on one thread (conftest)


def test_available_cpus_respect_affinity_quota_and_slurm(monkeypatch):
    import joblib
    from joblib.externals.loky.backend import context

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda count: count)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert joblib.cpu_count(only_physical_cores=False) == 3
    assert _settings.available_cpus() == 3
    monkeypatch.setattr(context, "_cpu_count_cgroup", lambda count: 2)  # a cgroup CPU quota of 2
    assert _settings.available_cpus() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert _settings.available_cpus() == 1


def test_compute_threads_follow_the_setting_the_environment_and_the_load(monkeypatch):
    monkeypatch.setattr(_settings, "available_cpus", lambda: 8)
    monkeypatch.setattr(_settings, "busy_cpus", lambda: 3.2)
    monkeypatch.setattr(hx.settings, "n_threads", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _settings.compute_threads() == 5  # 8 CPUs, about 3 busy with other processes
    assert _settings.compute_threads(num_workers=2) == 3  # one CPU per data-loading worker
    monkeypatch.setattr(_settings, "busy_cpus", lambda: 8.0)
    assert _settings.compute_threads() == 1  # at least one
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert _settings.compute_threads() == 6
    hx.settings.n_threads = 4
    assert _settings.compute_threads(num_workers=10) == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is a Linux interface")
def test_busy_cpus_reads_this_process_cpus():
    busy = _settings.busy_cpus()
    assert 0.0 <= busy <= len(os.sched_getaffinity(0)) + 1e-6


def test_cpu_threads_sets_torch_and_blas_and_restores_them(monkeypatch):
    from threadpoolctl import threadpool_info

    monkeypatch.setattr(hx.settings, "n_threads", 2)
    torch.set_num_threads(3)
    try:
        with _settings.cpu_threads() as threads:
            assert threads == 2 and torch.get_num_threads() == 2
            assert all(pool["num_threads"] == 2 for pool in threadpool_info() if pool["user_api"] == "blas")
            with _settings.cpu_threads(num_workers=1) as inner:  # a call inside another keeps its threads
                assert inner == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)


def test_fit_predict_and_embed_run_under_the_thread_policy(monkeypatch):
    calls = []
    monkeypatch.setattr(_settings, "compute_threads", lambda num_workers=0: calls.append(num_workers) or 1)
    adata = hx.datasets.synthetic(n_slides=2, spots_per_side=5, n_genes=12)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=16, progress=False)
    model = hx.tl.fit_histo2expr(adata, method="ridge", genes=5, num_workers=0, progress=False)
    hx.tl.predict_expression(adata, model)
    assert calls == [0, 0, 0]


# --- the decoded-image cache -----------------------------------------------------------------------------


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_refused_before_anything_is_written(tmp_path, cache):
    bomb = png_claiming(tmp_path / "bomb.png", 200_000, 200_000)
    assert bomb.stat().st_size < 1024
    with pytest.raises(ValueError, match=r"200000 x 200000 pixels.*max_image_pixels.*tiled TIFF"):
        LazyImage(bomb).read_region(0, 0, 8, 8)
    assert files_in(cache) == []


def test_the_pixel_limit_is_a_setting(tmp_path, cache, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((100, 120, 3), 200, dtype=np.uint8)).save(path)
    monkeypatch.setattr(hx.settings, "max_image_pixels", 10_000)
    with pytest.raises(ValueError, match="max_image_pixels"):
        LazyImage(path).read_region(0, 0, 4, 4)
    hx.settings.max_image_pixels = 12_000
    assert LazyImage(path).read_region(0, 0, 4, 4).shape == (4, 4, 3)


def test_a_truncated_jpeg_fails_clearly_and_leaves_no_temporary_file(tmp_path, cache):
    whole = tmp_path / "whole.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(whole, quality=90)
    half = whole.read_bytes()[: whole.stat().st_size // 2]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(half)
    with pytest.raises(ValueError, match=r"truncated.jpg is cut off"):
        LazyImage(truncated).read_region(0, 0, 8, 8)
    assert files_in(cache) == []
    assert LazyImage(whole).read_region(0, 0, 8, 8).shape == (8, 8, 3)
    assert len(files_in(cache)) == 1 and not files_in(cache)[0].startswith(".")


def test_a_decode_that_fails_half_way_leaves_no_temporary_file(tmp_path, cache, monkeypatch):
    from histo2expr.io import _image

    path = tmp_path / "slide.png"
    Image.fromarray(np.full((600, 50, 3), 120, dtype=np.uint8)).save(path)
    real = _image._decode_into

    def fails_half_way(source, tmp, shape):
        real(source, tmp, shape)  # the temporary file is written in full...
        raise OSError("No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(_image, "_decode_into", fails_half_way)
    with pytest.raises(ValueError, match=r"slide.png cannot be read \(No space left on device\)"):
        LazyImage(path).read_region(0, 0, 8, 8)
    assert files_in(cache) == []


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert files_in(tmp_path) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert files_in(tmp_path) == ["out.npy"] and target.read_bytes() == b"whole"


def test_the_cache_evicts_the_least_recently_used_images(tmp_path, cache, monkeypatch):
    paths = []
    for i in range(3):
        path = tmp_path / f"slide{i}.png"
        Image.fromarray(np.full((100, 100, 3), 50 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    one_image = 100 * 100 * 3 + 128  # pixels and the .npy header
    monkeypatch.setattr(hx.settings, "cache_max_bytes", 2 * one_image + 64)
    for age, path in zip((300, 200), paths[:2], strict=True):
        LazyImage(path).read_region(0, 0, 2, 2)
        decoded = next(cache.glob(f"{path.stem}-*.npy"))
        os.utime(decoded, (decoded.stat().st_atime, decoded.stat().st_mtime - age))
    LazyImage(paths[0]).read_region(0, 0, 2, 2)  # used again: now the most recent
    LazyImage(paths[2]).read_region(0, 0, 2, 2)  # a third image: the least recently used goes
    assert sorted(name.split("-")[0] for name in files_in(cache)) == ["slide0", "slide2"]
    monkeypatch.setattr(hx.settings, "cache_max_bytes", 1000)
    with pytest.raises(ValueError, match=r"cache_max_bytes.*tiled TIFF"):
        LazyImage(paths[1]).read_region(0, 0, 2, 2)


def test_leftovers_of_a_killed_process_are_removed(cache):
    cache.mkdir(parents=True)
    stale = cache / ".slide-abc.123-deadbeef.tmp.npy"
    stale.write_bytes(b"x")
    old = stale.stat().st_mtime - 7 * 3600
    os.utime(stale, (old, old))
    fresh = cache / ".other-def.456-cafecafe.tmp.npy"  # being written by a live process
    fresh.write_bytes(b"x")
    make_room(cache, 10, what="a test")
    assert files_in(cache) == [fresh.name]


def test_tiled_and_uncompressed_tiffs_are_never_decoded_into_the_cache(tmp_path, cache):
    import tifffile

    from histo2expr.io._wsi_image import open_slide_image

    pixels = np.random.default_rng(1).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    tiled, plain = tmp_path / "tiled.tif", tmp_path / "plain.tif"
    tifffile.imwrite(tiled, pixels, tile=(64, 64), compression="zlib", photometric="rgb")
    tifffile.imwrite(plain, pixels, photometric="rgb")
    for path in (tiled, plain):
        np.testing.assert_array_equal(
            open_slide_image(path).read_region(10, 20, 30, 40), pixels[10:40, 20:60]
        )
    assert files_in(cache) == []


def test_the_synthetic_cohort_writes_its_images_atomically(tmp_path):
    hx.datasets.synthetic(n_slides=2, spots_per_side=4, n_genes=4, path=tmp_path)
    assert files_in(tmp_path) == ["S1.tif", "S2.tif"]


# --- progress bars -----------------------------------------------------------------------------------------


def test_progress_bars_are_text_without_ipywidgets_and_never_warn(monkeypatch):
    import importlib.util
    import warnings

    from tqdm.std import tqdm as text_bar

    from histo2expr._progress import progress_bar

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress_bar(range(3), disable=True)
    assert type(bar) is text_bar


def test_one_progress_bar_per_fit(capsys):
    adata = hx.datasets.synthetic(n_slides=3, spots_per_side=5, n_genes=12)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=16, progress=False)
    hx.tl.fit_histo2expr(adata, method="bleep", genes=5, cv="leave_one_slide_out", epochs=2, refit=False)
    printed = capsys.readouterr().err
    assert "fit bleep: 100%" in printed and "3/3" in printed and "epochs:" not in printed  # folds, not epochs
    hx.tl.fit_histo2expr(adata, method="bleep", genes=5, epochs=2, key_added="final")
    printed = capsys.readouterr().err
    assert "epochs:" in printed and "fit bleep" not in printed  # without cv, the one bar follows the epochs
