"""The papers' end-to-end regime on her2st: every method trains its encoder, leave-one-slide-out, on one GPU.

Every method that supports the end-to-end regime (``Method.regimes``) trains its ImageNet
EfficientNet-Lite0 together with its own heads and losses on augmented 224 px patches, one
held-out slide at a time, with the protocol of the frozen benchmark (``histo2expr benchmark``):
per fold, ``hx.tl.fit_histo2expr(training slides, use_rep=None)`` chooses the 250 genes on the
training slides, standardises them and early-stops on an inner validation slide, and
``hx.tl.evaluate_expression(held-out slide, model)`` scores the held-out slide as
cross-validation does.

The methods run as concurrent processes on the one GPU (``--parallel``), each with its own
DataLoader workers (``--workers``), so the GPU is kept busy while the CPUs augment patches. Each
fold's result is appended to ``folds.jsonl`` as soon as it ends, and ``results.md`` /
``results.json`` are rewritten from it, so a run stopped at any time keeps its finished folds.
After ``--budget-s`` seconds no new fold starts; a method still running ``--grace-s`` seconds
later is stopped, and the report is marked partial. A method that fails logs its traceback to
``log.txt`` and the others go on.

Writes into ``--out``: ``folds.jsonl``, ``results.md``, ``results.json``, ``log.txt``.

CPU rehearsal (two folds, two epochs, 64 px, 20 genes)::

    HISTO2EXPR_HER2ST=../shared/data/her2st python benchmarks/her2st_end2end.py --tiny --out /tmp/e2e

On the GPU machine, from the repository root, after ``benchmarks/stage_end2end_gpu.sh`` filled
``.gpu/`` (carry ``.gpu``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/her2st_end2end.py --data .gpu/her2st --out $OUT --budget-s 300 --grace-s 45
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("HISTO2EXPR_HER2ST", HERE.parent.parent / "shared" / "data" / "her2st"))
FOLDS, LOG = "folds.jsonl", "log.txt"
#: Settings of --tiny (the CPU rehearsal): two held-out slides, two epochs, small patches, few genes.
TINY = {"folds": 2, "epochs": 2, "patience": 2, "patch_size": 64, "genes": 20, "batch_size": 32, "workers": 1}
#: Method parameters of --tiny: NH2ST flattens a 7 x 7 feature map, which 64 px patches (2 x 2) do not have.
TINY_METHOD_PARAMS = {"nh2st": {"token_grid": 2}}
#: her2st's sections, one fold each.
N_SLIDES = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the her2st folder")
    parser.add_argument("--out", type=Path, required=True, help="folder of the results (created)")
    parser.add_argument("--methods", default=None, help="comma-separated; default every end-to-end method")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (encoder and heads)")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=None, help="only the first N held-out slides")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers per method process")
    parser.add_argument("--parallel", type=int, default=None, help="method processes at a time (default all)")
    parser.add_argument("--accelerator", default="auto", help="Lightning's accelerator: auto, gpu, cpu")
    parser.add_argument(
        "--precision", default=None, help="Lightning's precision (default bf16-mixed on CUDA)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=300.0, help="no fold starts after this many seconds"
    )
    parser.add_argument("--grace-s", type=float, default=45.0, help="then stop the methods still running")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: " + json.dumps(TINY))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one method's process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() limit
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def log(out: Path | None, message: str) -> None:
    """One timestamped line on stdout and, with ``out``, appended to ``log.txt``.

    The method processes log with ``out=None``: their output already goes to ``log.txt``.
    """
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    if out is not None:
        with open(out / LOG, "a") as handle:
            handle.write(line + "\n")


def append_record(out: Path, record: dict[str, Any]) -> None:
    """Append one fold's record to ``folds.jsonl`` in one write (lines of concurrent processes never mix)."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(out / FOLDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records(out: Path) -> list[dict[str, Any]]:
    path = out / FOLDS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- one method


