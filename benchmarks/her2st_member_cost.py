"""her2st, leave-one-slide-out: where one ensemble member's training goes, and cheaper members at the same accuracy.

Run on demand (needs $HISTO2EXPR_HER2ST and the cached views of ``her2st_features.py``):

    python benchmarks/her2st_member_cost.py --threads 1 profile --methods nh2st,cmrcnet,bleep,stnet
    python benchmarks/her2st_member_cost.py --threads 1 profile --methods chrep --profile-epochs 1
    python benchmarks/her2st_features.py --threads 1 run --settings f1:4+nbr6 --methods nh2st --seeds 0,1,2 \\
        --params '{"ensemble": 3, "patience": 3}' --label "nh2st (ensemble 3, patience 3)"
    (the same for nh2st at patience 5, and for cmrcnet and bleep at patience 3)
    python benchmarks/her2st_member_cost.py report

``profile`` fits every method once per fold (seed 0, one member, its default settings on the default
frozen features ``f1:4+nbr6``), records the epochs run and the epoch kept, and profiles the first two epochs of
every fold with ``torch.profiler``: the share of the CPU time in the kernels that read or write the
``d``-wide input (the first layer, forward and backward). ``report`` writes
benchmarks/results/her2st_member_cost.md from that and from the rows of ``her2st_features.py`` (the levers,
run with ``--params ... --label``) and ``her2st_nh2st_stability.py`` (NH2ST's ``ensemble=3`` at today's
defaults).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import pandas as pd
import torch
from _her2st import read_rows, run_step, save_results, steps_parser
from her2st_features import CACHE, ROWS, cohort, put_features
from her2st_nh2st_stability import ROWS as STABILITY_ROWS

import histo2expr as hx
from histo2expr.models import TrainConfig

SETTING = "f1:4+nbr6"
PROFILE = CACHE / "member_cost_profile.jsonl"
#: The rows compared, by the name the report gives them: (rows file, key, label, patience of the run).
#: The ``ensemble=3`` rows at today's defaults were run before (her2st_ensemble.md) and are not rerun.
COMPARED = {
    "nh2st (ensemble 3, patience 10)": (STABILITY_ROWS, "variant", "nh2st: ensemble 3", 10),
    "nh2st (ensemble 3, patience 3)": (ROWS, "method", "nh2st (ensemble 3, patience 3)", 3),
    "nh2st (ensemble 3, patience 5)": (ROWS, "method", "nh2st (ensemble 3, patience 5)", 5),
    "cmrcnet (ensemble 3, patience 10)": (ROWS, "method", "cmrcnet (ensemble 3)", 10),
    "cmrcnet (ensemble 3, patience 3)": (ROWS, "method", "cmrcnet (ensemble 3, patience 3)", 3),
    "bleep (ensemble 3, patience 10)": (ROWS, "method", "bleep (ensemble 3)", 10),
    "bleep (ensemble 3, patience 3)": (ROWS, "method", "bleep (ensemble 3, patience 3)", 3),
}
#: What the runs showed (written after them; the tables above it are computed).
READING = """\
- **Where the work goes.** Every trained method keeps an epoch early and then waits: with `patience=10`
  the epochs after the kept one are 54 % of NH2ST's training, 57 % of BLEEP's and 36 % of CMRCNet's (one of
  its folds crept to epoch 45 of 50). The first layer on the 2560-d input is not where NH2ST's or CMRCNet's
  time goes (0.18 and 0.21 of the profiled kernel time; NH2ST's steps are many small kernels: the
  neighbour branch, graphs, cross-attention, AdamW), so a cheaper input (PCA, random projection) would save
  little there and was not run; BLEEP's share is 0.29. CHRep trains twice per fold (its encoder, then the
  cheap correction: two entries per slide, `None` = its untrained weights kept) and is the exception: 0.67
  of its profiled time (one epoch per fold) is on the 2560-d input, so a per-fold reduction of the input
  is the lever to measure for CHRep (not run here).
- **NH2ST: no lever accepted.** `patience=3` halves the epochs trained (163 against 320 per run, 1.96x;
  CPU 125 s against 540 s, but the reference rows ran at a higher load: 1.1-2.1 CPU s per epoch against
  0.7-0.9) and loses 0.012 PCC(ACG) (0.2177 ± 0.0021 against 0.2299 ± 0.0044) and 0.018 HEG@50: three
  times the seed spread. `patience=5` (1.48x fewer epochs) still loses 0.0047 PCC(ACG) and 0.0057 HEG@50,
  just beyond the spread. The losses are folds where a member improves again after a plateau of 3-5
  epochs (every C slide in some seed); B4 is identical in every row (its members all stop early anyway).
