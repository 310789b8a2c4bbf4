"""her2st, leave-one-slide-out: training in mixed bfloat16 on a CPU with native bfloat16 against float32.

Measured as a candidate default (``precision=None`` -> ``"bf16-mixed"`` on a CPU with AVX512-BF16 or
AMX, tried on a branch) and not adopted: the accuracy held, but training was not faster per epoch
(``benchmarks/results/bf16_training_speed.md``). This report compares each trained method's rows at its
defaults in both precisions over three seeds. Run on demand (needs $HISTO2EXPR_HER2ST and the cached
views of ``her2st_features.py``), one run at a time, on such a CPU:

    python benchmarks/her2st_features.py --threads 1 run --settings f1:4+nbr6 --methods M --seeds 0,1,2 \\
        --params '{"precision": "bf16-mixed"}' --label "M (bf16-mixed)"
    (M: chrep, cmrcnet, bleep; NH2ST's rows are labelled "nh2st (bf16-mixed probe)")
    python benchmarks/her2st_features.py --threads 1 run --settings f1:4+nbr6 --methods nh2st --seeds 0,1,2 \\
        --params '{}' --label "nh2st (fused AdamW)"
    python benchmarks/bf16_training.py report

The float32 rows of CHRep, CMRCNet and BLEEP are those of ``her2st_patience.py`` ("M (fused AdamW)", at
today's defaults, float32). ``report`` writes benchmarks/results/bf16_training.md.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _her2st import report_only_main, save_results
from her2st_features import ROWS
from her2st_member_cost import compared_tables

from histo2expr.models import get_method

#: The label of each method's float32 rows and of its bfloat16 rows in the shared cache of her2st_features.py.
LABELS = {
    "chrep": ("chrep (fused AdamW)", "chrep (bf16-mixed)"),
    "cmrcnet": ("cmrcnet (fused AdamW)", "cmrcnet (bf16-mixed)"),
    "bleep": ("bleep (fused AdamW)", "bleep (bf16-mixed)"),
    "nh2st": ("nh2st (fused AdamW)", "nh2st (bf16-mixed probe)"),
}
#: The runs compared, by the name the report gives them: (rows file, key, label, patience of the run).
COMPARED = {
    f"{method} ({precision})": (ROWS, "method", label, get_method(method).default_patience)
    for method, labels in LABELS.items()
    for precision, label in zip(("32-true", "bf16-mixed"), labels, strict=True)
}


def report(args: argparse.Namespace) -> None:
    lines = [
        "# her2st, leave-one-slide-out: mixed bfloat16 training on the CPU against float32",
        "",
        "Command: see `benchmarks/bf16_training.py` (its docstring lists the runs), then "
        "`python benchmarks/bf16_training.py report`. "
        f"Machine: {platform.machine()} with AMX and AVX512-BF16, 2 cores shared with other jobs, no GPU, torch "
        f"{torch.__version__}, one torch thread (`OMP_NUM_THREADS=1`, `--threads 1`). Data: 1193 spots, 6 sections, "
        "250 highly expressed genes chosen on the training slides of each fold, the default frozen features "
        "`f1:4+nbr6`, every method at its defaults (NH2ST an ensemble of three, the others one fit). CPU seconds "
        "are the process's on a loaded machine, made in different sessions for the float32 rows of CHRep, CMRCNet "
        "and BLEEP: the back-to-back times are in `bf16_training_speed.md`.",
        "",
        *compared_tables(
            COMPARED,
            summary_title="Mean over held-out slides (mean ± sd over seeds)",
            per_seed_title="CPU seconds and epochs trained per seed (6 folds)",
        ),
    ]
    save_results("bf16_training", lines)


if __name__ == "__main__":
    report_only_main(__doc__, report)
