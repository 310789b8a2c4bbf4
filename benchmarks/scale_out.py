"""Scale-out on this machine: seconds per training epoch with one process and with two DDP processes (CPU, gloo).

Writes ``benchmarks/results/scale_out.md``. For every setting a worker process runs
``hx.tl.fit_histo2expr`` for ``epochs`` epochs (early stopping off) after a warm-up fit of one
epoch, with a Lightning callback added to every trainer that notes the wall time at the start of
each training epoch and at the end of the fit. The seconds per epoch are the median of the epochs'
durations (training and validation, start to start), so process start-up, DDP set-up, gene choice
and the method's fixed costs (galleries, calibration) stay out, and a load spike on a shared
machine moves one epoch, not the number. Settings:

- one process with one thread, one process with two threads, two DDP processes of one thread each
  (``accelerator="cpu", devices=2, strategy="ddp"``, gloo), with ``batch_size`` 64 and 32 per
  process respectively (the same 64 spots per step);
- frozen her2st features (``benchmarks/_her2st.py``) for ``stnet`` (a linear head trained by AdamW,
  ``closed_form=False``: little compute per step; by default it is solved in closed form, without epochs) and ``chrep`` (its representation and correction phases), and the end-to-end regime
  (``stnet`` training a random ResNet-18 on 64 px patches of a synthetic cohort: compute-bound).

With ``--part embedding`` (or ``all``) it measures the cohort embedding of ``histo2expr embed`` as well
and writes ``benchmarks/results/scale_out_embedding.md``: the six her2st sections, each in an
.h5ad file of its own, embedded with ImageNet EfficientNet-Lite0 at 224 px by one process with one
thread, one process with two threads, and two processes of one thread each (``--accelerator cpu
--devices 2``: Lightning starts the second process, each embeds every second slide). Spots per
second count the embedding work (from the command's last line: the first process's time from its
start of work to the end of the last slide of either process), not the start-up; the command's whole
wall time is given beside it.

Usage: ``HISTO2EXPR_HER2ST=/path/to/her2st python benchmarks/scale_out.py [--part training|embedding|all]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _her2st import DATA, HERE, embedded_her2st

import histo2expr as hx
from histo2expr._benchmark import machine_description

#: ``(name, method, regime, epochs)`` of the settings measured.
SETTINGS = (
    ("stnet, frozen her2st", "stnet", "frozen", 30),
    ("chrep, frozen her2st", "chrep", "frozen", 8),
    ("stnet, end to end (ResNet-18, 64 px, synthetic)", "stnet", "end2end", 3),
)
#: ``(label, processes, threads per process)``.
LAYOUTS = (
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 DDP processes x 1 thread", 2, 1),
)


def cohort(regime: str):
    """The data of a setting: embedded her2st (frozen) or a synthetic cohort of four slides (end to end)."""
    if regime == "frozen":
        return embedded_her2st()[0]
    adata = hx.datasets.synthetic(n_slides=4, seed=0, spots_per_side=12, n_genes=100)
    hx.pp.normalize(adata)
    return adata


class EpochClock:
    """Notes the wall time at the start of every training epoch and at the end of the fit (a Lightning callback)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())


def clock_every_trainer() -> list:
    """From now on every Lightning trainer carries an :class:`EpochClock`; the list they are added to."""
    import lightning
    from lightning.pytorch.callbacks import Callback

    clock_class = type("EpochClockCallback", (EpochClock, Callback), {})
    clocks = []
    make = lightning.Trainer.__init__

    def init(self, *args, callbacks=None, **kwargs):
        clocks.append(clock_class())
        make(self, *args, callbacks=[*(callbacks or []), clocks[-1]], **kwargs)

    lightning.Trainer.__init__ = init
    return clocks


def worker(method: str, regime: str, epochs: int, processes: int) -> None:
    """Fit ``epochs`` epochs after a warm-up; the first process prints the median seconds per epoch as JSON."""
    import numpy as np
    from lightning.pytorch.utilities import rank_zero_only

    adata = cohort(regime)
    options = {
        "method": method,
        "genes": 250 if regime == "frozen" else 50,
        "batch_size": 64 // processes,
        "accelerator": "cpu",
        "devices": processes,
        "strategy": "ddp" if processes > 1 else "auto",
        "progress": False,
    }
    if method == "stnet":
        options["closed_form"] = False  # train the linear head by AdamW, epoch by epoch
    if regime == "end2end":
        options.update(use_rep=None, patch_size=64, encoder="resnet18", weights=None)

    clocks = clock_every_trainer()
    hx.tl.fit_histo2expr(adata.copy(), epochs=1, patience=1, **options)  # warm-up: imports, the process group
    clocks.clear()
    tic = time.perf_counter()
    hx.tl.fit_histo2expr(adata.copy(), epochs=epochs, patience=epochs, **options)
    seconds = time.perf_counter() - tic
    durations = np.concatenate([np.diff(clock.starts) for clock in clocks if len(clock.starts) > 1])
    if rank_zero_only.rank == 0:
        print(
            json.dumps(
                {
                    "seconds_per_epoch": float(np.median(durations)),
                    "fastest_epoch": float(durations.min()),
                    "slowest_epoch": float(durations.max()),
                    "epochs_timed": len(durations),
                    "fit_seconds": seconds,
                }
            )
        )


