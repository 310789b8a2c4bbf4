"""Scale-out on this machine: seconds per training epoch with one process and with two DDP processes (CPU, gloo).

Writes ``benchmarks/results/scale_out.md``. For every setting a worker process runs
``hx.tl.fit_histo2expr`` twice after a warm-up fit — once for 1 epoch and once for ``--epochs``
epochs, early stopping off — and the seconds per epoch are the difference of the two wall times
divided by the difference of epochs, so process start-up, DDP set-up, gene choice and the
method's fixed costs (galleries, calibration) drop out. Settings:

- one process with one thread, one process with two threads, two DDP processes of one thread each
  (``accelerator="cpu", devices=2, strategy="ddp"``, gloo), with ``batch_size`` 64 and 32 per
  process respectively (the same 64 spots per step);
- frozen her2st features (``benchmarks/_her2st.py``) for ``stnet`` (a linear head: little compute
  per step) and ``chrep`` (its representation and correction phases), and the end-to-end regime
  (``stnet`` training a random ResNet-18 on 64 px patches of a synthetic cohort: compute-bound).

Embedding throughput with 1 and 2 processes is measured by the cohort embedding command, with
which it will be added to this report (issue 14, item 4).

Usage: ``HISTO2EXPR_HER2ST=/path/to/her2st python benchmarks/scale_out.py``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd
from _her2st import HERE, embedded_her2st

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


def worker(method: str, regime: str, epochs: int, processes: int) -> None:
    """Fit 1 and ``epochs`` epochs after a warm-up; the first process prints the seconds per epoch as JSON."""
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
    if regime == "end2end":
        options.update(use_rep=None, patch_size=64, encoder="resnet18", weights=None)

    def fit(n: int) -> float:
        tic = time.perf_counter()
        hx.tl.fit_histo2expr(adata.copy(), epochs=n, patience=n, **options)
        return time.perf_counter() - tic

    fit(1)  # warm-up: imports, the other process and its process group
    one, many = fit(1), fit(epochs)
    if rank_zero_only.rank == 0:
        print(json.dumps({"seconds_per_epoch": (many - one) / (epochs - 1), "one_epoch_fit": one}))


def measure(method: str, regime: str, epochs: int, processes: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, regime, str(epochs), str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "REGIME", "EPOCHS", "PROCESSES"))
    args = parser.parse_args()
    if args.worker:
        method, regime, epochs, processes = args.worker
        worker(method, regime, int(epochs), int(processes))
        return
    embedded_her2st()  # embed (or read the cache) once, before the workers read it
    rows = []
    for name, method, regime, epochs in SETTINGS:
        row = {"setting": name}
        for label, processes, threads in LAYOUTS:
            row[label] = measure(method, regime, epochs, processes, threads)["seconds_per_epoch"]
            print(name, label, f"{row[label]:.3f} s/epoch", flush=True)
        row["2 threads / 1 thread"] = row[LAYOUTS[0][0]] / row[LAYOUTS[1][0]]
        row["2 processes / 1 thread"] = row[LAYOUTS[0][0]] / row[LAYOUTS[2][0]]
        rows.append(row)
    machine = machine_description()
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
    text = "\n".join(
        [
            "# Scale-out: seconds per training epoch, 1 vs 2 processes",
            "",
            "Command: `python benchmarks/scale_out.py`",
            "",
            f"Machine: {machine['cpu_cores']} CPU cores (shared with other jobs), torch {machine['torch']}, "
            f"Python {machine['python']}, {machine['platform']}.",
            "",
            __doc__.split("\n\n", 1)[1].split("Usage:")[0].strip(),
            "",
            "Seconds per epoch (lower is better), and the speed-ups over one process with one thread:",
            "",
            table,
            "",
        ]
    )
    (HERE / "results" / "scale_out.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
