"""``histo2expr benchmark`` on her2st at its defaults over three seeds: issue 15's targets, mean ± sd.

Run on demand (needs her2st), from the repository root::

    python benchmarks/her2st_frozen_seeds.py run [--seeds 0,1,2] [--data DATA] [--work /tmp/her2st_frozen_seeds]
    python benchmarks/her2st_frozen_seeds.py report [--work /tmp/her2st_frozen_seeds]

``run`` calls ``histo2expr benchmark --data DATA --seed S --quiet --out WORK/seedS`` for every seed whose
``results.json`` is not in ``--work`` yet (the seed changes the initialisation, the batches and the inner
validation slides; folds, genes and features are the same). ``report`` writes
benchmarks/results/her2st_frozen_seeds.md from every ``WORK/seed*/results.json``: PCC(ACG) and PCC(HEG@50)
per method and seed under each cross-validation, their mean ± sd over the seeds, and the targets of issue 15
checked seed by seed and on the mean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from _her2st import DATA, mean_and_sd, save_results

BASELINES = ("ridge", "stnet", "bleep")
PAPER_METHODS = ("chrep", "cmrcnet", "nh2st")


def run(args: argparse.Namespace) -> None:
    for seed in (int(s) for s in args.seeds.split(",")):
        out = args.work / f"seed{seed}"
        if (out / "results.json").exists():
            print(f"seed {seed}: {out / 'results.json'} exists, kept")
            continue
        command = [sys.executable, "-m", "histo2expr.cli", "benchmark", "--data", str(args.data),
                   "--seed", str(seed), "--quiet", "--out", str(out)]  # fmt: skip
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


def scores(work: Path) -> pd.DataFrame:
    """One row per (cross-validation, method, seed): the mean PCC(ACG) and PCC(HEG@50) over held-out slides."""
    rows = []
    for path in sorted(work.glob("seed*/results.json")):
        results = json.loads(path.read_text())
        seed = results["settings"]["seed"]
        for scheme, run in results["cross_validation"].items():
            for method, record in run["methods"].items():
                mean = record["mean"]
                rows.append({"cv": scheme, "method": method, "seed": seed,
                             "PCC(ACG)": mean["pcc_acg"], "PCC(HEG@50)": mean["pcc_heg50"]})  # fmt: skip
    return pd.DataFrame(rows)


def targets(table: pd.DataFrame) -> pd.DataFrame:
    """Issue 15's targets (leave one slide out) for every seed and for the mean over seeds."""
    loso = table[table["cv"] == "leave_one_slide_out"]
    acg = loso.pivot(index="seed", columns="method", values="PCC(ACG)")
    heg = loso.pivot(index="seed", columns="method", values="PCC(HEG@50)")
    acg.loc["mean"], heg.loc["mean"] = acg.mean(), heg.mean()
    best_baseline = acg[list(BASELINES)].max(axis=1)
    checks = {
        "CHRep >= 0.23 PCC(ACG)": acg["chrep"] >= 0.23,
        "CHRep >= 0.25 PCC(HEG@50)": heg["chrep"] >= 0.25,
        "CMRCNet > BLEEP": acg["cmrcnet"] > acg["bleep"],
        "NH2ST > ridge": acg["nh2st"] > acg["ridge"],
        "every paper method >= the best baseline": acg[list(PAPER_METHODS)].min(axis=1) >= best_baseline,
        "ST-Net >= ridge": acg["stnet"] >= acg["ridge"],
    }
    return pd.DataFrame(
        {name: met.map({True: "met", False: "**not met**"}) for name, met in checks.items()}
    ).T


def report(args: argparse.Namespace) -> None:
    table = scores(args.work)
    seeds = sorted(table["seed"].unique())
    lines = [
        "# her2st: `histo2expr benchmark` at its defaults over seeds",
        "",
        f"Command: `python benchmarks/her2st_frozen_seeds.py run --seeds {','.join(map(str, seeds))}`, then "
        "`report` (each seed one `histo2expr benchmark --data DATA --seed S --quiet` run: every method at its "
        "defaults, 1193 spots on 6 sections, 250 genes chosen on the training slides of each fold, the default "
        "frozen features). A seed changes the initialisation, the batches and the inner validation slides; "
        "folds, genes and features are the same in every seed.",
        "",
    ]
    for scheme, part in table.groupby("cv", sort=False):
        wide = part.pivot(index="method", columns="seed", values="PCC(ACG)")
        shown = part.groupby("method")[["PCC(ACG)", "PCC(HEG@50)"]].agg(mean_and_sd)
        wide.columns = [f"seed {seed}" for seed in wide.columns]
        lines += [f"## {scheme}: PCC(ACG) per seed, and mean ± sd over seeds", "",
                  wide.round(4).join(shown).sort_values("PCC(ACG)", ascending=False).to_markdown(), ""]  # fmt: skip
    lines += ["## Issue 15's targets, leave one slide out, per seed and on the mean", "",
              targets(table).to_markdown(), ""]  # fmt: skip
    save_results("her2st_frozen_seeds", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    for name, func in (("run", run), ("report", report)):
        step = steps.add_parser(name)
        step.add_argument("--work", type=Path, default=Path("/tmp/her2st_frozen_seeds"))
        step.set_defaults(func=func)
    steps.choices["run"].add_argument("--seeds", default="0,1,2")
    steps.choices["run"].add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