def measure(method: str, regime: str, epochs: int, processes: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, regime, str(epochs), str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def her2st_slide_files(folder: Path) -> list[Path]:
    """Each her2st section in an .h5ad file of its own (written once into ``folder``)."""
    from histo2expr._cache import atomic_path

    if not list(folder.glob("*.h5ad")):
        folder.mkdir(parents=True, exist_ok=True)
        adata = hx.io.read_legacy_st(DATA)
        for slide in adata.obs["slide"].cat.categories:
            part = adata[adata.obs["slide"] == slide].copy()
            part.uns["spatial"] = {slide: adata.uns["spatial"][slide]}
            with atomic_path(folder / f"{slide}.h5ad") as tmp:
                part.write_h5ad(tmp)
    return sorted(folder.glob("*.h5ad"))


#: A per-slide line and the last line of ``histo2expr embed``.
_SLIDE_LINE = re.compile(r"\((?:\d+/\d+)(?:, process (\d)/\d)?\): (\d+) spots in ([\d.]+) s")
_TOTAL_LINE = re.compile(r"(\d+) slides: (\d+) written.* in ([\d.]+) s \(")


def embed_run(files: list[Path], out: Path, processes: int, threads: int) -> dict:
    """``histo2expr embed`` of ``files`` into ``out`` (emptied first); spots, work seconds, wall seconds, per-process busy seconds."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "histo2expr.cli", "embed", *map(str, files), "--out", str(out),
               "--encoder", "efficientnet_lite0", "--weights", "imagenet", "--patch-size", "224",
               "--accelerator", "cpu", "--devices", str(processes)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    tic = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    busy: dict[int, float] = {}
    spots = 0
    for rank, n_spots, seconds in _SLIDE_LINE.findall(done.stdout):
        busy[int(rank or 1)] = busy.get(int(rank or 1), 0.0) + float(seconds)
        spots += int(n_spots)
    total = _TOTAL_LINE.search(done.stdout)
    return {"spots": spots, "work_seconds": float(total.group(3)), "wall_seconds": wall, "busy": busy}


def _header(title: str, part: str, machine: dict) -> list[str]:
    """A report's title, command and machine lines."""
    return [
        f"# {title}",
        "",
        f"Command: `python benchmarks/scale_out.py --part {part}`",
        "",
        f"Machine: {machine['cpu_cores']} CPU cores (shared with other jobs), torch {machine['torch']}, "
        f"Python {machine['python']}, {machine['platform']}.",
    ]


def embedding_report(machine: dict) -> str:
    """Embed the her2st sections with each layout; the markdown report."""
    from histo2expr._cache import cache_dir

    files = her2st_slide_files(cache_dir("benchmarks") / "her2st_slides")
    out = cache_dir("benchmarks") / "scale_out_embedding"
    rows = []
    for label, processes, threads in LAYOUTS:
        run = embed_run(files, out, processes, threads)
        busy = run["busy"]
        rows.append(
            {
                "layout": label,
                "spots / s": run["spots"] / run["work_seconds"],
                "embedding s": run["work_seconds"],
                "command wall s": run["wall_seconds"],
                "busy s per process": " / ".join(f"{busy[rank]:.1f}" for rank in sorted(busy)),
            }
        )
        print(label, f"{rows[-1]['spots / s']:.1f} spots/s", flush=True)
    base = rows[0]["spots / s"]
    for row in rows:
        row["speed-up"] = row["spots / s"] / base
    n_spots = run["spots"]
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f")
    return "\n".join(
        [
            *_header("Scale-out: cohort embedding throughput, 1 vs 2 processes", "embedding", machine),
            "",
            f"Data: the {len(files)} her2st sections ({n_spots} spots), one .h5ad file each; `histo2expr embed` with "
            "ImageNet EfficientNet-Lite0, 224 px patches at the slides' native resolution, batch size 64.",
            "",
            "Spots per second of embedding work (start-up excluded; the speed-up is over one process with one "
            "thread), the command's whole wall time, and the seconds each process spent on its slides:",
            "",
            table,
            "",
        ]
    )


def training_report(machine: dict) -> str:
    """Seconds per training epoch with each layout; the markdown report."""
    embedded_her2st()  # embed (or read the cache) once, before the workers read it
    rows = []
    for name, method, regime, epochs in SETTINGS:
        row = {"setting": name}
        loads = []
        for label, processes, threads in LAYOUTS:
            row[label] = measure(method, regime, epochs, processes, threads)["seconds_per_epoch"]
            loads.append(f"{os.getloadavg()[0]:.1f}")
            print(name, label, f"{row[label]:.3f} s/epoch", flush=True)
        row["2 threads / 1 thread"] = row[LAYOUTS[0][0]] / row[LAYOUTS[1][0]]
        row["2 processes / 1 thread"] = row[LAYOUTS[0][0]] / row[LAYOUTS[2][0]]
        row["load average after each layout"] = " / ".join(loads)
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
    return "\n".join(
        [
            *_header("Scale-out: seconds per training epoch, 1 vs 2 processes", "training", machine),
            "",
            __doc__.split("\n\n", 1)[1].split("With ``--part embedding``")[0].strip(),
            "",
            "Seconds per epoch (lower is better), the speed-ups over one process with one thread, and the "
            "1-minute load average of the machine after each layout's measurement (`os.getloadavg`):",
            "",
            table,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "REGIME", "EPOCHS", "PROCESSES"))
    parser.add_argument("--part", choices=("training", "embedding", "all"), default="all")
    args = parser.parse_args()
    if args.worker:
        method, regime, epochs, processes = args.worker
        worker(method, regime, int(epochs), int(processes))
        return
    machine = machine_description()
    reports = {
        "training": ("scale_out.md", training_report),
        "embedding": ("scale_out_embedding.md", embedding_report),
    }
    for part, (name, report) in reports.items():
        if args.part in (part, "all"):
            text = report(machine)
            (HERE / "results" / name).write_text(text, encoding="utf-8")
            print(text)


if __name__ == "__main__":
    main()
