"""NH2ST on her2st, leave-one-slide-out: seed spread and float-level stability of its training recipe.

Every row runs ``hx.tl.fit_histo2expr(method=..., cv="leave_one_slide_out", genes=250, seed=...)`` on
the default frozen features (``f1:4+nbr6``, what ``hx.tl.embed_patches`` computes by default, built
from the views cached by ``her2st_features.py embed --field 1 --views 8 --tokens``), next to ridge,
bleep and stnet of the same run. ``--noise E`` multiplies every feature by ``1 + E * N(0, 1)``
(a fixed draw): a float-level perturbation like the one another encoder backend or thread count
gives (``E = 1e-5`` leaves ridge's scores unchanged to four decimals), to see how far the training
amplifies it. Rows are cached, so a run only adds the missing ones:

    python benchmarks/her2st_nh2st_stability.py run --variants mse,pcc,ema2 --seeds 0,1,2 --noise 0,1e-5
    python benchmarks/her2st_nh2st_stability.py run --variants baselines --seeds 0,1,2
    python benchmarks/her2st_nh2st_stability.py report

``report`` writes benchmarks/results/her2st_nh2st_stability.md (mean ± sd over seeds, the largest
move of a seed's mean under the perturbation, PCC(ACG) per slide and seed, the epochs kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
from _her2st import save_results
from her2st_features import build, cohort

import histo2expr as hx
from histo2expr._cache import cache_dir

SETTING = "f1:4+nbr6"
ROWS = cache_dir("benchmarks/nh2st_stability") / "rows.jsonl"
#: Rows by name: ``fit_histo2expr`` keyword arguments (the method and its settings).
VARIANTS = {
    "nh2st: mse": {"method": "nh2st", "early_stopping": "mse", "average_epochs": None},
    "nh2st: pcc": {"method": "nh2st", "early_stopping": "pcc", "average_epochs": None},
    "nh2st: pcc, ema 2": {"method": "nh2st", "early_stopping": "pcc", "average_epochs": 2.0},
    "nh2st: mse, ema 2": {"method": "nh2st", "early_stopping": "mse", "average_epochs": 2.0},
    "ridge": {"method": "ridge"},
    "bleep": {"method": "bleep"},
    "stnet": {"method": "stnet"},
    "nh2st: ensemble 3": {"method": "nh2st", "ensemble": 3},
}
GROUPS = {
    "baselines": ["ridge", "bleep", "stnet"],
    "mse": ["nh2st: mse"],
    "pcc": ["nh2st: pcc"],
    "ema2": ["nh2st: pcc, ema 2"],
    "ensemble3": ["nh2st: ensemble 3"],
}


def perturbed(features: np.ndarray, noise: float) -> np.ndarray:
    """``features * (1 + noise * N(0, 1))`` with a fixed draw (the features themselves when ``noise == 0``)."""
    if noise == 0:
        return features
    draw = np.random.default_rng(12345).standard_normal(features.shape).astype(np.float32)
    return features * (1 + np.float32(noise) * draw)


def run(args: argparse.Namespace) -> None:
    adata = cohort()
    slides = adata.obs["slide"].astype(str).to_numpy()
    features = build(SETTING, adata.obsm["spatial"], slides)[0]
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []
    done = {(r["variant"], r["seed"], r["noise"]) for r in rows}
    names = [n for part in args.variants.split(",") for n in GROUPS.get(part, [part])]
    for noise in map(float, args.noise.split(",")):
        adata.obsm["X_histo"] = perturbed(features, noise)
        for seed in map(int, args.seeds.split(",")):
            for name in names:
                if (name, seed, noise) in done:
                    continue
                cpu = time.process_time()
                hx.tl.fit_histo2expr(
                    adata, cv="leave_one_slide_out", genes=250, seed=seed, key_added="row", progress=False,
                    refit=False, **VARIANTS[name],
                )  # fmt: skip
                folds = adata.uns["row"]["folds"]
                row = {
                    "variant": name,
                    "seed": seed,
                    "noise": noise,
                    "cpu_seconds": time.process_time() - cpu,
                    "best_epochs": folds["best_epochs"].tolist(),  # per fold, members '; '-separated
                    "per_slide": folds[["slide", "pcc_acg", "pcc_heg50"]].to_dict(orient="records"),
                }
                with ROWS.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    name,
                    seed,
                    noise,
                    f"PCC(ACG) {folds['pcc_acg'].mean():.4f}",
                    row["best_epochs"],
                    flush=True,
                )


def _table() -> pd.DataFrame:
    records = []
    for row in map(json.loads, ROWS.read_text().splitlines()):
        for slide in row["per_slide"]:
            records.append({k: row[k] for k in ("variant", "seed", "noise")} | slide)
    return pd.DataFrame(records)


def report(args: argparse.Namespace) -> None:
    table = _table()
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    per_seed = table.groupby(["variant", "noise", "seed"])[["pcc_acg", "pcc_heg50"]].mean()
    summary = per_seed.groupby(["variant", "noise"]).agg(["size", "mean", "std"]).round(4)
    summary.columns = ["seeds", "PCC(ACG)", "sd", "-", "PCC(HEG@50)", "sd HEG"]
    summary = summary.drop(columns="-")
    clean = per_seed.xs(0.0, level="noise")["pcc_acg"]
    moves = {}
    for (variant, noise), part in per_seed["pcc_acg"].groupby(level=["variant", "noise"]):
        if noise == 0:
            continue
        shifted = part.droplevel(["variant", "noise"]) - clean.loc[variant]
        moves[(variant, noise)] = {
            "seeds": int(shifted.notna().sum()),
            "largest move of a seed's mean": round(float(shifted.abs().max()), 4),
            "move of the mean over seeds": round(float(shifted.mean()), 4),
        }
    wide = table.pivot_table(index=["variant", "noise", "seed"], columns="slide", values="pcc_acg").round(4)
    epochs = pd.DataFrame(
        [
            {"variant": r["variant"], "noise": r["noise"], "seed": r["seed"], "epochs kept": r["best_epochs"]}
            for r in rows
        ]
    ).set_index(["variant", "noise", "seed"])
    cpu = pd.DataFrame(rows).groupby("variant")["cpu_seconds"].mean().round(0)
    lines = [
        "# NH2ST on her2st: seed spread and float-level stability (leave-one-slide-out, frozen features)",
        "",
        f"Command: `{args.command}` (see the script's docstring for the runs).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, no GPU, torch "
        f"{torch.__version__}, one torch thread per process (`OMP_NUM_THREADS=1`). Data: 1193 spots, 6 sections, "
        f"250 highly expressed genes chosen on the training slides of each fold, features `{SETTING}` "
        "(frozen ImageNet EfficientNet-Lite0, the patch's four quarter turns averaged, then the mean of the six "
        "nearest spots: `hx.tl.embed_patches`'s defaults). Same folds and genes in every row; seeds change "
        "the initialisation, the batches and the inner validation slide. `noise` E: every feature multiplied by "
        "1 + E * N(0, 1), one fixed draw.",
        "",
        "## Mean over held-out slides (mean and sd over seeds)",
        "",
        summary.to_markdown(),
        "",
        "## Float-level stability: PCC(ACG) with perturbed features minus without, per seed",
        "",
        pd.DataFrame(moves).T.to_markdown(),
        "",
        "## PCC(ACG) per held-out slide and seed",
        "",
        wide.to_markdown(),
        "",
        "## Epoch kept per fold (B4, C2, ..., C6; trained methods)",
        "",
        epochs[epochs["epochs kept"].map(lambda e: any(x is not None for x in e))].to_markdown(),
        "",
        "## Mean CPU seconds of one leave-one-slide-out run (one thread)",
        "",
        cpu.to_markdown(),
        "",
    ]
    save_results("her2st_nh2st_stability", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("run")
    step.add_argument(
        "--variants", default="ema2", help=f"comma-separated: {', '.join([*VARIANTS, *GROUPS])}"
    )
    step.add_argument("--seeds", default="0,1,2")
    step.add_argument("--noise", default="0", help="comma-separated relative noise levels")
    step.set_defaults(func=run)
    step = steps.add_parser("report")
    step.add_argument("--command", default="python benchmarks/her2st_nh2st_stability.py report")
    step.set_defaults(func=report)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hx.settings.n_threads = 1
    args.func(args)


if __name__ == "__main__":
    main()