- **CMRCNet: `patience=3` keeps the accuracy at 1.5x less CPU** (0.2351 ± 0.0052 against 0.2363 ± 0.0066,
  HEG@50 0.2464 against 0.2491, B4 0.142 against 0.146, all within the spread; 198 CPU s against 299 at a
  similar load; at least 126 epochs fewer, i.e. >= 1.6x): it validates a moving average of the weights
  (`average_epochs=3`), a smooth curve; 13 of 18 (slide, seed) results are unchanged.
- **BLEEP: `patience=3` keeps the accuracy** (0.2323 ± 0.0122 against 0.2310 ± 0.0141; B4 0.150 against
  0.142) with >= 1.8x fewer epochs (its kept epochs are 3-5: the validation loss turns up early), but its
  run is 40-60 CPU s and the saving was not measurable in CPU seconds on this loaded machine (51 s against 42).
- **Defaults left as they are**: no lever met "2x at unchanged accuracy" for NH2ST, the method whose
  members cost most; one shared `patience` cannot be lowered for CMRCNet and BLEEP without NH2ST's loss.
  A per-method patience (3 for CMRCNet, and BLEEP) is the measured candidate; it needs
  `fit_histo2expr(patience=None)` to mean "the method's default" and is the lead's call.
"""
#: The training configuration's maximum number of epochs.
MAX_EPOCHS = TrainConfig.epochs


class _Recorder:
    """Wraps ``train_network`` of the method modules: epochs run, epoch kept and CPU seconds of every call."""

    def __init__(self) -> None:
        import histo2expr.models.training as training

        self.original = training.train_network
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        cpu = time.process_time()
        report, device = self.original(*args, **kwargs)
        self.calls.append(
            {
                "epochs_run": len(report.train_loss),
                "best_epoch": report.best_epoch,
                "cpu_seconds": time.process_time() - cpu,
            }
        )
        return report, device

    def install(self) -> None:
        import importlib

        for name in ("layers", "chrep"):
            module = importlib.import_module(f"histo2expr.models.{name}")
            module.train_network = self


def _first_layer_share(adata, method: str, width: int, epochs: int) -> dict:
    """Profile ``epochs`` epochs (no early stopping) of one fit: CPU time of the kernels with a ``width``-wide operand."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        hx.tl.fit_histo2expr(
            adata, method=method, cv="leave_one_slide_out", genes=250, seed=0, key_added="profiled",
            progress=False, refit=False, epochs=epochs, ensemble=1,
        )  # fmt: skip
    total = first = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        if any(width in shape for shape in event.input_shapes if isinstance(shape, list)):
            first += event.self_cpu_time_total
    return {"profiled_epochs": epochs, "first_layer_share": first / total, "profiled_cpu_s": total / 1e6}


def profile_methods(args: argparse.Namespace) -> None:
    adata = cohort()
    recorder = _Recorder()
    recorder.install()
    put_features(adata, SETTING)
    for method in args.methods.split(","):
        recorder.calls.clear()
        cpu = time.process_time()
        hx.tl.fit_histo2expr(
            adata, method=method, cv="leave_one_slide_out", genes=250, seed=0, key_added="row",
            progress=False, refit=False, ensemble=1,
        )  # fmt: skip
        seconds = time.process_time() - cpu
        folds = list(adata.uns["row"]["folds"]["slide"])
        row = {
            "method": method,
            "slides": folds,
            "members": list(recorder.calls),
            "cpu_seconds": seconds,
            "width": int(adata.obsm["X_histo"].shape[1]),
        }
        row.update(_first_layer_share(adata, method, row["width"], epochs=args.profile_epochs))
        with PROFILE.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _epochs_run(best_epochs: list[str] | None, patience: int) -> int | None:
    """Epochs trained over all folds and members: early stopping ends ``patience`` epochs after the epoch kept."""
    if best_epochs is None:
        return None
    kept = [member for fold in best_epochs for member in str(fold).split("; ")]
    return sum(min(MAX_EPOCHS, (0 if k in ("None", "", "-") else int(k)) + 1 + patience) for k in kept)


def compared_rows(compared: dict[str, tuple]) -> pd.DataFrame:
    """One row per (compared run, seed, slide), with the run's CPU seconds and epochs trained.

    ``compared`` names each run: (rows file, key, label, patience of the run), as :data:`COMPARED`.
    """
    records = []
    for name, (path, key, label, patience) in compared.items():
        for row in read_rows(path):
            if (
                row.get(key) != label
                or row.get("noise", 0.0) != 0.0
                or row.get("setting", SETTING) != SETTING
            ):
                continue
            extra = {"method": name, "noise": 0.0, "seed": row["seed"], "cpu_seconds": row.get("cpu_seconds"),
                     "epochs_run": _epochs_run(row.get("best_epochs"), patience)}  # fmt: skip
            records += [{**extra, **slide} for slide in row["per_slide"]]
    return pd.DataFrame(records)


