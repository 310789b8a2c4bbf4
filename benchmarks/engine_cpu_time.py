"""CPU seconds of her2st leave-one-slide-out cross-validations (refit off), to compare training engines.

CPU time (``time.process_time``) rather than wall time, because the load of a shared machine changes
the wall time from one run to the next; one torch thread. The import of Lightning (once per process)
is timed on its own, before the fits. Run it once with each checkout to compare, e.g.
``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/engine_cpu_time.py stnet bleep chrep``.
Results: ``benchmarks/results/lightning_engine.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings

import torch
from _her2st import embedded_her2st

import histo2expr as hx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    adata, _ = embedded_her2st()
    if importlib.util.find_spec("lightning") is not None:
        cpu, wall = time.process_time(), time.perf_counter()
        import lightning.pytorch  # noqa: F401

        print(
            f"import lightning.pytorch: {time.process_time() - cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall"
        )
    warnings.simplefilter("ignore")
    for method in args.methods:
        cpu, wall = time.process_time(), time.perf_counter()
        hx.tl.fit_histo2expr(
            adata, method=method, cv="leave_one_slide_out", refit=False, progress=False, key_added=method
        )
        print(
            f"{method}: {time.process_time() - cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall",
            flush=True,
        )


if __name__ == "__main__":
    main()
