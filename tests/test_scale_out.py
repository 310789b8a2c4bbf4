"""`histo2expr fit`, the data-parallel entry point: one process, or two CPU processes (DDP over gloo).

Every process of a DDP run executes the whole command and trains on its share of each epoch's
batches (``batch_size`` spots per process and step); the processes average their gradients.
The two-process runs use half the batch size so that a step sees the same 64 spots in both.
"""

import os
import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import histo2expr as hx
from histo2expr import cli

#: Largest PCC(ACG) difference allowed between one and two processes for CHRep (see the test).
CHREP_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three synthetic slides with frozen colour-texture features: S1 and S2 are fitted, S3 is held out."""
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=12, n_genes=60)
    hx.pp.normalize(adata)
    hx.tl.embed_patches(adata, encoder="colour_texture", patch_size=32, progress=False, device="cpu")
    path = tmp_path_factory.mktemp("scale_out") / "cohort.h5ad"
    adata.write_h5ad(path)
    held_out = adata[adata.obs["slide"] == "S3"].copy()
    return path, held_out


def fit_command(path, out, method, *options):
    return ["fit", str(path), "--method", method, "--out", str(out), "--slides", "S1,S2", "--genes", "30",
            "--accelerator", "cpu", "--quiet", *options]  # fmt: skip


def fit_in_two_processes(path, out, method, *options):
    """``histo2expr fit --devices 2 --strategy ddp`` as a user runs it: a new process that starts the second."""
    command = [sys.executable, "-m", "histo2expr.cli", *fit_command(path, out, method, *options)]
    command += ["--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Saved") == 1, done.stdout  # only the first process writes the model
    return hx.tl.Histo2ExprModel.load(out)


def fit_in_one_process(path, out, method, *options, capsys):
    assert cli.main(fit_command(path, out, method, *options)) == 0
    assert f"Saved {out}" in capsys.readouterr().out
    return hx.tl.Histo2ExprModel.load(out)


def test_two_processes_train_the_model_of_one(cohort, tmp_path, capsys):
    """ST-Net's loss is a mean over the spots: two processes of 32 spots average to the gradient of one
    process of 64, and the batch order shares each 64-spot batch between them, so the models agree
    up to float rounding."""
    path, held_out = cohort
    options = ("--epochs", "12", "--lr", "0.003")
    one = fit_in_one_process(
        path, tmp_path / "one.pt", "stnet", *options, "--batch-size", "64", capsys=capsys
    )
    two = fit_in_two_processes(path, tmp_path / "two.pt", "stnet", *options, "--batch-size", "32")
    assert one.genes == two.genes
    assert two.method.report.train_loss == pytest.approx(one.method.report.train_loss, rel=1e-4)
    assert two.method.report.best_epoch == one.method.report.best_epoch
    predicted = [
        hx.tl.predict_expression(held_out, model, copy=True).obsm["histo2expr_pred"] for model in (one, two)
    ]
    np.testing.assert_allclose(predicted[1], predicted[0], rtol=1e-4, atol=1e-4)


def test_two_processes_keep_the_quality_of_special_batch_orders(cohort, tmp_path, capsys):
    """CHRep: spatially coherent batches, the estimate as validation metric, two training phases.

    Its correlation, contrastive and topology terms are computed over each process's 32 spots
    rather than over 64, and its neighbourhoods are packed into 32-spot batches, so the models
    differ; the held-out PCC(ACG) must stay within ``CHREP_TOLERANCE`` (measured: 0.004 apart)."""
    path, held_out = cohort
    options = ("--epochs", "6", "--param", "top_k=20")
    one = fit_in_one_process(
        path, tmp_path / "one.pt", "chrep", *options, "--batch-size", "64", capsys=capsys
    )
    two = fit_in_two_processes(path, tmp_path / "two.pt", "chrep", *options, "--batch-size", "32")
    scores = [
        float(hx.tl.evaluate_expression(held_out.copy(), model)["pcc_acg"].iloc[0]) for model in (one, two)
    ]
    assert scores[0] > 0.1
    assert abs(scores[1] - scores[0]) < CHREP_TOLERANCE


def test_fit_command_calibrates_intervals_through_the_api(cohort, tmp_path, capsys):
    path, held_out = cohort
    options = ("--intervals", "constant", "--level", "0.8", "--calibration-folds", "2")
    model = fit_in_one_process(path, tmp_path / "ridge.pt", "ridge", *options, capsys=capsys)
    calibration = model.trust["calibration"]
    assert calibration["kind"] == "constant" and calibration["level"] == 0.8 and calibration["n_slides"] == 2
    predicted = hx.tl.predict_expression(held_out, model, copy=True)
    lower, upper = hx.get.intervals(predicted, "histo2expr_pred")
    assert lower.shape == (held_out.n_obs, 30) and (upper.to_numpy() >= lower.to_numpy()).all()
    argv = fit_command(path, tmp_path / "m.pt", "ridge", "--intervals", "adaptive", "--level", "0")
    assert cli.main(argv) == 2
    assert "`level` must be a probability" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_fit_command_saves_a_model_and_refuses_bad_input(cohort, tmp_path, capsys):
    path, held_out = cohort
    model = fit_in_one_process(path, tmp_path / "ridge.pt", "ridge", capsys=capsys)
    assert model.method.name == "ridge" and len(model.genes) == 30
    assert np.isfinite(hx.tl.predict_expression(held_out, model, copy=True).obsm["histo2expr_pred"]).all(
        axis=None
    )
    capsys.readouterr()  # the prediction's warnings are not the command's
    no_features = ad.read_h5ad(path)
    del no_features.obsm["X_histo"]
    no_features.write_h5ad(tmp_path / "raw.h5ad")
    for argv, message in [
        (
            fit_command(tmp_path / "raw.h5ad", tmp_path / "m.pt", "ridge"),
            r"no frozen features in obsm\['X_histo'\]",
        ),
        (fit_command(path, tmp_path / "m.pt", "magic"), "Unknown method 'magic'"),
        (
            fit_command(path, tmp_path / "m.pt", "stnet", "--param", "hidden=0"),
            "`hidden` must be a positive integer",
        ),
        (fit_command(path, tmp_path / "m.pt", "stnet", "--strategy", "magic"), "strategy"),
        (fit_command(path, tmp_path / "m.pt", "stnet", "--lr", "5"), r"`lr` must be in \(0, 1\]"),
        (fit_command(path, tmp_path, "ridge"), "is a folder; give the model file"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("histo2expr fit: ") and err.count("\n") == 1
        assert re.search(message, err), err
    assert cli.main(fit_command(path, tmp_path / "m.pt", "stnet", "--accelerator", "tpu")) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
