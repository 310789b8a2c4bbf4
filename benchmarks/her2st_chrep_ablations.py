"""CHRep on her2st (leave-one-slide-out, frozen EfficientNet-Lite0): full model and the ablation rows.

Rows of the paper's Table 2 (calibration) and Table 3 (representation losses), next to ridge and
bleep from the same run, on identical folds and genes. Run on demand (needs her2st):

    python benchmarks/her2st_chrep_ablations.py [--genes 250] [--seed 0] [--threads 1]

Writes benchmarks/results/her2st_chrep_ablations.md with the exact numbers printed.
"""

from __future__ import annotations

import time

from _her2st import ablation_parser, embedded_her2st, parse_ablation_args, run_rows, write_report

ROWS = {
    "ridge": {"method": "ridge"},
    "bleep": {"method": "bleep"},
    "chrep (full)": {"method": "chrep"},
    "T2: estimate only": {"method": "chrep", "calibration": "estimate"},
    "T2: correction only": {"method": "chrep", "calibration": "correction"},
    "T2: estimate + correction, no constraint": {"method": "chrep", "calibration": "estimate+correction"},
    "T3: regression + contrastive": {"method": "chrep", "losses": ("regression", "contrastive")},
    "T3: regression + topology": {"method": "chrep", "losses": ("regression", "topology")},
    "T3: contrastive + topology": {"method": "chrep", "losses": ("contrastive", "topology")},
}


def main() -> None:
    args = parse_ablation_args(ablation_parser(__doc__))
    start = time.perf_counter()
    adata, embed_s = embedded_her2st()
    means, per_slide = run_rows(adata, ROWS, genes=args.genes, seed=args.seed)
    write_report(
        "her2st_chrep_ablations",
        title="CHRep on her2st: full model and ablations (leave-one-slide-out, frozen EfficientNet-Lite0)",
        command=(
            f"python benchmarks/her2st_chrep_ablations.py --genes {args.genes} --seed {args.seed} "
            f"--threads {args.threads}"
        ),
        setting=(
            f"Data: {adata.n_obs} spots, 6 slides; 224 px patches at native 0.69 um/px; {args.genes} highly "
            "expressed genes chosen on the training slides of each fold; every row uses the same folds and gene "
            "rule; MSE / MAE in the standardised space of the training slides; CHRep defaults otherwise. "
            f"Embedding took {embed_s:.0f} s."
        ),
        means=means,
        per_slide=per_slide,
        start=start,
    )


if __name__ == "__main__":
    main()
