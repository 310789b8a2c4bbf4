"""CPU and wall time of training the frozen-regime methods on her2st: an old revision against the working tree.

Run on demand (not a test), from the repository root::

    python benchmarks/training_speed.py [--old main] [--methods nh2st,cmrcnet,bleep,chrep]
        [--folds B4,C2] [--repeats 2] [--seeds 0] [--work /tmp/training_speed]
        [--out benchmarks/results/training_speed.md]

The old variant is the ``src`` tree of git revision ``--old`` (``git archive``, as
``frozen_benchmark_speed.py`` makes it), the new one is this working tree's ``src``. For every
repeat and method, each variant runs as a fresh process with its tree on ``PYTHONPATH`` and one
thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``): it fits the method on the
leave-one-slide-out folds ``--folds`` (held-out sections; ``all`` for the six) the way
``fit_histo2expr`` fits a fold (250 genes chosen on the training sections, an inner validation
section, the method's defaults) and predicts the held-out section. The two variants run back
to back, in alternating order from one repeat to the next; the times are the fits and
predictions only (CPU: ``time.process_time``, wall: ``time.perf_counter``), not the imports. The
report gives the median over the repeats and new / old ratios, and whether the new predictions
are bit-identical to the old ones (``np.array_equal`` on every fold). With ``--seeds`` every repeat
runs each seed (``TrainConfig.seed``, as ``fit_histo2expr(seed=)``), and a second table compares the
variants' results seed by seed: the largest absolute difference of the predictions and of the
held-out PCC(ACG), the epochs kept (every member of every fold) and the mean PCC(ACG).

Features: the package's defaults of ``hx.tl.embed_patches`` (test-time augmentation and the
neighbour block, 2560 features per spot) with 3 x 3 tokens for the methods that take them, as
``histo2expr benchmark`` embeds them; embedded once by the new tree and cached
(``benchmarks/her2st_default_tokens3.h5ad`` in the histo2expr cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "training_speed.md"
SLIDES = ["B4", "C2", "C3", "C4", "C5", "C6"]


def embedded_cohort() -> Path:
    """The cached her2st cohort embedded with the package's default features and 3 x 3 tokens."""
    from _her2st import DATA

    import histo2expr as hx
    from histo2expr._cache import cache_dir

    path = cache_dir("benchmarks") / "her2st_default_tokens3.h5ad"
    if not path.exists():
        adata = hx.io.read_legacy_st(DATA)
        hx.pp.normalize(adata)
        hx.tl.embed_patches(adata, tokens=3, progress=False)
        adata.write_h5ad(path)
    return path


def worker(args: argparse.Namespace) -> None:
    """Fit one method on the folds with the package on ``PYTHONPATH``; save predictions and times."""
    import warnings

    import anndata as ad
    import torch

    from histo2expr._validation import log_expression
    from histo2expr.metrics import pcc_acg
    from histo2expr.models import TrainConfig, get_method
    from histo2expr.tl._data import coordinates, frozen_inputs
    from histo2expr.tl._fit import _fit_on, _Inputs

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    adata = ad.read_h5ad(args.cohort)
    slides = adata.obs["slide"].astype(str).to_numpy()
    tokens = getattr(get_method(args.method), "token_input", False)
    features, _ = frozen_inputs(adata, "X_histo", tokens=tokens, method=args.method)
    inputs = _Inputs(adata, slides, coordinates(adata), features, None)
    predictions, epochs, kept, pcc = {}, [], [], {}
    cpu, wall = time.process_time(), time.perf_counter()
    for holdout in args.folds.split(","):
        train, test = np.flatnonzero(slides != holdout), np.flatnonzero(slides == holdout)
        fitted = _fit_on(
            inputs,
            train,
            method=args.method,
            method_params={},
            genes=250,
            gene_flavor="heg",
            slide_key="slide",
            config=TrainConfig(accelerator="cpu", progress=False, seed=args.seed),
        )
        predictions[holdout] = fitted.method.predict(inputs.spots(test))
        pcc[holdout] = pcc_acg(log_expression(adata[test], fitted.genes), predictions[holdout])
        epochs.append([len(report.train_loss) for report in fitted.reports])
        kept.append(fitted.record()["best_epochs"])
    times = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
    times.update(epochs=epochs, kept=kept, pcc=pcc)
    np.savez(args.save, **predictions)
    Path(args.save).with_suffix(".json").write_text(json.dumps(times))