def run_method(args: argparse.Namespace) -> int:
    """Leave-one-slide-out of one method, fold after fold, each fold's record appended as it ends."""
    import torch

    import histo2expr as hx

    method, out, started = args.worker, None, time.time()
    hx.settings.n_threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "2")))
    cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.cuda.init()  # before the first peak-memory reset, and before DataLoader workers fork
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest convolutions
        torch.set_float32_matmul_precision("high")
    adata = hx.io.read_legacy_st(args.data)
    hx.pp.normalize(adata)
    folds = hx.splits.leave_one_slide_out(adata.obs["slide"])[: args.folds]
    for fold in folds:
        if time.time() > args.deadline:
            log(out, f"{method}: budget spent, fold {fold.name} not started")
            break
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tic = time.time()
        try:
            train, test = adata[fold.train].copy(), adata[fold.test].copy()
            model = hx.tl.fit_histo2expr(
                train,
                method=method,
                use_rep=None,
                genes=args.genes,
                patch_size=args.patch_size,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                patience=args.patience,
                seed=args.seed,
                accelerator=args.accelerator,
                devices=1,
                precision=args.precision,
                num_workers=args.workers,
                progress=False,
                encoder="efficientnet_lite0",
                **(TINY_METHOD_PARAMS.get(method, {}) if args.tiny else {}),
            )
            fit_seconds = time.time() - tic
            rows = hx.tl.evaluate_expression(test, model)
        except Exception:  # one fold's failure ends this method; the other methods go on
            log(
                out,
                f"{method}: fold {fold.name} failed after {time.time() - tic:.1f} s\n{traceback.format_exc()}",
            )
            append_record(
                args.out, {"method": method, "slide": fold.name, "error": traceback.format_exc(limit=3)}
            )
            return 1
        report = model.method.report
        record = {
            "method": method,
            "fold": fold.name,
            **rows.iloc[0].to_dict(),
            "seconds": time.time() - tic,
            "fit_seconds": fit_seconds,
            "epochs_run": len(report.train_loss),
            "best_epoch": report.best_epoch,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "device": str(model.method.device),
        }
        append_record(args.out, record)
        log(
            out,
            f"{method}: {fold.name} PCC(ACG) {record['pcc_acg']:.3f} HEG@50 {record['pcc_heg50']:.3f} in "
            f"{record['seconds']:.1f} s ({record['epochs_run']} epochs, best {record['best_epoch']}, "
            f"peak GPU {record['peak_gpu_mib'] or 0:.0f} MiB)",
        )
    log(out, f"{method}: done in {time.time() - started:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------ the parallel run


def end2end_methods() -> list[str]:
    from histo2expr.models import available_methods, get_method

    return [m for m in available_methods() if "end2end" in get_method(m).regimes]


def write_report(
    args: argparse.Namespace, methods: list[str], *, started: float, machine: dict, walls: dict[str, float]
) -> None:
    """``results.md`` and ``results.json`` from the folds recorded so far."""
    import pandas as pd

    from histo2expr._benchmark import MethodRun, results_markdown, write_results

    records = read_records(args.out)
    done = [r for r in records if "error" not in r]
    failed = {r["method"]: r["error"] for r in records if "error" in r}
    runs = []
    for method in methods:
        folds = pd.DataFrame([r for r in done if r["method"] == method])
        if folds.empty:
            continue
        peak = folds["peak_gpu_mib"].max() if folds["peak_gpu_mib"].notna().any() else None
        runs.append(
            MethodRun(method, folds, float(folds["seconds"].sum()), peak, "leave_one_slide_out", method)
        )
    n_expected = len(methods) * min(args.folds or N_SLIDES, N_SLIDES)
    status = f"PARTIAL: {len(done)} of {n_expected} folds" if len(done) < n_expected else "complete"
    preamble = [
        f"Status: **{status}**. Whole run: {time.time() - started:.0f} s on {machine['gpu'] or 'no GPU'} "
        f"(torch {machine['torch']}, {machine['cpu_cores']} CPU cores).",
        "",
        f"Command: `{' '.join(sys.argv)}`",
        "",
        f"End-to-end regime: ImageNet EfficientNet-Lite0 trained with each method's objective on "
        f"{args.patch_size} px patches (training augmentation: dihedral flips / rotations and colour jitter), "
        f"{args.epochs} epochs at most, early stopping after {args.patience} on the inner validation slide, batch "
        f"{args.batch_size}, AdamW lr {args.lr}, precision {args.precision or 'bf16-mixed on CUDA'}, seed "
        f"{args.seed}; {args.genes} highly expressed genes chosen on the training slides of each fold. "
        f"{len(methods)} method processes ({args.parallel} at a time), {args.workers} DataLoader workers each. "
        "In the tables below, `seconds` is the sum of the method's folds (fit and evaluation) and `peak MiB` the "
        "peak GPU memory torch allocated in the method's process (largest fold), not resident memory; "
        "`n/a` without a GPU. The methods shared the GPU and the CPUs, so their times are not those of a run alone.",
        "",
    ]
    if walls:
        ended = ", ".join(f"{method} {seconds:.0f} s" for method, seconds in walls.items())
        preamble += [
            f"Wall time of each method's process (start-up, data reading and every fold): {ended}.",
            "",
        ]
    if failed:
        preamble += [
            f"Failed: {', '.join(f'{m} ({e.strip().splitlines()[-1]})' for m, e in failed.items())}.",
            "",
        ]
    if not runs:
        (args.out / "results.md").write_text("\n".join(["# her2st end to end", "", *preamble]))
        return
    markdown = results_markdown(
        runs, title="her2st end to end: every method trains its encoder", preamble=preamble
    )
    columns = [
        "method",
        "slide",
        "pcc_acg",
        "pcc_heg50",
        "epochs_run",
        "best_epoch",
        "seconds",
        "peak_gpu_mib",
    ]
    per_fold = pd.DataFrame(done)[columns].round(3)
    markdown += "\n".join(["", "## Every fold", "", per_fold.to_markdown(index=False), ""])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    extra = {"status": status, "failed": failed, "per_fold": done}
    write_results(runs, args.out, markdown=markdown, settings=settings, extra=extra)


def run_all(args: argparse.Namespace) -> int:
    from histo2expr._benchmark import machine_description

    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / FOLDS).unlink(missing_ok=True)
    methods = args.methods.split(",") if args.methods else end2end_methods()
    unknown = sorted(set(methods) - set(end2end_methods()))
    if unknown:
        sys.exit(f"{unknown} do not support the end-to-end regime; choose from {end2end_methods()}.")
    cores = os.cpu_count() or 1
    args.parallel = args.parallel or len(methods)
    args.workers = args.workers if args.workers is not None else max(1, cores // args.parallel - 1)
    threads = max(1, cores // args.parallel - args.workers)
    machine = machine_description()
    log(args.out, f"start: {json.dumps(machine)}; methods {methods}; settings {vars(args)}")
    deadline = started + args.budget_s
    waiting, running = list(methods), {}
    launched, walls = {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seen = 0
    while waiting or running:
        while waiting and len(running) < args.parallel and time.time() < deadline:
            method = waiting.pop(0)
            command = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--worker",
                method,
                "--deadline",
                str(deadline),
            ]
            command += ["--workers", str(args.workers)]
            if args.folds:
                command += ["--folds", str(args.folds)]
            with open(args.out / LOG, "a") as stream:
                running[method] = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
            launched[method] = time.time()
            log(args.out, f"{method}: started (pid {running[method].pid})")
        if waiting and time.time() >= deadline:
            log(args.out, f"budget spent: {waiting} not started")
            waiting = []
        for method, process in list(running.items()):
            if process.poll() is not None:
                walls[method] = time.time() - launched[method]
                log(
                    args.out,
                    f"{method}: process ended with code {process.returncode} after {walls[method]:.0f} s",
                )
                del running[method]
            elif time.time() > deadline + args.grace_s:
                log(
                    args.out,
                    f"{method}: stopped {args.grace_s:.0f} s after the budget (a fold it had not finished is lost)",
                )
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                walls[method] = time.time() - launched[method]
                del running[method]
        records = read_records(args.out)
        if len(records) != seen:  # a fold ended: the report so far
            seen = len(records)
            write_report(args, methods, started=started, machine=machine, walls=walls)
        time.sleep(1.0)
    write_report(args, methods, started=started, machine=machine, walls=walls)
    log(args.out, f"all done in {time.time() - started:.0f} s; report in {args.out / 'results.md'}")
    return 0


def main() -> int:
    args = parse_args()
    if args.worker:
        return run_method(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
