"""her2st, leave-one-slide-out: each trained method's own early-stopping patience (``Method.default_patience``).

Run on demand (needs $HISTO2EXPR_HER2ST and the cached views of ``her2st_features.py``), one run at a time:

    python benchmarks/her2st_features.py --threads 1 run --settings f1:4+nbr6 --methods chrep --seeds 0,1,2 \\
        --params '{"patience": 3}' --label "chrep (patience 3)"
    (the same for chrep at patience 5 and 10, cmrcnet at 3, 5 and 10, bleep at 3 and 10)
    python benchmarks/her2st_patience.py report

Every method at its other defaults (one fit: ``ensemble=1`` is CHRep's, CMRCNet's and BLEEP's default) on
the default frozen features ``f1:4+nbr6``, three seeds. The rule, the same for every method: its default
patience is the smallest patience measured whose mean PCC(ACG) and PCC(HEG@50) over the seeds stay within
the seed spread (one s.d.) of patience 10, with clearly fewer epochs trained. NH2ST keeps 10: at
``ensemble=3`` (its default) patience 3 and 5 lost accuracy (``her2st_member_cost.md``). ``report`` writes
benchmarks/results/her2st_patience.md.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _her2st import run_step, save_results, steps_parser
from her2st_features import ROWS
from her2st_member_cost import compared_tables

#: The runs compared, by the name the report gives them: (rows file, key, label, patience of the run).
COMPARED = {
    f"{method} (patience {patience})": (ROWS, "method", f"{method} (patience {patience})", patience)
    for method, patiences in {"chrep": (10, 5, 3), "cmrcnet": (10, 5, 3), "bleep": (10, 3)}.items()
    for patience in patiences
}
#: What the runs showed (written after them; the tables above it are computed).
READING = """\
(to be written after the runs)
"""


def report(args: argparse.Namespace) -> None:
    lines = [
        "# her2st, leave-one-slide-out: each method's own early-stopping patience",
        "",
        "Command: `HISTO2EXPR_HER2ST=... OMP_NUM_THREADS=1 python benchmarks/her2st_features.py --threads 1 run "
        '--settings f1:4+nbr6 --methods M --seeds 0,1,2 --params \'{"patience": P}\' --label "M (patience P)"`, '
        "one run at a time, then `python benchmarks/her2st_patience.py report`. "
        f"Machine: {platform.machine()}, 2 cores shared with other jobs, no GPU, torch {torch.__version__}, one "
        "torch thread (`OMP_NUM_THREADS=1`, `--threads 1`). Data: 1193 spots, 6 sections, 250 highly expressed "
        "genes chosen on the training slides of each fold, the default frozen features `f1:4+nbr6`, every method "
        "at its other defaults (one fit). CPU seconds are the process's on a loaded machine and move with the "
        "load; the epochs trained (from the epochs kept, `best_epochs`, and the patience; CHRep: its "
        "representation, not the cheap correction) are the load-free measure of the work.",
        "",
        *compared_tables(
            COMPARED,
            summary_title="Mean over held-out slides (mean ± sd over seeds)",
            per_seed_title="CPU seconds and epochs trained per seed (6 folds, one member)",
        ),
        "## Reading",
        "",
        READING,
    ]
    save_results("her2st_patience", lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    steps.add_parser("report").set_defaults(func=report)
    run_step(parser)


if __name__ == "__main__":
    main()