def run_variant(
    name: str, src: Path, method: str, args: argparse.Namespace, cohort: Path, tag: str, seed: int
) -> dict:
    """One fresh worker process of variant ``name``; its times and predictions.

    With ``--saved`` the run saved in ``--work`` by an earlier (possibly interrupted) comparison,
    `None` when there is none.
    """
    save = args.work / f"{name}_{method}_{tag}_seed{seed}.npz"
    if args.saved:
        return load_run(save, seed) if save.with_suffix(".json").exists() else None
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [
        sys.executable,
        __file__,
        "worker",
        "--method",
        method,
        "--folds",
        args.folds,
        "--seed",
        str(seed),
    ]
    command += ["--cohort", str(cohort), "--save", str(save)]
    subprocess.run(command, env=env, check=True)
    return load_run(save, seed)


def load_run(save: Path, seed: int) -> dict:
    """The times, epochs, PCC(ACG) and predictions a worker saved."""
    with np.load(save) as arrays:
        predictions = {key: arrays[key] for key in arrays.files}
    return {**json.loads(save.with_suffix(".json").read_text()), "predictions": predictions, "seed": seed}


def agreement(method: str, runs: dict[str, list[dict]]) -> list[str]:
    """Rows of the results table: old against new, seed by seed (each variant's first run of the seed)."""
    rows = []
    for seed in dict.fromkeys(run["seed"] for run in runs["old"]):
        old, new = (next(run for run in runs[name] if run["seed"] == seed) for name in ("old", "new"))
        folds = list(old["predictions"])
        prediction = max(np.abs(old["predictions"][f] - new["predictions"][f]).max() for f in folds)
        pcc = max(abs(old["pcc"][f] - new["pcc"][f]) for f in folds)
        kept = sum(a == b for a, b in zip(old["kept"], new["kept"], strict=True))
        rows.append(
            f"| {method} | {seed} | {prediction:.2g} | {pcc:.2g} | {kept} / {len(folds)} | "
            f"{statistics.mean(old['pcc'].values()):.4f} | {statistics.mean(new['pcc'].values()):.4f} | "
            f"{' / '.join(old['kept'])} | {' / '.join(new['kept'])} |"
        )
    return rows


