"""her2st, leave-one-slide-out: the adapted-encoder regime against the frozen default, per method.

Run on demand (needs ../shared/data/her2st or $HISTO2EXPR_HER2ST); every row is one
``hx.tl.fit_histo2expr(regime="adapted", ...)`` run in a process of its own (so that its peak memory is
its own), appended to a JSON-lines file in the histo2expr cache; the lower blocks' activations are
cached by the package itself, so the first row of a (trainable_blocks, views) pair pays for them (the
row builds them before its fit and times the build apart, wall and CPU):

    python benchmarks/her2st_adapted.py run --methods chrep,stnet,bleep,cmrcnet,nh2st --trainable-blocks 1 --seeds 0
    python benchmarks/her2st_adapted.py run --methods nh2st --params '{"ensemble": 1}' --label "nh2st (ensemble 1)"
    python benchmarks/her2st_adapted.py report

``run --params JSON --label NAME`` runs the methods with settings other than their defaults and records
the rows under NAME (one method at a time), as ``her2st_features.py`` does. Every row trains at most
``--epochs`` (10 by default, against the frozen rows' 50: each adapted epoch runs the trained stages over
every training spot, NH2ST's neighbours included).

The protocol is ``her2st_features.py``'s: 1193 spots on 6 sections, 250 highly expressed genes chosen
on the training slides of each fold, ImageNet EfficientNet-Lite0 at 224 px, every method at its
defaults, one torch thread. The adapted rows get the neighbour block of the frozen default features
(``f1:4+nbr6``, what ``hx.tl.embed_patches`` computes by default) next to the adapted spot view, so
that they differ from the frozen default rows only in the spot view's encoder top. The frozen rows
are read from ``her2st_features.py``'s cached rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import pandas as pd
import torch
from _her2st import read_rows, save_results, steps_parser
from her2st_features import CACHE, ROWS, _summary, build, cohort

import histo2expr as hx
from histo2expr.models import ActivationCache, AdaptedViews
from histo2expr.models.base import get_method
from histo2expr.patches import PatchSource
from histo2expr.tl._adapted import activation_cache

ADAPTED = CACHE / "adapted.jsonl"
FROZEN_DEFAULT = "f1:4+nbr6"
COLUMNS = ["pcc_acg", "pcc_heg50", "pcc_hvg50", "mse", "mae"]
#: The label of ``her2st_features.py``'s frozen rows at the settings of an adapted row, where it is another:
#: NH2ST's plain frozen rows were run when its default was one fit ("K=1, default before" in her2st_ensemble.md);
#: its default ensemble of three has a label of its own.
FROZEN_LABELS = {"nh2st": "nh2st (ensemble 3)", "nh2st (ensemble 1)": "nh2st"}


def row(args: argparse.Namespace) -> None:
    """One (method, trainable_blocks, views, seed) run, in this process."""
    torch.set_num_threads(args.threads)
    adata = cohort()
    slides = adata.obs["slide"].astype(str).to_numpy()
    features, _ = build(FROZEN_DEFAULT, adata.obsm["spatial"], slides)
    adata.obsm["X_histo"] = features
    adata.uns["X_histo"] = {"blocks": {"spot": [0, 1280], "neighbours": [1280, 2560]}}
    cache_tic, cache_cpu = time.perf_counter(), time.process_time()
    cache = _activations(adata, args)
    cache_seconds = (time.perf_counter() - cache_tic) if cache.seconds else 0.0
    cache_cpu_seconds = (time.process_time() - cache_cpu) if cache.seconds else 0.0
    tic = time.perf_counter()
    hx.tl.fit_histo2expr(
        adata, method=args.method, regime="adapted", trainable_blocks=args.trainable_blocks, views=args.views,
        stain_copies=args.stain_copies, cv="leave_one_slide_out", genes=250, seed=args.seed, key_added="row",
        progress=False, refit=False, epochs=args.epochs, **json.loads(args.params),
    )  # fmt: skip
    folds = adata.uns["row"]["folds"]
    result = {
        "method": args.label or args.method,
        "params": json.loads(args.params),
        "trainable_blocks": args.trainable_blocks,
        "views": args.views,
        "stain_copies": args.stain_copies,
        "epochs": args.epochs,
        "seed": args.seed,
        "seconds": time.perf_counter() - tic,
        "cpu_seconds": time.process_time() - cache_cpu,  # the cache's build included, as in the first rows
        "cache_seconds": cache_seconds,
        "cache_cpu_seconds": cache_cpu_seconds,
        "cache_bytes": cache.nbytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "per_slide": folds[["slide", *COLUMNS]].to_dict(orient="records"),
        "best_epochs": [str(epochs) for epochs in folds["best_epochs"]],  # members '; '-separated
    }
    with ADAPTED.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    mean = folds["pcc_acg"].mean()
    print(result["method"], args.trainable_blocks, args.seed, f"PCC(ACG) {mean:.4f}", flush=True)


def _activations(adata: hx.AnnData, args: argparse.Namespace) -> ActivationCache:
    """The activation cache the row's fit reads, built here (when missing) so that its time is measured apart.

    The same call as ``fit_histo2expr(regime="adapted")`` makes: the method's encoder and weights, 224 px patches.
    """
    settings = get_method(args.method)().settings
    return activation_cache(
        PatchSource(adata, patch_size=224),
        encoder=settings.encoder,
        weights=settings.weights,
        trainable_blocks=args.trainable_blocks,
        views=AdaptedViews.for_training(args.views, args.stain_copies, args.seed),
        seed=args.seed,
        batch_size=64,
        progress=False,
    )


def _done() -> set[tuple]:
    keys = ("method", "trainable_blocks", "views", "stain_copies", "epochs", "seed")
    return {tuple(r[k] for k in keys) for r in read_rows(ADAPTED)}


def run(args: argparse.Namespace) -> None:
    """Every requested row not yet done, each in a fresh process."""
    done = _done()
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            label = args.label or method
            if (label, args.trainable_blocks, args.views, args.stain_copies, args.epochs, seed) in done:
                continue
            command = [sys.executable, __file__, "--threads", str(args.threads), "row", "--method", method]
            command += ["--trainable-blocks", str(args.trainable_blocks), "--views", str(args.views)]
            command += [
                "--stain-copies",
                str(args.stain_copies),
                "--epochs",
                str(args.epochs),
                "--seed",
                str(seed),
                "--params",
                args.params,
                "--label",
                args.label,
            ]
            subprocess.run(command, check=True)


def _per_slide(path, keys: list[str]) -> pd.DataFrame:
    records = []
    for entry in read_rows(path):
        for slide in entry["per_slide"]:
            records.append({**{k: entry[k] for k in keys}, **slide})
    return pd.DataFrame(records)


def _fit_cpu_per_fold(run: dict) -> int | str:
    """A row's CPU seconds per fold without the cache's build.

    The first rows timed a build in wall time only: on one thread that is at least its CPU time, so
    what remains is a lower bound.
    """
    if "cache_cpu_seconds" in run or not run["cache_seconds"]:
        return round((run["cpu_seconds"] - run.get("cache_cpu_seconds", 0.0)) / 6)
    return f">= {round((run['cpu_seconds'] - run['cache_seconds']) / 6)}"


def report(args: argparse.Namespace) -> None:
    adapted = _per_slide(ADAPTED, ["method", "trainable_blocks", "views", "stain_copies", "epochs", "seed"])
    frozen = _per_slide(ROWS, ["setting", "method", "seed"])
    labels = {FROZEN_LABELS.get(label, label): label for label in adapted["method"].unique()}
    frozen = frozen[(frozen["setting"] == FROZEN_DEFAULT) & frozen["method"].isin(labels)]
    frozen["method"] = frozen["method"].map(labels)  # each under the label of the adapted row it compares to
    adapted["setting"] = adapted.apply(
        lambda r: (
            f"adapted tb={r.trainable_blocks} views={r.views} epochs={r.epochs}"
            + (f"+{r.stain_copies} stain" if r.stain_copies else "")
        ),
        axis=1,
    )
    frozen["setting"] = f"frozen {FROZEN_DEFAULT}"
    rows = pd.concat([frozen, adapted], ignore_index=True)
    summary = _summary(rows)
    runs = read_rows(ADAPTED)
    cost = pd.DataFrame(
        [
            {
                "method": r["method"],
                "trainable_blocks": r["trainable_blocks"],
                "views": r["views"],
                "seed": r["seed"],
                "s per fold (wall)": round(r["seconds"] / 6),
                "CPU s per fold": _fit_cpu_per_fold(r),
                "peak RSS GiB": round(r["peak_rss_bytes"] / 2**30, 2),
                "cache MiB": round(r["cache_bytes"] / 2**20),
                "cache build s": round(r["cache_seconds"]) if r["cache_seconds"] else "cached",
                "cache build CPU s": round(r["cache_cpu_seconds"]) if r.get("cache_cpu_seconds") else "",
            }
            for r in runs
        ]
    )
    lines = [
        "# her2st, leave-one-slide-out: adapted encoder (top blocks trained on cached activations) vs frozen",
        "",
        "Made with `benchmarks/her2st_adapted.py` (its docstring has the commands). 1193 spots on 6 sections, "
        "250 highly expressed genes chosen on the training slides of each fold, ImageNet EfficientNet-Lite0 at "
        "224 px, every method at its defaults, one torch thread on a 2-core machine shared with other jobs "
        "(load 2-12). The frozen rows are `her2st_features.py`'s `f1:4+nbr6` rows (the default features of "
        "`hx.tl.embed_patches`); the adapted rows train the top `trainable_blocks` stages of the encoder on "
        "the cached activations of the others (one of `views` dihedral views per spot and epoch; inference "
        "averages the 4 quarter turns), next to the same frozen neighbour block. The frozen `cmrcnet` rows "
        "are the method's plain rows of `her2st_features.py`, run before its weight averaging became the "
        "default (`average_epochs=3`, which the adapted row has); the frozen rows at that default are in "
        "`her2st_cmrcnet_averaging.md`. A method name with a parenthesis is a method run with other settings "
        "(`run --params ... --label`): `nh2st (ensemble 1)` is NH2ST as one fit (its default is an ensemble of "
        "three); its frozen rows are `her2st_features.py`'s plain `nh2st` rows, run when one fit was its default "
        "(`her2st_ensemble.md`'s `K=1, default before`).",
        "",
        "## Mean over held-out slides (mean ± sd over seeds)",
        "",
        summary.to_markdown(index=False),
        "",
        "## PCC(ACG) per held-out slide",
        "",
        rows.pivot_table(index=["method", "setting", "seed"], columns="slide", values="pcc_acg")
        .round(4)
        .to_markdown(),
        "",
        "## HEG@50 per held-out slide",
        "",
        rows.pivot_table(index=["method", "setting", "seed"], columns="slide", values="pcc_heg50")
        .round(4)
        .to_markdown(),
        "",
        "## Time and memory of the adapted rows",
        "",
        "Seconds per fold without the activation cache's build (wall time on the shared machine, and the "
        "process CPU time, about the time on a core of its own; `>= N`: a row that built the cache before its "
        "build was timed apart in CPU time, a lower bound); peak resident memory of the whole process (cohort, "
        "cache pages read, training); the cache's size on disk (float16) and its one-off build time, wall and "
        "CPU (`cached`: read from an earlier row's build).",
        "",
        cost.to_markdown(index=False) if not cost.empty else "(no rows yet)",
        "",
    ]
    save_results("her2st_adapted", lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    for name, func in (("run", run), ("row", row)):
        step = steps.add_parser(name)
        if name == "run":
            step.add_argument("--methods", default="chrep,stnet")
            step.add_argument("--seeds", default="0")
        else:
            step.add_argument("--method", required=True)
            step.add_argument("--seed", type=int, default=0)
        step.add_argument("--trainable-blocks", type=int, default=1)
        step.add_argument("--views", type=int, default=8)
        step.add_argument("--stain-copies", type=int, default=0)
        step.add_argument("--epochs", type=int, default=10)
        step.add_argument("--params", default="{}", help="method settings as a JSON object")
        step.add_argument("--label", default="", help="method name of the rows (with --params)")
        step.set_defaults(func=func)
    steps.add_parser("report").set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
