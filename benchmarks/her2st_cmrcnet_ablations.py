"""CMRCNet on her2st (leave-one-slide-out, frozen EfficientNet-Lite0 tokens): k = 50 / 500 and the ablation rows.

Rows of the paper's Table 5 (mask rate, MSE vs cosine reconstruction loss, image vs expression
target, reconstruction off) and its two retrieval settings (top 50 / top 500), next to "bleep" on
the pooled features, from the same run on identical folds and genes. CMRCNet reads the 3 x 3 token
grids of ``hx.tl.embed_patches(..., tokens=3)``. Run on demand (needs her2st):

    python benchmarks/her2st_cmrcnet_ablations.py [--genes 250] [--seed 0] [--threads 1]

Writes benchmarks/results/her2st_cmrcnet_ablations.md with the exact numbers printed.
"""

from __future__ import annotations

import time

from _her2st import ablation_parser, embedded_her2st, parse_ablation_args, run_rows, write_report

TOKENS = 3
ROWS = {
    "bleep": {"method": "bleep"},
    "cmrcnet (k=50)": {"method": "cmrcnet"},
    "cmrcnet (k=500)": {"method": "cmrcnet", "top_k": 500},
    "mask 0.3": {"method": "cmrcnet", "mask_rate": 0.3},
    "mask 0.7": {"method": "cmrcnet", "mask_rate": 0.7},
    "cosine reconstruction loss": {"method": "cmrcnet", "reconstruction_loss": "cosine"},
    "expression as the target": {"method": "cmrcnet", "reconstruction_target": "expression"},
    "reconstruction off (contrastive only)": {"method": "cmrcnet", "reconstruction": False},
}


def main() -> None:
    args = parse_ablation_args(ablation_parser(__doc__))
    start = time.perf_counter()
    adata, embed_s = embedded_her2st(tokens=TOKENS)
    rows = {name: {**params, "refit": False} for name, params in ROWS.items()}
    means, per_slide = run_rows(adata, rows, genes=args.genes, seed=args.seed)
    write_report(
        "her2st_cmrcnet_ablations",
        title="CMRCNet on her2st: k = 50 / 500 and ablations (leave-one-slide-out, frozen EfficientNet-Lite0)",
        command=(
            f"OMP_NUM_THREADS=1 python benchmarks/her2st_cmrcnet_ablations.py --genes {args.genes} "
            f"--seed {args.seed} --threads {args.threads}"
        ),
        setting=(
            f"Data: {adata.n_obs} spots, 6 slides; 224 px patches at native 0.69 um/px; pooled features and "
            f"{TOKENS} x {TOKENS} token grids of the last feature map (`embed_patches(tokens={TOKENS})`); "
            f"{args.genes} highly expressed genes chosen on the training slides of each fold; every row uses the "
            "same folds and gene rule; MSE / MAE in the standardised space of the training slides; CMRCNet "
            "defaults otherwise (mask 0.5, MSE, image target, k = 50), fit_histo2expr's training defaults "
            "(AdamW lr 1e-3, batch 64, <= 50 epochs, patience 10), no refit on all slides. "
            f"Embedding (features and tokens) took {embed_s:.0f} s."
        ),
        means=means,
        per_slide=per_slide,
        start=start,
    )


if __name__ == "__main__":
    main()