def compare(args: argparse.Namespace) -> None:
    from frozen_benchmark_speed import snapshot

    from histo2expr._benchmark import machine_description

    args.work.mkdir(parents=True, exist_ok=True)
    if args.saved:
        git = ["git", "rev-parse", args.old]
        commit = subprocess.run(git, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    else:
        commit = snapshot(args.old, args.work / "old")
    cohort = embedded_cohort()
    sources = {"old": args.work / "old" / "src", "new": ROOT / "src"}
    rows, agreements = [], []
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for method in args.methods.split(","):
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for repeat in range(args.repeats):
            for seed in seeds:
                order = ["old", "new"] if (repeat + seed) % 2 == 0 else ["new", "old"]
                pair = {
                    name: run_variant(name, sources[name], method, args, cohort, str(repeat), seed)
                    for name in order
                }
                if any(run is None for run in pair.values()):
                    continue
                for name in order:
                    runs[name].append(pair[name])
                    print(
                        method,
                        name,
                        repeat,
                        seed,
                        {k: runs[name][-1][k] for k in ("cpu", "wall")},
                        flush=True,
                    )
        identical = all(
            np.array_equal(old["predictions"][fold], new["predictions"][fold])
            for old in runs["old"]
            for new in runs["new"]
            if old["seed"] == new["seed"]
            for fold in old["predictions"]
        )
        agreements += agreement(method, runs)
        median = {
            (name, kind): statistics.median(run[kind] for run in runs[name])
            for name in runs
            for kind in ("cpu", "wall")
        }
        ratios = [new["cpu"] / old["cpu"] for old, new in zip(runs["old"], runs["new"], strict=True)]
        # early stopping may stop the variants at other epochs: CPU per epoch trained is the work's own speed
        epochs = {name: sum(sum(map(sum, run["epochs"])) for run in runs[name]) for name in runs}
        per_epoch = {name: sum(run["cpu"] for run in runs[name]) / epochs[name] for name in runs}
        rows.append(
            f"| {method} | {median['old', 'cpu']:.1f} | {median['new', 'cpu']:.1f} | "
            f"**{median['new', 'cpu'] / median['old', 'cpu']:.2f}** | "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + f" | {median['old', 'wall']:.1f} | {median['new', 'wall']:.1f} | "
            f"{median['new', 'wall'] / median['old', 'wall']:.2f} | "
            f"{epochs['old']} / {epochs['new']} | **{per_epoch['new'] / per_epoch['old']:.2f}** | "
            f"{'yes' if identical else '**NO**'} |"
        )
    machine = machine_description()
    text = "\n".join(
        [
            "# Training speed of the frozen-regime methods: old revision against the working tree",
            "",
            f"Command (from the repository root): `python benchmarks/training_speed.py --old {args.old} "
            f"--methods {args.methods} --folds {args.folds} --repeats {args.repeats} --seeds {args.seeds}`",
            "",
            f"Old: `{args.old}` ({commit[:9]}); new: the working tree. Machine: {machine['platform']}, "
            f"{machine['cpu_cores']} CPU cores **shared with other jobs**, no GPU, torch {machine['torch']}, "
            f"Python {machine['python']}; every run one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), "
            "a fresh process per variant and method, the variants back to back in alternating order.",
            "",
            f"Each run: her2st, leave-one-slide-out folds holding out {args.folds}, 250 genes, the method's "
            "defaults, the package's default frozen features (2560 per spot; 3 x 3 tokens for cmrcnet); fit and "
            "prediction of the held-out sections timed, imports not. Medians over the runs (repeats x seeds); "
            "`new/old CPU per run` pairs the runs of one repeat and seed.",
            "",
            "| method | old CPU s | new CPU s | new/old CPU | new/old CPU per run | old wall s | new wall s "
            "| new/old wall | epochs trained old / new | new/old CPU per epoch | identical predictions |",
            "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
            *rows,
            "",
            "Old against new per seed: the largest absolute difference of the held-out predictions "
            "(standardised expression) and of a fold's PCC(ACG), the folds whose kept epochs (every member) "
            "are the same, the mean PCC(ACG) over the folds, and the epochs kept (0-based, members '; ', folds ' / ').",
            "",
            "| method | seed | max abs pred diff | max abs PCC diff | same kept epochs | old PCC(ACG) | "
            "new PCC(ACG) | old kept epochs | new kept epochs |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
            *agreements,
            "",
        ]
    )
    print(text)
    args.out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("worker", help="(internal) one variant's fits")
    run.add_argument("--method", required=True)
    run.add_argument("--folds", required=True)
    run.add_argument("--cohort", required=True)
    run.add_argument("--save", required=True)
    run.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old", default="main")
    parser.add_argument("--methods", default="nh2st,cmrcnet,bleep,chrep")
    parser.add_argument("--folds", default="B4,C2", help="held-out sections, comma-separated, or 'all'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.add_argument(
        "--saved",
        action="store_true",
        help="report the runs saved in --work (the pairs complete so far); run nothing",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/training_speed"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
        return
    if args.folds == "all":
        args.folds = ",".join(SLIDES)
    compare(args)


if __name__ == "__main__":
    main()
