"""The cost of ridge's penalty choice against the number of training slides.

Run on demand (no data needed):

    python benchmarks/ridge_inner_folds.py [--slides 5,10,20,40] [--spots 400] [--features 512]
        [--genes 250] [--threads 1]

Fits ``RidgeRegressor`` (the model of ``method="ridge"``) on synthetic frozen features of
``--slides`` slides of ``--spots`` spots each and counts the eigendecompositions it makes (one per
inner fold, plus the final fit) and the seconds the fit takes. The penalty is chosen on at most five
grouped inner folds, so both stay flat beyond five slides; an inner leave-one-slide-out would make one
decomposition per slide (and one cross-validation of n slides n * (n - 1) + n of them). Writes
benchmarks/results/ridge_inner_folds.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histo2expr._benchmark import machine_description
from histo2expr.models import ridge

HERE = Path(__file__).resolve().parent


def fit_cost(n_slides: int, spots: int, features: int, genes: int) -> tuple[int, float]:
    """Eigendecompositions made and seconds taken by one ridge fit on ``n_slides`` slides."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_slides * spots, features))
    y = x[:, :genes] @ rng.standard_normal((genes, genes)) * 0.1 + rng.standard_normal((len(x), genes))
    slides = np.repeat([f"s{i}" for i in range(n_slides)], spots)
    calls = []
    spectrum = ridge._spectrum
    ridge._spectrum = lambda matrix: calls.append(1) or spectrum(matrix)
    try:
        tic = time.perf_counter()
        ridge.RidgeRegressor().fit(x, y, slides)
        seconds = time.perf_counter() - tic
    finally:
        ridge._spectrum = spectrum
    return len(calls), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default="5,10,20,40")
    parser.add_argument("--spots", type=int, default=400)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n_slides in (int(n) for n in args.slides.split(",")):
        decompositions, seconds = fit_cost(n_slides, args.spots, args.features, args.genes)
        rows.append(
            {"training slides": n_slides, "decompositions": decompositions, "fit seconds": round(seconds, 2)}
        )
        print(rows[-1])
    machine = machine_description()
    text = "\n".join(
        [
            "# Ridge: cost of the penalty choice against the number of training slides",
            "",
            f"`python benchmarks/ridge_inner_folds.py --slides {args.slides} --spots {args.spots} --features "
            f"{args.features} --genes {args.genes} --threads {args.threads}` on {machine['cpu_cores']} CPU cores "
            f"(shared), {machine['platform']}.",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
            "One fit of `RidgeRegressor` on synthetic features; `decompositions` counts the eigendecompositions "
            "(inner folds + the final fit). At most five grouped inner folds: flat beyond five slides.",
            "",
        ]
    )
    (HERE / "results" / "ridge_inner_folds.md").write_text(text)


if __name__ == "__main__":
    main()
