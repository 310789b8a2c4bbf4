"""NH2ST on her2st (leave-one-slide-out, frozen EfficientNet-Lite0): full model and the ablation rows.

Rows of the paper's Table 2 (branch construction: neighbour branch, cross-attention, contrastive
learning, plain graph instead of hypergraph; K nearest patches; L hypergraph layers), next to ridge
and stnet from the same code, on identical folds and genes. Run on demand (needs her2st):

    python benchmarks/her2st_nh2st_ablations.py [--genes 250] [--seed 0] [--threads 1] [--rows all]

Writes benchmarks/results/her2st_nh2st_ablations.md (``--rows branches`` / ``sweep``: with that
suffix) with the exact numbers printed, rewritten after every row.
"""

from __future__ import annotations

import time

import pandas as pd
from _her2st import ablation_parser, embedded_her2st, parse_ablation_args, run_rows, write_report

BRANCH_ROWS = {
    "ridge": {"method": "ridge"},
    "stnet": {"method": "stnet"},
    "nh2st (full: K=8, L=2, hypergraph)": {"method": "nh2st"},
    "T2: query branch only (neighbour off)": {"method": "nh2st", "neighbour_branch": False},
    "T2: cross-attention off": {"method": "nh2st", "cross_attention": False},
    "T2: contrastive off (MSE only)": {"method": "nh2st", "contrastive": False},
    "T2: plain graph": {"method": "nh2st", "graph": "graph"},
}
SWEEP_ROWS = {
    "K=4": {"method": "nh2st", "n_neighbours": 4},
    "L=1": {"method": "nh2st", "n_layers": 1},
    "L=3": {"method": "nh2st", "n_layers": 3},
    "K=16": {"method": "nh2st", "n_neighbours": 16},
    "L=4": {"method": "nh2st", "n_layers": 4},
    "K=25": {"method": "nh2st", "n_neighbours": 25},
}
GROUPS = {"all": {**BRANCH_ROWS, **SWEEP_ROWS}, "branches": BRANCH_ROWS, "sweep": SWEEP_ROWS}


def main() -> None:
    parser = ablation_parser(__doc__)
    parser.add_argument(
        "--rows",
        choices=sorted(GROUPS),
        default="all",
        help="all rows, or one group (to run the groups side by side; K=8 / L=2 is the full row of 'branches')",
    )
    args = parse_ablation_args(parser)
    start = time.perf_counter()
    adata, embed_s = embedded_her2st()
    name = "her2st_nh2st_ablations" + ("" if args.rows == "all" else f"_{args.rows}")
    means, per_slide = pd.DataFrame(), pd.DataFrame()
    for row, params in GROUPS[args.rows].items():  # the report is rewritten after every row
        row_means, row_slides = run_rows(adata, {row: params}, genes=args.genes, seed=args.seed)
        means, per_slide = pd.concat([means, row_means]), pd.concat([per_slide, row_slides], axis=1)
        report(name, args, adata, embed_s, means, per_slide, start)


def report(name, args, adata, embed_s, means, per_slide, start) -> None:
    """Write the rows run so far."""
    write_report(
        name,
        title="NH2ST on her2st: full model and ablations (leave-one-slide-out, frozen EfficientNet-Lite0)",
        command=(
            f"python benchmarks/her2st_nh2st_ablations.py --genes {args.genes} --seed {args.seed} "
            f"--threads {args.threads} --rows {args.rows}"
        ),
        setting=(
            f"Data: {adata.n_obs} spots, 6 slides; 224 px patches at native 0.69 um/px; {args.genes} highly "
            "expressed genes chosen on the training slides of each fold; every row uses the same folds and gene "
            "rule; MSE / MAE in the standardised space of the training slides; NH2ST defaults otherwise "
            "(embedding 256, AdamW lr 1e-3, batch 64, at most 50 epochs, early stopping on the translator's MSE "
            "on an inner validation slide). Seconds include the refit on all six slides and depend on the load of "
            "the shared machine. "
            f"Embedding took {embed_s:.0f} s."
        ),
        means=means,
        per_slide=per_slide,
        start=start,
    )


if __name__ == "__main__":
    main()
