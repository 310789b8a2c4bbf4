"""Cohort embedding and prediction: one output per slide, sharded over processes, resumable, atomic.

The two-process tests run ``histo2expr embed`` as a user does (Lightning starts the second process by
running the command again); the others call the API in this process (one device).
"""

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import histo2expr as hx
from histo2expr import cli

#: A small frozen embedding: random EfficientNet-Lite0 weights from the seed, 64 px patches.
EMBED_OPTIONS = ("--encoder", "efficientnet_lite0", "--weights", "random", "--patch-size", "64")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four synthetic slides, each in its own .h5ad file (S1..S4), and the cohort in one file."""
    folder = tmp_path_factory.mktemp("cohort")
    adata = hx.datasets.synthetic(n_slides=4, seed=0, spots_per_side=10, n_genes=40)
    hx.pp.normalize(adata)
    files = []
    for slide in ("S1", "S2", "S3", "S4"):
        part = adata[adata.obs["slide"] == slide].copy()
        part.uns["spatial"] = {slide: adata.uns["spatial"][slide]}
        part.write_h5ad(folder / f"{slide}.h5ad")
        files.append(folder / f"{slide}.h5ad")
    adata.write_h5ad(folder / "all.h5ad")
    return folder, files, adata


def run_two_processes(inputs, out, *, interrupt_after=None):
    """``histo2expr embed --accelerator cpu --devices 2`` in a new session; killed once ``interrupt_after`` outputs exist."""
    command = [sys.executable, "-m", "histo2expr.cli", "embed", *map(str, inputs), "--out", str(out),
               *EMBED_OPTIONS, "--accelerator", "cpu", "--devices", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if interrupt_after is None:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return stdout
    deadline = time.monotonic() + 600
    while len(list(Path(out).glob("S*.h5ad"))) < interrupt_after:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # (a run that already ended is caught by the caller)
        os.killpg(process.pid, signal.SIGKILL)  # both processes, mid-slide: a crash
    process.communicate()
    return None


#: The progress lines of a slide written, and of one skipped.
WRITTEN = r"histo2expr embed: (\S+) \(\d+/\d+, process \d/2\): \d+ spots in "
SKIPPED = r"histo2expr embed: (\S+): done before"


def read_outputs(folder):
    return {path.name: ad.read_h5ad(path) for path in sorted(Path(folder).glob("*.h5ad"))}


def test_two_processes_interrupted_and_resumed_write_what_an_uninterrupted_run_writes(cohort, tmp_path):
    _, files, _ = cohort
    whole = run_two_processes(files, tmp_path / "whole")
    assert sorted(re.findall(WRITTEN, whole)) == ["S1", "S2", "S3", "S4"]
    assert set(re.findall(r"process (\d)/2\)", whole)) == {"1", "2"}  # both processes embedded slides

    run_two_processes(files, tmp_path / "resumed", interrupt_after=2)
    finished = sorted(p.stem for p in (tmp_path / "resumed").glob("S*.h5ad"))
    assert 2 <= len(finished) < 4, finished  # stopped with slides left to do
    resumed = run_two_processes(files, tmp_path / "resumed")
    assert sorted(re.findall(SKIPPED, resumed)) == finished
    assert sorted(re.findall(WRITTEN, resumed)) == sorted({"S1", "S2", "S3", "S4"} - set(finished))
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".")]  # no temporary left

    expected, got = read_outputs(tmp_path / "whole"), read_outputs(tmp_path / "resumed")
    assert list(got) == list(expected) == ["S1.h5ad", "S2.h5ad", "S3.h5ad", "S4.h5ad"]
    for name, table in expected.items():
        np.testing.assert_array_equal(got[name].obsm["X_histo"], table.obsm["X_histo"])
        assert got[name].obs.equals(table.obs)
        assert got[name].uns["histo2expr_cohort"] == table.uns["histo2expr_cohort"]


def api_embed(inputs, out, **options):
    return hx.tl.embed_cohort(
        inputs, out, encoder="colour_texture", patch_size=32, accelerator="cpu", progress=False, **options
    )


def test_embed_cohort_writes_one_output_per_slide_with_provenance(cohort, tmp_path, capsys, histo2expr_log):
    folder, files, adata = cohort
    table = hx.tl.embed_cohort(
        [files[0], str(folder / "S2.h5ad")],
        tmp_path,
        encoder="colour_texture",
        patch_size=32,
        accelerator="cpu",
    )
    assert list(table["slide"]) == ["S1", "S2"] and list(table["status"]) == ["written", "written"]
    lines = capsys.readouterr().out.splitlines()
    n_spots = int((adata.obs["slide"] == "S1").sum())
    assert len(lines) == 3 and lines[0].startswith(f"histo2expr embed: S1 (1/2): {n_spots} spots in ")
    assert lines[2].startswith("histo2expr embed: 2 slides: 2 written, 0 skipped, 0 failed, in ")
    logged = [record.getMessage() for record in histo2expr_log.records]  # the calls per slide: from "hint" on
    assert logged[0] == f"embed a cohort of 2 slides into {tmp_path}" and len(logged) == 2
    assert re.fullmatch(r"    finished \(0:\d\d:\d\d\)", logged[1])
    one = ad.read_h5ad(tmp_path / "S1.h5ad")
    direct = adata[adata.obs["slide"] == "S1"].copy()
    hx.tl.embed_patches(direct, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
    np.testing.assert_array_equal(one.obsm["X_histo"], direct.obsm["X_histo"])
    record = one.uns["histo2expr_cohort"]
    assert record["step"] == "embed" and record["slide"] == "S1" and record["input"] == str(files[0])
    assert record["histo2expr_version"] == hx.__version__
    assert record["encoder"]["weights_sha1"] == direct.uns["X_histo"]["encoder"]["weights_sha1"]
    assert json.loads(record["parameters"])["patch_size"] == 32

    again = api_embed(files[:2], tmp_path)
    assert list(again["status"]) == ["skipped", "skipped"]
    with pytest.raises(
        ValueError, match=r"S1.h5ad exists but was not written by `embed` with these parameters"
    ):
        api_embed(files[:2], tmp_path, key_added="X_other")
    redone = api_embed(files[:2], tmp_path, key_added="X_other", overwrite=True)
    assert list(redone["status"]) == ["written", "written"]
    assert "X_other" in ad.read_h5ad(tmp_path / "S2.h5ad").obsm


def test_cohort_inputs_a_glob_a_file_of_several_slides_and_a_whole_slide_image(cohort, tmp_path):
    folder, _, adata = cohort
    table = api_embed(str(folder / "S[12].h5ad"), tmp_path / "glob")
    assert list(table["slide"]) == ["S1", "S2"]
    several = api_embed(folder / "all.h5ad", tmp_path / "all")
    assert list(several["slide"]) == ["S1", "S2", "S3", "S4"] and list(several["n_spots"]) == list(
        adata.obs["slide"].value_counts().sort_index()
    )
    s3 = ad.read_h5ad(tmp_path / "all" / "S3.h5ad")
    assert set(s3.obs["slide"]) == {"S3"} and list(s3.uns["spatial"]) == ["S3"]
    image = Path(adata.uns["spatial"]["S1"]["metadata"]["source_image_path"])
    wsi = api_embed(image, tmp_path / "wsi", spot_diameter_um=55, spacing_um=100, slide_mpp=1.0)
    tiles = ad.read_h5ad(tmp_path / "wsi" / "S1.h5ad")
    assert wsi["n_spots"].iloc[0] == tiles.n_obs > 0 and tiles.obsm["X_histo"].shape == (tiles.n_obs, 52)


def test_a_failing_slide_leaves_no_output_and_the_others_are_written(cohort, tmp_path, monkeypatch):
    _, files, _ = cohort
    real_write = ad.AnnData.write_h5ad

    def write_half_then_fail(self, path, *args, **kwargs):
        real_write(self, path, *args, **kwargs)
        if self.obs["slide"].iloc[0] == "S2":
            raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_half_then_fail)
    with pytest.raises(
        RuntimeError, match=r"1 of 3 slides failed: S2 \(OSError: disk full\).*run the same command again"
    ):
        api_embed(files[:3], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.h5ad", "S3.h5ad"]  # no S2, no temporary file
    monkeypatch.undo()
    table = api_embed(files[:3], tmp_path)
    assert list(table["status"]) == ["skipped", "written", "skipped"]


def test_predict_cohort_embeds_with_the_models_encoder_and_predicts_like_predict_expression(cohort, tmp_path):
    _folder, files, adata = cohort
    train = adata[adata.obs["slide"].isin(["S1", "S2"])].copy()
    hx.tl.embed_patches(train, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
    model = hx.tl.fit_histo2expr(train, method="ridge", genes=20, progress=False)
    model.save(tmp_path / "ridge.pt")
    embedded = api_embed(files[2:3], tmp_path / "embedded")
    assert list(embedded["status"]) == ["written"]
    inputs = [tmp_path / "embedded" / "S3.h5ad", files[3]]  # embedded already, and raw (embedded here)
    table = hx.tl.predict_cohort(
        inputs, tmp_path / "ridge.pt", tmp_path / "predicted", accelerator="cpu", progress=False
    )
    assert list(table["status"]) == ["written", "written"]
    for slide in ("S3", "S4"):
        out = ad.read_h5ad(tmp_path / "predicted" / f"{slide}.h5ad")
        direct = adata[adata.obs["slide"] == slide].copy()
        hx.tl.embed_patches(direct, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
        hx.tl.predict_expression(direct, model)
        np.testing.assert_allclose(
            hx.get.predictions(out).to_numpy(), hx.get.predictions(direct).to_numpy(), rtol=1e-6
        )
        record = out.uns["histo2expr_cohort"]
        assert record["step"] == "predict" and record["model"]["method"] == "ridge"
        assert len(record["model"]["sha256"]) == 64 and record["encoder"]["name"] == "colour_texture"
    from spatialdata import read_zarr

    from_object = hx.tl.predict_cohort(
        files[3], model, tmp_path / "object", format="zarr", accelerator="cpu", progress=False
    )
    assert list(from_object["status"]) == ["written"] and model.device.type == "cpu"
    table = read_zarr(tmp_path / "object" / "S4.zarr").tables["table"]
    np.testing.assert_allclose(
        hx.get.predictions(table).to_numpy(),
        hx.get.predictions(ad.read_h5ad(tmp_path / "predicted" / "S4.h5ad")).to_numpy(),
        rtol=1e-6,
    )
    assert "path" not in table.uns["histo2expr_cohort"]["model"]


def test_embed_cohort_takes_the_feature_options_of_embed_patches_and_records_them(cohort, tmp_path):
    import inspect

    _, files, adata = cohort
    ours, theirs = (inspect.signature(f).parameters for f in (hx.tl.embed_cohort, hx.tl.embed_patches))
    for option in ("tta", "context", "neighbours", "stain_normalization"):
        assert ours[option].default == theirs[option].default
    options = {"tta": 1, "context": 2.0, "neighbours": None, "stain_normalization": "macenko"}
    api_embed(files[:1], tmp_path, **options)
    out = ad.read_h5ad(tmp_path / "S1.h5ad")
    direct = adata[adata.obs["slide"] == "S1"].copy()
    hx.tl.embed_patches(
        direct, encoder="colour_texture", patch_size=32, progress=False, device="cpu", **options
    )
    np.testing.assert_array_equal(out.obsm["X_histo"], direct.obsm["X_histo"])
    parameters = json.loads(out.uns["histo2expr_cohort"]["parameters"])
    assert {option: parameters[option] for option in options} == options
    with pytest.raises(
        ValueError, match=r"S1.h5ad exists but was not written by `embed` with these parameters"
    ):
        api_embed(files[:1], tmp_path)  # embed_patches' defaults: 4 views, 6 neighbours


def test_predict_cohort_refuses_inputs_embedded_unlike_the_models_slides_before_any_work(cohort, tmp_path):
    _, files, adata = cohort
    train = adata[adata.obs["slide"].isin(["S1", "S2"])].copy()
    hx.tl.embed_patches(
        train, encoder="colour_texture", patch_size=32, tta=1, neighbours=None, progress=False, device="cpu"
    )
    model = hx.tl.fit_histo2expr(train, method="ridge", genes=10, progress=False)
    api_embed(files[2:3], tmp_path / "default")  # embed_patches' defaults: 4 views, 6 neighbours
    call = "hx.tl.embed_cohort(slides, out_dir, encoder='colour_texture', patch_size=32, mpp=1, tta=1, neighbours=None, key_added='X_histo')"
    with pytest.raises(
        ValueError,
        match=r"S3.h5ad: The features were embedded with `tta=4` but the model was trained on features embedded "
        rf"with `tta=1`\. Re-embed with `{re.escape(call)}` \(`histo2expr embed` takes the same options\), or give "
        "predict_cohort the slide images",
    ):
        hx.tl.predict_cohort(
            [files[3], tmp_path / "default" / "S3.h5ad"],
            model,
            tmp_path / "p",
            accelerator="cpu",
            progress=False,
        )
    assert not (tmp_path / "p").exists()
    table = hx.tl.predict_cohort(files[3], model, tmp_path / "p", accelerator="cpu", progress=False)
    assert list(table["status"]) == ["written"]  # a slide file is embedded as the model's slides were
    parameters = json.loads(ad.read_h5ad(tmp_path / "p" / "S4.h5ad").uns["histo2expr_cohort"]["parameters"])
    assert parameters["features"]["tta"] == 1 and parameters["features"]["neighbours"] is None


def test_zarr_outputs_are_spatialdata(cohort, tmp_path):
    from spatialdata import read_zarr

    _, files, _ = cohort
    api_embed(files[:1], tmp_path, format="zarr")
    sdata = read_zarr(tmp_path / "S1.zarr")
    assert "S1_image" in sdata.images and "S1_spots" in sdata.shapes
    assert sdata.tables["table"].obsm["X_histo"].shape == (ad.read_h5ad(files[0]).n_obs, 52)
    assert list(api_embed(files[:1], tmp_path, format="zarr")["status"]) == ["skipped"]
    assert list(api_embed(files[:1], tmp_path, format="zarr", overwrite=True)["status"]) == ["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.zarr"]


@pytest.mark.parametrize(
    ("inputs", "options", "error", "message"),
    [
        (["missing.h5ad"], {}, FileNotFoundError, "missing.h5ad does not exist"),
        (["nothing*.svs"], {}, FileNotFoundError, "matches no file"),
        ([], {}, ValueError, "No slides given"),
        (["S1.h5ad", "all.h5ad"], {}, ValueError, "Two inputs hold slide 'S1'"),
        (["S1.h5ad"], {"format": "loom"}, ValueError, "`format` must be one of"),
        (["S1.h5ad"], {"batch_size": 0}, ValueError, "batch_size"),
        (["."], {}, ValueError, "no Space Ranger output"),
        (["S1.h5ad"], {"weights": "missing.pt"}, FileNotFoundError, "is no file"),
        (["S1.h5ad"], {"tokens": 0}, ValueError, "tokens"),
        (["S1.h5ad"], {"backend": "fast"}, ValueError, "`backend` must be one of"),
        (["S1.h5ad"], {"tta": 2}, ValueError, "`tta` must be the number of views"),
        (["S1.h5ad"], {"neighbours": 0}, ValueError, "`neighbours` must be None or a positive integer"),
        (["S1.h5ad"], {"context": 20}, ValueError, "`field=20` is out of range"),
        (
            ["S1.h5ad"],
            {"stain_normalization": "reinhard"},
            ValueError,
            "`stain_normalization` must be one of",
        ),
    ],
)
def test_embed_cohort_refuses_bad_input(cohort, tmp_path, monkeypatch, inputs, options, error, message):
    folder, _, _ = cohort
    monkeypatch.chdir(folder)
    with pytest.raises(error, match=message):
        api_embed(inputs, tmp_path, **options)
    assert not list(tmp_path.iterdir())


def test_embed_and_predict_commands(cohort, tmp_path, capsys):
    _folder, files, adata = cohort
    argv = ["embed", str(files[0]), "--out", str(tmp_path / "e"), "--encoder", "colour_texture", "--patch-size", "32",
            "--accelerator", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "histo2expr embed: S1 (1/1): " in out and "1 slides: 1 written, 0 skipped, 0 failed" in out
    train = adata[adata.obs["slide"].isin(["S2", "S3"])].copy()
    hx.tl.embed_patches(train, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
    hx.tl.fit_histo2expr(train, method="ridge", genes=10, progress=False).save(tmp_path / "m.pt")
    argv = ["predict", str(tmp_path / "e" / "S1.h5ad"), "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "p"),
            "--accelerator", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    assert hx.get.predictions(ad.read_h5ad(tmp_path / "p" / "S1.h5ad")).shape == (
        ad.read_h5ad(files[0]).n_obs,
        10,
    )
    capsys.readouterr()  # what the calls above logged
    assert cli.main([*argv[:-1], "--scale", "magic"]) == 2
    assert capsys.readouterr().err.startswith("histo2expr")
    (tmp_path / "broken.tif").write_bytes(b"not an image")
    argv = ["embed", str(files[0]), str(tmp_path / "broken.tif"), "--out", str(tmp_path / "e"), "--encoder",
            "colour_texture", "--patch-size", "32", "--accelerator", "cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 1  # S1 skipped, broken failed
    err = capsys.readouterr().err
    assert err.startswith("histo2expr: 1 of 2 slides failed: broken (") and err.count("\n") == 1
    argv = ["embed", str(files[1]), "--out", str(tmp_path / "views"), "--encoder", "colour_texture", "--patch-size",
            "32", "--accelerator", "cpu", "--quiet", "--tta", "1", "--neighbours", "0", "--context", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    parameters = json.loads(
        ad.read_h5ad(tmp_path / "views" / "S2.h5ad").uns["histo2expr_cohort"]["parameters"]
    )
    assert (parameters["tta"], parameters["neighbours"], parameters["context"]) == (1, None, 2.0)
    assert cli.main([*argv[:-2], "--context", "20"]) == 2
    assert "--context: must be a number from 1 to 8" in capsys.readouterr().err
    argv = ["predict", str(files[0]), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "No model file" in capsys.readouterr().err


def test_embed_command_takes_the_backend_and_the_verbosity(cohort, tmp_path, capsys, monkeypatch):
    _folder, files, _ = cohort
    argv = ["embed", str(files[0]), "--out", str(tmp_path), "--encoder", "colour_texture", "--patch-size", "32",
            "--accelerator", "cpu"]  # fmt: skip
    assert cli.main([*argv, "--backend", "torch", "--verbosity", "warning"]) == 0
    assert capsys.readouterr().out == ""  # the lines per slide show from verbosity info on
    written = ad.read_h5ad(tmp_path / "S1.h5ad")
    assert written.uns["X_histo"]["backend"] == "torch"  # what ran, as embed_patches records it
    assert json.loads(written.uns["histo2expr_cohort"]["run"])["backend"] == "torch"  # what was asked
    assert cli.main(argv) == 0  # another backend resumes the run: the backend is not compared
    assert "done before" in capsys.readouterr().out
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "histo2expr.models.backends.find_spec",
        lambda name: None if name == "onnxruntime" else find_spec(name),
    )
    assert cli.main([*argv[:3], str(tmp_path / "onnx"), *argv[4:], "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "backend='onnx' needs the packages onnxruntime" in err and err.count("\n") == 1
    assert not list((tmp_path / "onnx").glob("*.h5ad"))  # refused before the first slide
