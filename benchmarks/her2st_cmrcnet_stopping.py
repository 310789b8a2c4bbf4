"""CMRCNet (and BLEEP) on her2st: epoch-choice rules, leave-one-slide-out over seeds and fold B4 under float noise.

Run on demand (needs $HISTO2EXPR_HER2ST), one run at a time, from the repository root::

    python benchmarks/her2st_cmrcnet_stopping.py run --rows "cmrcnet: loss;cmrcnet: pcc" --seeds 0,1,2
    python benchmarks/her2st_cmrcnet_stopping.py run --rows "cmrcnet: loss;cmrcnet: pcc" --draws 8
    python benchmarks/her2st_cmrcnet_stopping.py report

The features are those ``histo2expr benchmark --data DATA`` makes: the CLI's own reader, normalisation and
embedding (its default feature options and token grid, backend ``auto``), computed once and cached in the
histo2expr cache (``benchmarks/cmrcnet_stopping/cohort.h5ad``). Every row is
``hx.tl.fit_histo2expr(method=..., cv=..., genes=250, seed=..., refit=False, **params)`` (:data:`ROWS`).

- ``--seeds``: leave one slide out, all six folds, per seed.
- ``--draws N``: fold B4 alone (held-out patient-B section; seed 0), N times, the features and tokens each
  multiplied by ``1 + 1e-6 N(0, 1)`` (draw d seeds the noise with d): how far a float-level change of the
  inputs moves the fold's result. The fold is run as ``cv="leave_one_patient_out"`` (patient B = B4 alone,
  so its training slides, genes and inner validation split are those of the B4 fold of leave one slide out);
  only B4's score is kept.

Rows are cached (``rows.jsonl`` next to the cohort) with the CPU seconds of the process and the epochs kept,
so a run adds only the missing ones. ``report`` writes benchmarks/results/her2st_cmrcnet_stopping.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from _her2st import DATA, mean_and_sd, read_rows, run_step, save_results, steps_parser

import histo2expr as hx
from histo2expr._cache import cache_dir

FOLDER = cache_dir("benchmarks/cmrcnet_stopping")
COHORT = FOLDER / "cohort.h5ad"
ROW_FILE = FOLDER / "rows.jsonl"
NOISE = 1e-6
#: Rows by name: ``fit_histo2expr`` keyword arguments (the method and its settings).
ROWS: dict[str, dict[str, Any]] = {
    "cmrcnet: loss": {"method": "cmrcnet", "early_stopping": "loss"},
    "cmrcnet: pcc": {"method": "cmrcnet", "early_stopping": "pcc"},
    "cmrcnet: pcc, patience 10": {"method": "cmrcnet", "early_stopping": "pcc", "patience": 10},
    "cmrcnet: loss, average_epochs 6": {"method": "cmrcnet", "early_stopping": "loss", "average_epochs": 6.0},
    "cmrcnet: pcc, average_epochs 6": {"method": "cmrcnet", "early_stopping": "pcc", "average_epochs": 6.0},
    "bleep: loss": {"method": "bleep", "early_stopping": "loss"},
    "bleep: pcc": {"method": "bleep", "early_stopping": "pcc"},
}


def cohort() -> Any:
    """her2st with the features of ``histo2expr benchmark --data DATA`` (its reader, normalisation and embedding)."""
    import anndata as ad

    from histo2expr import cli

    if COHORT.exists():
        return ad.read_h5ad(COHORT)
    args = cli._parser().parse_args(["benchmark", "--data", str(DATA), "--quiet"])
    args.progress = False  # what `histo2expr benchmark --quiet` sets
    adata = cli.read_cohort(args.data, reader=args.reader)
    hx.pp.normalize(adata)
    seconds, backend = cli._embed(adata, args, ["cmrcnet"])
    adata.uns["benchmark_embed"] = {"seconds": seconds, "backend": backend}
    adata.write_h5ad(COHORT)
    return adata


def perturbed(adata: Any, draw: int) -> Any:
    """``adata`` with every frozen feature and token multiplied by ``1 + NOISE * N(0, 1)`` (noise seeded by ``draw``)."""
    rng = np.random.default_rng(draw)
    noisy = adata.copy()
    for key in ("X_histo", "X_histo_tokens"):
        values = np.asarray(adata.obsm[key], dtype=np.float32)
        noisy.obsm[key] = values * (
            1 + np.float32(NOISE) * rng.standard_normal(values.shape, dtype=np.float32)
        )
    return noisy


def fit_row(adata: Any, name: str, *, seed: int, draw: int | None) -> dict[str, Any]:
    """Cross-validate one row (leave one slide out; fold B4 alone under noise with ``draw``) and record it."""
    cv, extra = "leave_one_slide_out", {}
    if draw is not None:
        adata = perturbed(adata, draw)
        adata.obs["patient_b4"] = np.where(adata.obs["slide"].astype(str) == "B4", "B", "C")
        cv, extra = "leave_one_patient_out", {"patient_key": "patient_b4"}
    cpu = time.process_time()
    hx.tl.fit_histo2expr(
        adata, cv=cv, genes=250, seed=seed, key_added="row", progress=False, refit=False, **extra, **ROWS[name]
    )  # fmt: skip
    folds = adata.uns["row"]["folds"]
    if draw is not None:
        folds = folds[folds["slide"].astype(str) == "B4"]
    return {
        "row": name,
        "seed": seed,
        "draw": draw,
        "cpu_seconds": time.process_time() - cpu,
        "per_slide": folds[["slide", "pcc_acg", "pcc_heg50", "best_epochs"]]
        .astype({"slide": str})
        .to_dict("records"),
    }


def run(args: argparse.Namespace) -> None:
    hx.settings.n_threads = args.threads
    adata = cohort()
    done = {(r["row"], r["seed"], r["draw"]) for r in read_rows(ROW_FILE)}
    names = [n.strip() for n in args.rows.split(";")]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {sorted(ROWS)}")
    runs = [(s, None) for s in map(int, args.seeds.split(","))] if args.seeds else []
    runs += [(0, d) for d in range(1, args.draws + 1)]
    for name in names:
        for seed, draw in runs:
            if (name, seed, draw) in done:
                continue
            row = fit_row(adata, name, seed=seed, draw=draw)
            with ROW_FILE.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            scores = {r["slide"]: round(r["pcc_acg"], 4) for r in row["per_slide"]}
            print(name, seed, draw, f"{row['cpu_seconds']:.0f} s", scores, flush=True)


def _slides(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [{k: r[k] for k in ("row", "seed", "draw", "cpu_seconds")} | s for r in rows for s in r["per_slide"]]
    )


def report(args: argparse.Namespace) -> None:
    table = _slides(read_rows(ROW_FILE))
    seeds, draws = table[table["draw"].isna()], table[table["draw"].notna()]
    per_seed = seeds.groupby(["row", "seed"]).agg(
        pcc_acg=("pcc_acg", "mean"), pcc_heg50=("pcc_heg50", "mean"), cpu_seconds=("cpu_seconds", "first")
    )
    b4 = seeds[seeds["slide"] == "B4"].set_index(["row", "seed"])["pcc_acg"]
    summary = pd.DataFrame(
        {
            "seeds": per_seed.groupby("row").size(),
            "PCC(ACG)": per_seed.groupby("row")["pcc_acg"].agg(mean_and_sd),
            "PCC(HEG@50)": per_seed.groupby("row")["pcc_heg50"].agg(mean_and_sd),
            "B4 PCC(ACG)": b4.groupby("row").agg(mean_and_sd),
            "CPU s per run": per_seed.groupby("row")["cpu_seconds"].mean().round(0),
        }
    )
    noise = (
        draws.groupby("row")
        .agg(
            draws=("pcc_acg", "size"),
            mean=("pcc_acg", "mean"),
            sd=("pcc_acg", "std"),
            low=("pcc_acg", "min"),
            high=("pcc_acg", "max"),
            cpu_seconds=("cpu_seconds", "mean"),
        )
        .round(4)
    )
    noise["epochs kept"] = draws.groupby("row")["best_epochs"].agg(lambda e: ", ".join(map(str, e)))
    wide = seeds.pivot_table(index=["row", "seed"], columns="slide", values="pcc_acg").round(4)
    epochs = seeds.pivot_table(index=["row", "seed"], columns="slide", values="best_epochs", aggfunc="first")
    lines = [
        "# her2st: CMRCNet's (and BLEEP's) epoch choice, leave one slide out over seeds and fold B4 under float noise",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/her2st_cmrcnet_stopping.py --threads 1 run --rows ROWS "
        "--seeds 0,1,2` and `... run --rows ROWS --draws N`, one run at a time, then `report`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, no GPU, torch "
        f"{torch.__version__}, one torch thread (`OMP_NUM_THREADS=1`, `hx.settings.n_threads = 1`). Data: the "
        "features `histo2expr benchmark --data DATA` makes (its reader, normalisation and embedding: the default "
        "frozen features with 3 x 3 tokens), 1193 spots on 6 sections, 250 highly expressed genes chosen on the "
        "training slides of each fold, `refit=False`. CPU seconds: the process's, per leave-one-slide-out run "
        "(six folds) or per B4 fold (with the reverse fold the patient split also fits), on a shared machine.",
        "",
        "## Leave one slide out: mean over held-out slides (mean ± sd over seeds)",
        "",
        summary.to_markdown(),
        "",
        f"## Fold B4 (seed 0) over draws of the inputs x (1 + {NOISE:g} N(0, 1))",
        "",
        noise.to_markdown(),
        "",
        "## PCC(ACG) per held-out slide and seed",
        "",
        wide.to_markdown(),
        "",
        "## Epochs kept per held-out slide and seed",
        "",
        epochs.to_markdown(),
        "",
    ]
    save_results("her2st_cmrcnet_stopping", lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    step = steps.add_parser("run")
    step.add_argument("--rows", required=True, help=f"';'-separated names of {sorted(ROWS)}")
    step.add_argument("--seeds", default="", help="seeds of leave-one-slide-out runs, e.g. 0,1,2")
    step.add_argument("--draws", type=int, default=0, help="noisy draws of fold B4 (seed 0)")
    step.set_defaults(func=run)
    steps.add_parser("report").set_defaults(func=report)
    run_step(parser)


if __name__ == "__main__":
    main()