def _profile_table() -> pd.DataFrame:
    """Per method (last profile): epochs trained and kept per fold, the share after the kept one, the first layer's share."""
    rows = {row["method"]: row for row in read_rows(PROFILE)}
    table = {}
    for method, row in rows.items():
        members = row["members"]
        run = sum(m["epochs_run"] for m in members)
        kept = [m["best_epoch"] for m in members]
        after = sum(m["epochs_run"] - 1 - (m["best_epoch"] or 0) for m in members)
        table[method] = {
            "epochs run per fold": " / ".join(str(m["epochs_run"]) for m in members) or "(closed form)",
            "epoch kept": " / ".join(str(k) for k in kept),
            "share after the kept epoch": round(after / run, 2) if run else None,
            "CPU s (6 folds, 1 member)": round(row["cpu_seconds"]),
            "first layer share (profiled)": round(row["first_layer_share"], 2) if members else None,
        }
    return pd.DataFrame(table).T


def compared_tables(compared: dict[str, tuple], *, summary_title: str, per_seed_title: str) -> list[str]:
    """Report sections of the ``compared`` runs: their mean ± sd over seeds with the epochs trained, PCC(ACG)
    per held-out slide and seed, and CPU seconds and epochs trained per seed."""
    from her2st_ensemble import summary

    table = compared_rows(compared)
    per_seed = table.drop_duplicates(["method", "seed"]).set_index(["method", "seed"])
    epochs = per_seed.groupby("method")["epochs_run"].mean().round(0).rename("epochs trained")
    wide = table.pivot_table(index=["method", "seed"], columns="slide", values="pcc_acg")
    return [
        f"## {summary_title}",
        "",
        summary(table).join(epochs).to_markdown(),
        "",
        "## PCC(ACG) per held-out slide and seed",
        "",
        wide.round(4).to_markdown(),
        "",
        f"## {per_seed_title}",
        "",
        per_seed[["cpu_seconds", "epochs_run"]].round(0).to_markdown(),
        "",
    ]


def report(args: argparse.Namespace) -> None:
    lines = [
        "# her2st, leave-one-slide-out: the cost of one ensemble member, and cheaper members",
        "",
        "Command: see `benchmarks/her2st_member_cost.py` (its docstring lists the runs; the lever rows are "
        '`her2st_features.py run --settings f1:4+nbr6 --methods M --seeds 0,1,2 --params \'{"ensemble": 3, '
        '"patience": P}\' --label ...`). '
        f"Machine: {platform.machine()}, 2 cores shared with other jobs (load 3-5), no GPU, torch {torch.__version__}, "
        "one torch thread (`OMP_NUM_THREADS=1`, `--threads 1`). Data: 1193 spots, 6 sections, 250 highly expressed "
        "genes chosen on the training slides of each fold, the default frozen features `f1:4+nbr6`. CPU seconds are "
        "the process's on a loaded machine and move with the load (the three seeds of one setting, same code, "
        "range 322-739 s): the epochs trained (from the epochs kept and the patience) are the load-free measure "
        "of the work.",
        "",
        "## Where a member's training goes (seed 0, one member, default settings)",
        "",
        "Epochs run and the epoch kept (0-based) per held-out slide (B4, C2..C6); the share of the epochs run "
        "after the kept one (the early-stopping wait); the share of the profiled CPU time (first two epochs of "
        "every fold, CHRep's first one; `torch.profiler`) in kernels with an operand as wide as the 2560-d input (the first layer, "
        "forward and backward). ST-Net's frozen head is solved in closed form (no epochs).",
        "",
        _profile_table().to_markdown(),
        "",
        *compared_tables(
            COMPARED,
            summary_title="Levers at `ensemble=3` (mean ± sd over seeds)",
            per_seed_title="CPU seconds and epochs trained per seed (18 members: 6 folds x 3)",
        ),
        "The epochs trained are computed from the epochs kept (`best_epochs` of the fold records) plus the "
        "patience; the rows of CMRCNet's and BLEEP's `ensemble=3` at patience 10 were run before the rows kept "
        "them. A seed's fits are deterministic, so at patience 10 a member trains the same epochs up to where "
        "patience 3 stops it and at least 7 more: at least 18 x 7 = 126 epochs more per run.",
        "",
        "## Reading",
        "",
        READING,
    ]
    save_results("her2st_member_cost", lines)


def main() -> None:
    parser, steps = steps_parser(__doc__)
    step = steps.add_parser("profile")
    step.add_argument("--methods", default="nh2st,cmrcnet,bleep,stnet,chrep")
    step.add_argument("--profile-epochs", type=int, default=2, help="epochs per fold under torch.profiler")
    step.set_defaults(func=profile_methods)
    step = steps.add_parser("report")
    step.set_defaults(func=report)
    run_step(parser)


if __name__ == "__main__":
    main()
