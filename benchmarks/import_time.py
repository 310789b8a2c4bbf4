"""Wall time of ``import histo2expr`` in fresh interpreters, against the libraries it leaves out.

Run on demand (not a test)::

    python benchmarks/import_time.py [--runs 7] [--out benchmarks/results/import_time.md]

Each statement runs ``--runs`` times, each in a fresh ``python -c`` process, in rounds (every
statement once per round), and the median and minimum wall time of the process are reported,
next to the empty interpreter. One ``python -X importtime -c "import histo2expr"`` run gives the
modules that cost the most. ``tests/test_import.py`` checks (untimed) that torch, timm, lightning,
spatialdata, squidpy, scanpy, matplotlib, onnxruntime and faiss stay out of ``import histo2expr``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from patch_streaming import machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "import_time.md"
STATEMENTS = {
    "empty interpreter": "pass",
    "import numpy": "import numpy",
    "import anndata": "import anndata",
    "import histo2expr": "import histo2expr",
    "histo2expr --help (the CLI's parser)": "from histo2expr import cli; cli._parser().format_help()",
    "import torch (left out)": "import torch",
    "import scanpy (left out)": "import scanpy",
    "import spatialdata (left out)": "import spatialdata",
}


def wall_seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def importtime_top(n: int = 12) -> list[tuple[str, float, float]]:
    """The ``n`` modules of ``import histo2expr`` with the largest cumulative time: (name, cumulative s, self s)."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import histo2expr"],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        own, cumulative, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        if "." not in name or name.startswith("histo2expr"):  # top-level packages, and histo2expr's modules
            rows.append((name, int(cumulative) / 1e6, int(own) / 1e6))
    return sorted(rows, key=lambda row: -row[1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {label: [] for label in STATEMENTS}
    for _ in range(args.runs):
        for label, code in STATEMENTS.items():
            times[label].append(wall_seconds(code))
    top = importtime_top()
    load_end = os.getloadavg()
    empty = statistics.median(times["empty interpreter"])
    lines = [
        "# Import time",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {machine()}. Run {time.strftime('%Y-%m-%d %H:%M')}. **The machine was loaded**: its 2 cores "
        f"were shared with other jobs (load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the "
        "end), so the times are longer and noisier than on an idle machine; the statements alternate in "
        "rounds, so compare them with each other.",
        "",
        f"Wall time of a fresh `python -c STATEMENT` process, {args.runs} runs each (seconds):",
        "",
        "| statement | median | min | median minus the empty interpreter |",
        "|---|---:|---:|---:|",
    ]
    for label, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.2f} | {min(values):.2f} | {median - empty:.2f} |")
    lines += [
        "",
        'Largest cumulative times of one `python -X importtime -c "import histo2expr"` (top-level packages, '
        "also where another package imports them, so rows overlap, and histo2expr's own modules; seconds, "
        "this single run):",
        "",
        "| module | cumulative | self |",
        "|---|---:|---:|",
        *(f"| {name} | {cumulative:.3f} | {own:.3f} |" for name, cumulative, own in top),
        "",
        "`import histo2expr` imports none of torch, timm, lightning, spatialdata, squidpy, scanpy, "
        "matplotlib, onnxruntime and faiss (checked by `tests/test_import.py`); what remains is anndata "
        "(with pandas, scipy.sparse, and dask and zarr, which anndata imports when they are installed), "
        "which every histo2expr function needs.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
