"""A fit under a competing CPU load, against the same fit on an otherwise quiet machine, in one run.

Run on demand:

    python benchmarks/threads_under_load.py [--method chrep] [--repeats 3]

The workload is a leave-one-slide-out ``fit_histo2expr`` of a torch method in the frozen regime on
the synthetic cohort (four slides, random 512-d features standing in for embeddings, 20 epochs):
what a notebook user runs. The competing load is ``k`` processes that keep one CPU busy each, started
before the fit. Two thread policies are compared (torch's own default once, without the load started
here, since on a busy machine one such fit takes minutes):

- ``hx.settings.n_threads = None`` (histo2expr's default, :func:`histo2expr._settings.cpu_threads`):
  the CPUs this process may use, less those busy with other processes when the call starts;
- a fixed number equal to the CPUs of the machine: what torch does when nothing sets its threads.

Reported: the median wall time of ``--repeats`` fits per load (the conditions interleaved, round
after round, so that the load of other jobs drifts into all of them), the ratio to the default
policy without the load started here, and the threads each fit used. "Quiet" means no load started
here; on a shared machine other jobs may run. Writes benchmarks/results/threads_under_load.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import histo2expr as hx
from histo2expr._benchmark import machine_description
from histo2expr._settings import available_cpus, compute_threads

HERE = Path(__file__).resolve().parent


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def cohort():
    adata = hx.datasets.synthetic(n_slides=4, spots_per_side=12, n_genes=80, seed=0)
    hx.pp.normalize(adata)
    adata.obsm["X_histo"] = np.random.default_rng(0).normal(size=(adata.n_obs, 512)).astype(np.float32)
    adata.uns["X_histo"] = {"encoder": {}, "patches": {}}
    return adata


def timed_fit(adata, method: str) -> tuple[float, int]:
    """Seconds of one cross-validated fit, and the threads the policy picks right before it."""
    threads = compute_threads()
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic cohort's patients repeat; not the point here
        hx.tl.fit_histo2expr(
            adata.copy(),
            method=method,
            genes=60,
            cv="leave_one_slide_out",
            epochs=20,
            patience=100,
            refit=False,
            progress=False,
        )
    return time.perf_counter() - tic, threads


def measure(adata, method: str, load: int) -> tuple[float, int]:
    """One timed fit while ``load`` processes keep a CPU busy each."""
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
    for process in spinners:
        process.start()
    time.sleep(1.0 if load else 0.0)
    try:
        return timed_fit(adata, method)
    finally:
        stop.set()
        for process in spinners:
            process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="chrep")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    adata = cohort()
    cpus = available_cpus()
    loads = sorted({0, max(1, cpus - 1), cpus})
    default, fixed = "default (None)", f"fixed {os.cpu_count()} (torch's own default)"
    # torch's default only once and without the load started here: on a busy machine it takes minutes
    plan = [(default, None, load) for load in loads] * args.repeats + [(fixed, os.cpu_count(), 0)]
    runs: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for name, n_threads, load in plan:  # conditions interleaved, so that other jobs' load drifts into all
        hx.settings.n_threads = n_threads
        runs.setdefault((name, load), []).append(measure(adata, args.method, load))
        print(name, load, runs[name, load][-1], flush=True)
    rows = []
    quiet = statistics.median(r[0] for r in runs[default, 0])
    for name, load in runs:
        seconds = statistics.median(r[0] for r in runs[name, load])
        rows.append(
            {
                "policy": name,
                "busy processes": load,
                "threads used": ", ".join(str(r[1]) for r in runs[name, load]),
                "seconds (median)": f"{seconds:.1f}",
                "x quiet (default policy)": f"{seconds / quiet:.2f}",
            }
        )
    hx.settings.n_threads = None
    machine = machine_description()

    text = "\n".join(
        [
            "# A fit under a competing CPU load",
            "",
            f"Command: `python benchmarks/threads_under_load.py --method {args.method} --repeats {args.repeats}`",
            "",
            f"Machine: {machine['cpu_cores']} CPU cores ({machine['available_cpus']} available to the process), "
            f"torch {machine['torch']}, {machine['platform']}; load average when done "
            f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (other jobs share this machine).",
            "",
            f"Workload: leave-one-slide-out `fit_histo2expr(method={args.method!r})`, frozen regime, four "
            "synthetic slides (527 spots), 512-d random features, 60 genes, 20 epochs, no refit. Load: "
            "processes keeping one CPU busy each, started 1 s before the fit. `x quiet (default policy)`: "
            "median time over the median time of the default policy without the load started here, same "
            f"run; {args.repeats} fits per condition of the default policy, interleaved; one of torch's default.",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
        ]
    )
    out = HERE / "results" / "threads_under_load.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
