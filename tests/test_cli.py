import functools
import json
import mmap
import re
import time

import numpy as np
import pytest

from histo2expr import cli, datasets
from histo2expr._benchmark import PeakMemory

FAST = ["--encoder", "colour_texture", "--patch-size", "64", "--epochs", "2", "--quiet"]


def read_results(folder, protocol="leave_one_slide_out"):
    """The methods of one protocol in results.json, and results.md."""
    results = json.loads((folder / "results.json").read_text())
    return {**results, "methods": results["cross_validation"][protocol]["methods"]}, (
        folder / "results.md"
    ).read_text()


def test_demo_compares_methods_and_writes_report_and_figures(tmp_path, capsys):
    argv = [
        "demo",
        "--n-slides",
        "2",
        "--genes",
        "40",
        "--methods",
        "ridge,bleep",
        *FAST,
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results, markdown = read_results(tmp_path)
    assert markdown.strip() in printed  # the report is exactly what was printed
    assert list(results["methods"]) == ["ridge", "bleep"]
    ridge = results["methods"]["ridge"]
    assert [row["slide"] for row in ridge["per_slide"]] == ["S1", "S2"]
    assert ridge["mean"]["pcc_acg"] == pytest.approx(np.mean([r["pcc_acg"] for r in ridge["per_slide"]]))
    assert ridge["mean"]["pcc_acg"] > 0.2
    assert ridge["seconds"] > 0 and ridge["peak_memory_mib"] > 0
    assert f"{ridge['mean']['pcc_acg']:.3f}" in markdown
    assert results["settings"]["command"].startswith("histo2expr demo --n-slides 2")
    assert results["settings"]["embedding"] == {  # embed_patches' defaults
        "tta": 4,
        "context": None,
        "neighbours": 6,
        "stain_normalization": None,
    }
    assert "averaged over 4 views of each patch, then the mean of the 6 nearest spots" in markdown
    for figure in ("gene_pcc_boxplot.png", "heg_curve.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert str(tmp_path / figure) in printed


def test_demo_refuses_a_single_slide(capsys):
    assert cli.main(["demo", "--n-slides", "1"]) == 2
    assert "at least two slides" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cohort_h5ad(tmp_path_factory):
    adata = datasets.synthetic(n_slides=3, seed=1, spots_per_side=10)
    path = tmp_path_factory.mktemp("cohort") / "cohort.h5ad"
    adata.write_h5ad(path)
    return path


def test_benchmark_reads_h5ad_keeps_chosen_slides_and_writes_results(cohort_h5ad, tmp_path, capsys):
    argv = [
        "benchmark",
        "--data",
        str(cohort_h5ad),
        "--slides",
        "S1,S3",
        "--methods",
        "ridge",
        "--genes",
        "30",
        "--tta",
        "1",
        "--neighbours",
        "0",
    ]
    assert cli.main([*argv, *FAST, "--out", str(tmp_path)]) == 0
    results, markdown = read_results(tmp_path)
    assert results["settings"]["slides"] == ["S1", "S3"] and results["settings"]["reader"] == "auto"
    assert results["settings"]["backend"] == "torch"  # what ran the encoder, with "auto" resolved
    assert (
        results["settings"]["embedding"]
        == {"tta": 1, "context": None, "neighbours": None, "stain_normalization": None}
        and "Features: one view of each patch;" in markdown
    )
    assert [row["slide"] for row in results["methods"]["ridge"]["per_slide"]] == ["S1", "S3"]
    assert results["machine"]["cpu_cores"] >= 1
    assert "| ridge" in markdown and "S3" in markdown
    assert "seconds" in markdown and "peak MiB" in markdown


def test_benchmark_leave_one_patient_out_holds_out_whole_patients(cohort_h5ad, tmp_path):
    argv = ["benchmark", "--data", str(cohort_h5ad), "--cv", "leave_one_patient_out", "--methods", "ridge"]
    assert cli.main([*argv, "--genes", "30", *FAST, "--out", str(tmp_path)]) == 0
    results, _ = read_results(tmp_path, "leave_one_patient_out")
    assert list(results["cross_validation"]) == ["leave_one_patient_out"]
    rows = results["methods"]["ridge"]["per_slide"]
    assert {row["slide"] for row in rows} == {"S1", "S2", "S3"}
    folds = {row["slide"]: row["fold"] for row in rows}
    assert folds["S1"] == folds["S2"] != folds["S3"]  # the synthetic cohort pairs S1 and S2 in one patient


def test_benchmark_reports_both_protocols_when_patients_repeat(cohort_h5ad, tmp_path, capsys):
    argv = ["benchmark", "--data", str(cohort_h5ad), "--methods", "ridge", "--genes", "30", *FAST]
    with pytest.warns(UserWarning, match=r"share their patient.*leave_one_patient_out"):
        assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    results, markdown = read_results(tmp_path)
    assert list(results["cross_validation"]) == ["leave_one_slide_out", "leave_one_patient_out"]
    assert results["settings"]["cv"] == "auto"
    assert results["settings"]["cv_schemes"] == list(results["cross_validation"])
    lopo = results["cross_validation"]["leave_one_patient_out"]["methods"]["ridge"]["per_slide"]
    assert len({row["fold"] for row in lopo}) == 2  # patients P1 (S1, S2) and P2 (S3)
    assert "Patients repeat: P1 (2 slides)" in markdown
    assert "## leave-one-slide-out: mean over held-out slides" in markdown
    assert "## leave-one-patient-out: mean over held-out slides" in markdown
    for protocol in results["cross_validation"]:
        assert (tmp_path / protocol / "heg_curve.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slides", "S1,S9"], "--slides S9 not found"),
        (["--slides", "S1"], "needs at least two"),
        (["--regime", "end2end", "--methods", "ridge"], "drop it from --methods"),
        (["--methods", "ridge,nonsense"], "Unknown method 'nonsense'"),
    ],
)
def test_benchmark_bad_input_is_one_clear_line(cohort_h5ad, tmp_path, capsys, extra, message):
    argv = ["benchmark", "--data", str(cohort_h5ad), *extra, *FAST, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_benchmark_with_intervals_reports_coverage_per_held_out_slide(cohort_h5ad, tmp_path):
    argv = ["benchmark", "--data", str(cohort_h5ad), "--cv", "leave_one_slide_out", "--methods", "ridge",
            "--genes", "20", "--intervals", "constant", "--level", "0.8", "--calibration-folds", "2",
            "--interval-calibration", "per_slide"]  # fmt: skip
    assert cli.main([*argv, *FAST, "--out", str(tmp_path)]) == 0
    results, markdown = read_results(tmp_path)
    assert results["settings"]["intervals"] == {
        "intervals": "constant",
        "level": 0.8,
        "calibration_folds": 2,
        "interval_calibration": "per_slide",
    }
    rows = results["methods"]["ridge"]["per_slide"]
    assert len(rows) == 3 and all(0 <= row["coverage"] <= 1 and row["interval_width"] > 0 for row in rows)
    assert "## prediction intervals per held-out slide" in markdown
    worst = min(row["coverage"] for row in rows)
    assert re.search(rf"\| worst slide +\| +{worst:.3f} +\| +\|", markdown), markdown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--intervals", "adaptive", "--level", "1.5"],
            "`level` must be a probability strictly between 0 and 1",
        ),
        (
            ["--intervals", "adaptive", "--calibration-folds", "9"],
            "`calibration_folds` must be an integer between 2",
        ),
        (["--level", "0.8"], "--level sets the intervals; add --intervals adaptive"),
        (["--intervals", "wide"], "invalid choice: 'wide'"),
        (["--interval-calibration", "per_slide"], "--interval-calibration sets the intervals"),
        (["--context", "20"], "--context: must be a number from 1 to 8"),
        (["--stain-normalization", "reinhard"], "invalid choice: 'reinhard'"),
        (["--views", "4"], "--views sets the adapted regime; add --regime adapted"),
        (["--trainable-blocks", "2", "--stain-copies", "1"], "--stain-copies set the adapted regime"),
        (["--regime", "adapted", "--views", "3"], "argument --views: invalid choice: 3"),
        (["--regime", "adapted", "--trainable-blocks", "7"], "must be smaller than the 7 stages"),
        (["--regime", "adapted", "--encoder", "colour_texture"], "cuts an EfficientNet-like backbone"),
        (["--regime", "adapted", "--methods", "ridge"], "supports the ('frozen',) regime(s)"),
        (["--quiet", "--verbosity", "info"], "argument --verbosity: not allowed with argument --quiet"),
        (["--verbosity", "loud"], "argument --verbosity: invalid choice: 'loud'"),
    ],
)
def test_interval_and_feature_options_are_checked_before_any_work(tmp_path, capsys, extra, message):
    argv = ["benchmark", "--data", str(tmp_path / "nowhere"), *extra, "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2  # refused for the option, before the missing data is read
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_benchmark_refuses_a_missing_path(tmp_path, capsys):
    assert cli.main(["benchmark", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as before:
        pass
    with PeakMemory() as during:
        # a fresh 64 MiB mapping, every page touched and held for several samples: memory the
        # allocator kept from earlier tests cannot stand in for it, as it could for np.ones
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * len(block))
        time.sleep(0.2)
        block.close()
    assert during.peak_mib >= before.peak_mib + 48


def test_benchmark_on_two_her2st_sections(her2st_path, tmp_path, capsys):
    argv = [
        "benchmark",
        "--data",
        str(her2st_path),
        "--slides",
        "B4,C3",
        "--methods",
        "ridge",
        "--genes",
        "50",
    ]
    assert cli.main([*argv, *FAST, "--out", str(tmp_path)]) == 0
    results, markdown = read_results(tmp_path)
    assert results["settings"]["reader"] == "auto" and results["settings"]["slides"] == ["B4", "C3"]
    rows = results["methods"]["ridge"]["per_slide"]
    assert [row["slide"] for row in rows] == ["B4", "C3"]
    assert all(np.isfinite(row["pcc_acg"]) and row["n_genes"] == 50 for row in rows)
    assert markdown.strip() in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "histo2expr" in capsys.readouterr().out


def test_benchmark_embeds_tokens_for_methods_that_take_them(cohort_h5ad, tmp_path, recwarn):
    argv = [
        "benchmark",
        "--data",
        str(cohort_h5ad),
        "--methods",
        "cmrcnet",
        "--genes",
        "20",
        "--patch-size",
        "64",
    ]
    assert cli.main([*argv, "--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    assert not [w for w in recwarn if "single token" in str(w.message)]
    results, _ = read_results(tmp_path)
    assert np.isfinite(results["methods"]["cmrcnet"]["mean"]["pcc_acg"])


def test_fit_and_benchmark_run_the_adapted_regime_with_its_options(
    cohort_h5ad, tmp_path, capsys, monkeypatch
):
    import histo2expr as hx

    base = ["--genes", "10", "--epochs", "1", "--patch-size", "32", "--regime", "adapted"]
    fit = [
        "fit",
        str(cohort_h5ad),
        "--method",
        "stnet",
        *base,
        "--param",
        "weights=None",
        "--accelerator",
        "cpu",
        "--quiet",
    ]
    assert cli.main([*fit, "--out", str(tmp_path / "m.pt")]) == 2  # the file has no frozen features
    assert "--use-rep none for the adapted features alone" in capsys.readouterr().err
    argv = [*fit, "--slides", "S1,S2", "--use-rep", "none", "--views", "4", "--stain-copies", "1", "--out",
            str(tmp_path / "m.pt")]  # fmt: skip
    assert cli.main(argv) == 0
    model = hx.tl.Histo2ExprModel.load(tmp_path / "m.pt")
    assert model.regime == "adapted" and model.use_rep is None
    assert model.params["trainable_blocks"] == 1
    assert (model.params["views"]["dihedral"], model.params["views"]["stain_copies"]) == (4, 1)

    calls = []

    @functools.wraps(hx.tl.fit_histo2expr)
    def fit_histo2expr(*args, **kwargs):
        calls.append(kwargs)
        return fit_histo2expr.__wrapped__(*args, **kwargs)

    monkeypatch.setattr(hx.tl, "fit_histo2expr", fit_histo2expr)
    argv = ["benchmark", "--data", str(cohort_h5ad), "--slides", "S1,S2", "--methods", "stnet", *base, "--views",
            "1", "--cv", "leave_one_slide_out", "--tta", "1", "--quiet", "--out", str(tmp_path / "b")]  # fmt: skip
    assert cli.main(argv) == 0
    assert [(kw["regime"], kw["trainable_blocks"], kw["views"], kw["stain_copies"]) for kw in calls] == [
        ("adapted", 1, 1, 0)
    ]
    assert calls[0]["patch_size"] == 32 and calls[0].get("use_rep", "X_histo") == "X_histo"
    results, markdown = read_results(tmp_path / "b")
    assert results["settings"]["adapted"] == {"trainable_blocks": 1, "views": 1, "stain_copies": 0}
    assert "Adapted regime: each method trains the encoder's top 1 stage on cached activations" in markdown
    assert "next to the frozen features' neighbours block(s)" in markdown
    assert np.isfinite(results["methods"]["stnet"]["mean"]["pcc_acg"])


def test_verbosity_and_quiet_set_what_the_commands_log(cohort_h5ad, tmp_path, histo2expr_log):
    import histo2expr as hx

    argv = ["benchmark", "--data", str(cohort_h5ad), "--methods", "ridge", "--genes", "10", "--tta", "1",
            "--neighbours", "0", "--encoder", "colour_texture", "--patch-size", "32", "--cv", "leave_one_slide_out",
            "--jobs", "1", "--out", str(tmp_path)]  # fmt: skip
    for flags, shown in (
        (["--quiet"], False),
        (["--verbosity", "info"], True),
        (["--verbosity", "error"], False),
    ):
        histo2expr_log.clear()
        assert cli.main([*argv, *flags]) == 0
        messages = [record.getMessage() for record in histo2expr_log.records]
        assert any(m.startswith("fitting ridge (frozen)") for m in messages) is shown, (flags, messages)
        assert hx.settings.verbosity.name == "info"  # the command's verbosity ends with it
