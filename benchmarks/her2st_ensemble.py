"""her2st, leave-one-slide-out: ensembles of NH2ST and CMRCNet (``ensemble=K``) against single fits and the baselines.

Reads the rows that two other scripts cache (every row is one ``hx.tl.fit_histo2expr(...,
cv="leave_one_slide_out", genes=250, seed=...)`` on the default frozen features ``f1:4+nbr6``) and
writes benchmarks/results/her2st_ensemble.md. The rows are made by:

    python benchmarks/her2st_nh2st_stability.py run --variants ensemble3 --seeds 0,1,2 --noise 0,1e-5
    python benchmarks/her2st_features.py run --settings f1:4+nbr6 --methods cmrcnet --seeds 0,1,2 \\
        --params '{"ensemble": 3}' --label "cmrcnet (ensemble 3)"
    python benchmarks/her2st_features.py run --settings f1:4+nbr6 --methods cmrcnet --seeds 0,1,2 \\
        --params '{"patience": 10}' --label "cmrcnet (patience 10)"

(both at patience 10, the default of every method when they ran).
    python benchmarks/her2st_ensemble.py report

``report`` replaces the generated part of the results file; the sections written by hand below
it (from the first heading that says so) are kept. NH2ST's single fits and the baselines are the
rows of ``her2st_nh2st_stability.py`` (variants ``nh2st: mse``, its default recipe, and
``baselines``), run on the same features, folds and genes.
"""

from __future__ import annotations

import argparse
import platform

import pandas as pd
import torch
from _her2st import mean_and_sd, read_rows, run_step, save_results, steps_parser
from her2st_features import ROWS as FEATURE_ROWS
from her2st_nh2st_stability import ROWS as STABILITY_ROWS

SETTING = "f1:4+nbr6"
#: Rows of the stability script by variant, and how this report names them.
STABILITY = {
    "nh2st: mse": "nh2st (K=1, default before)",
    "nh2st: ensemble 3": "nh2st (ensemble=3)",
    "ridge": "ridge",
    "bleep": "bleep",
    "stnet": "stnet",
}
#: Rows of the features script by label.
FEATURES = {"cmrcnet (patience 10)": "cmrcnet (K=1)", "cmrcnet (ensemble 3)": "cmrcnet (ensemble=3)"}


def rows() -> pd.DataFrame:
    """One row per (method, noise, seed, slide), with the run's CPU seconds and the epochs kept."""
    records = []
    for row in read_rows(STABILITY_ROWS):
        if row["variant"] in STABILITY:
            records += [
                {"method": STABILITY[row["variant"]], "noise": row["noise"], "seed": row["seed"],
                 "cpu_seconds": row.get("cpu_seconds"), "best_epochs": row.get("best_epochs"), **slide}
                for slide in row["per_slide"]
            ]  # fmt: skip
    for row in read_rows(FEATURE_ROWS):
        if row["setting"] == SETTING and row["method"] in FEATURES:
            records += [
                {"method": FEATURES[row["method"]], "noise": 0.0, "seed": row["seed"],
                 "cpu_seconds": row.get("cpu_seconds"), "best_epochs": None, **slide}
                for slide in row["per_slide"]
            ]  # fmt: skip
    return pd.DataFrame(records)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per method (no noise): PCC(ACG), PCC(HEG@50) and B4 as mean ± sd over seeds, and CPU seconds per run."""
    clean = table[table["noise"] == 0]
    per_seed = clean.groupby(["method", "seed"]).agg(
        acg=("pcc_acg", "mean"), heg=("pcc_heg50", "mean"), cpu=("cpu_seconds", "first")
    )
    per_seed["B4"] = clean[clean["slide"] == "B4"].set_index(["method", "seed"])["pcc_acg"]

    grouped = per_seed.groupby("method")
    return pd.DataFrame(
        {
            "seeds": grouped.size(),
            "PCC(ACG)": grouped["acg"].agg(mean_and_sd),
            "PCC(HEG@50)": grouped["heg"].agg(mean_and_sd),
            "B4 PCC(ACG)": grouped["B4"].agg(mean_and_sd),
            "CPU s per run": grouped["cpu"].mean().round(0),
        }
    )


def stability(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed: the LOSO mean with features perturbed at 1e-5 minus without."""
    per_seed = table.groupby(["method", "noise", "seed"])["pcc_acg"].mean().unstack("noise")
    moved = per_seed.dropna()
    return pd.DataFrame(
        {"clean": moved[0.0], "noise 1e-5": moved[1e-5], "move": moved[1e-5] - moved[0.0]}
    ).round(4)


def report(args: argparse.Namespace) -> None:
    """Write benchmarks/results/her2st_ensemble.md from the cached rows."""
    table = rows()
    wide = table.pivot_table(index=["method", "noise", "seed"], columns="slide", values="pcc_acg")
    epochs = table.drop_duplicates(["method", "noise", "seed"]).set_index(["method", "noise", "seed"])
    lines = [
        "# her2st, leave-one-slide-out: ensembles (`ensemble=K`) of NH2ST and CMRCNet",
        "",
        f"Command: see `benchmarks/her2st_ensemble.py` (its docstring lists the runs). Machine: {platform.machine()}, "
        "2 cores shared with other jobs (load 3-4), no GPU, torch "
        f"{torch.__version__}, one torch thread per process (`OMP_NUM_THREADS=1`). Data: 1193 spots, 6 sections, 250 "
        "highly expressed genes chosen on the training slides of each fold, features `f1:4+nbr6` (frozen ImageNet "
        "EfficientNet-Lite0, four quarter turns averaged, then the mean of the six nearest spots: "
        "`hx.tl.embed_patches`' defaults). Same folds and genes in every row; a seed changes the initialisation, "
        "the batches and the inner validation slide(s); the members of a seed's ensemble have seeds of their own "
        "(`member_seed`) and validate on different training slides. `noise` E: every feature multiplied by "
        "1 + E * N(0, 1), one fixed draw. CPU seconds are the process's, one thread, on a loaded machine: compare "
        "them as ratios.",
        "",
        "## Mean over held-out slides (mean ± sd over seeds)",
        "",
        summary(table).to_markdown(),
        "",
        "## Float-level stability: the LOSO mean with perturbed features minus without, per seed",
        "",
        stability(table).to_markdown(),
        "",
        "## PCC(ACG) per held-out slide and seed",
        "",
        wide.round(4).to_markdown(),
        "",
        "## Epochs kept per fold (members '; '-separated)",
        "",
        epochs["best_epochs"].dropna().to_markdown(),
        "",
    ]
    save_results("her2st_ensemble", lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    steps.add_parser("report", help="write the results file from the cached rows").set_defaults(func=report)
    run_step(parser)


if __name__ == "__main__":
    main()
