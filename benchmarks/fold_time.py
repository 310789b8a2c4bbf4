"""The time of one frozen-regime fold per method on her2st: fit on five sections, predict the sixth.

Run on demand (needs ../shared/data/her2st or $HISTO2EXPR_HER2ST):

    python benchmarks/fold_time.py [--methods ridge,stnet,bleep,chrep,cmrcnet,nh2st] [--holdout B4]
        [--genes 250] [--threads 1] [--repeats 1]

One leave-one-slide-out fold, the way ``fit_histo2expr`` runs it: 250 highly expressed genes chosen
on the five training sections, the targets standardised with their statistics, an inner validation
section for early stopping, the method's defaults (at most 50 epochs), then the held-out section
predicted. The frozen EfficientNet-Lite0 features come from the cached embedded cohort (embedding
is not timed here; see embedding_throughput.py). Fit and predict are timed apart; the median of
``--repeats`` runs is reported. Writes benchmarks/results/fold_time.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
import torch
from _her2st import HERE, embedded_her2st

from histo2expr._benchmark import machine_description
from histo2expr.models import TrainConfig, get_method
from histo2expr.tl._data import coordinates, frozen_inputs
from histo2expr.tl._fit import _fit_on, _Inputs


def one_fold(adata, method: str, holdout: str, genes: int) -> tuple[float, float, int]:
    """Seconds to fit ``method`` on every section but ``holdout`` and to predict ``holdout``; epochs run.

    The fold is fitted by the code ``fit_histo2expr`` runs for each fold (gene choice, target
    standardisation, inner validation split and fit, training spots only).
    """
    slides = adata.obs["slide"].astype(str).to_numpy()
    takes_tokens = getattr(get_method(method), "token_input", False)
    features, _ = frozen_inputs(adata, "X_histo", tokens=takes_tokens, method=method)
    inputs = _Inputs(adata, slides, coordinates(adata), features, None)
    train, test = np.flatnonzero(slides != holdout), np.flatnonzero(slides == holdout)
    config = TrainConfig(accelerator="cpu", progress=False)
    tic = time.perf_counter()
    fitted = _fit_on(
        inputs,
        train,
        method=method,
        method_params={},
        genes=genes,
        gene_flavor="heg",
        slide_key="slide",
        config=config,
    )
    fit_done = time.perf_counter()
    fitted.method.predict(inputs.spots(test))
    return fit_done - tic, time.perf_counter() - fit_done, len(fitted.reports[0].train_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ridge,stnet,bleep,chrep,cmrcnet,nh2st")
    parser.add_argument("--holdout", default="B4")
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata, _ = embedded_her2st(tokens=3)  # pooled features, and the 3 x 3 tokens of methods that take them
    rows = []
    for method in args.methods.split(","):
        runs = [one_fold(adata, method, args.holdout, args.genes) for _ in range(args.repeats)]
        fit_s, predict_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append({"method": method, "fit s": fit_s, "predict s": predict_s, "epochs run": runs[0][2]})
        print(rows[-1], flush=True)
    machine = machine_description()
    n_train = int((adata.obs["slide"] != args.holdout).sum())
    text = "\n".join(
        [
            "# One frozen-regime fold per method (her2st)",
            "",
            f"Command: `python benchmarks/fold_time.py --methods {args.methods} --holdout {args.holdout} "
            f"--genes {args.genes} --threads {args.threads} --repeats {args.repeats}`",
            "",
            f"Machine: {machine['cpu_cores']} CPU cores shared with other jobs, no GPU, torch {machine['torch']} "
            f"with {args.threads} thread(s). Fold: {n_train} training spots on five sections (one of them the "
            f"inner validation section), {args.holdout} predicted; {args.genes} genes; frozen EfficientNet-Lite0 "
            "features (1280; 3 x 3 tokens for cmrcnet); each method's defaults, at most 50 epochs with early stopping.",
            "",
            pd.DataFrame(rows).round(2).to_markdown(index=False),
            "",
        ]
    )
    print(text)
    (HERE / "results" / "fold_time.md").write_text(text)


if __name__ == "__main__":
    main()
