"""Wall and CPU time of ``histo2expr benchmark`` on her2st: an old version of the package against a new one.

Run on demand (not a test), from the repository root::

    python benchmarks/frozen_benchmark_speed.py [--old main] [--new HEAD] [--variants old new]
        [--priority] [--data /path/to/her2st] [--work /tmp/frozen_benchmark_speed]
        [--out benchmarks/results/frozen_benchmark_speed.md]

Each variant is the source tree of a git revision (``git archive``), run as a fresh
``python -m histo2expr.cli benchmark --data DATA --quiet`` process with that tree on
``PYTHONPATH`` and the variant's extra options: every method, leave one slide out, the
embedding included, with the defaults of that revision. The variants run one after the other
(``--variants`` gives the order); each one's wall time, CPU time (user + system of the process
and the processes it waited for: its method jobs), the load average around it and its
``results.json`` are kept in ``--work``, and the report is written from every variant found
there, so that a variant run later (``--variants new``) joins the same report. The decoded
images and the ONNX export are warmed first (``--warm``), outside the timed runs, as any
second run of the benchmark finds them in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "frozen_benchmark_speed.md"
DEFAULT_DATA = Path(os.environ.get("HISTO2EXPR_HER2ST", ROOT.parent / "shared" / "data" / "her2st"))
#: Largest difference of a method's mean PCC(ACG) to the old run that counts as keeping the numbers.
TOLERANCE = 0.003


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def raise_priority() -> None:
    """Put this process and the processes it starts ahead of the machine's other jobs (needs root).

    Nice -20 for the process and for its scheduling autogroup: with autogroups (Linux's default for
    sessions), the nice value of a process only ranks it within its own session's group.
    """
    os.setpriority(os.PRIO_PROCESS, 0, -20)
    autogroup = Path("/proc/self/autogroup")
    if autogroup.exists():
        autogroup.write_text("-20")


def snapshot(revision: str, folder: Path) -> str:
    """The ``src`` tree of git ``revision`` in ``folder``; its commit."""
    commit = subprocess.run(
        ["git", "rev-parse", revision], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = folder / "src.tar"
    subprocess.run(["git", "archive", "-o", str(archive), commit, "src"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    archive.unlink()
    return commit


class LoadSampler:
    """The 1-minute load average every 10 s while the ``with`` block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(load_average()[0])
            if self._stop.wait(10):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(name: str, revision: str, extra: list[str], data: Path, work: Path) -> dict:
    """Run ``histo2expr benchmark`` of ``revision``; its times, load and results."""
    tree = work / name
    commit = snapshot(revision, tree)
    out = work / f"{name}_out"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "histo2expr.cli", "benchmark", "--data", str(data), "--quiet"]
    command += ["--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, load_before = datetime.now(UTC), load_average()
    tic = time.perf_counter()
    with LoadSampler() as sampler, open(work / f"{name}.log", "w") as log:
        subprocess.run(command, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    results = json.loads((out / "results.json").read_text())
    record = {
        "name": name,
        "revision": revision,
        "commit": commit,
        "command": "histo2expr benchmark --data DATA --quiet" + "".join(f" {a}" for a in extra),
        "invocation": "python benchmarks/frozen_benchmark_speed.py " + " ".join(sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_s": wall,
        "cpu_s": cpu,
        "load_before": load_before,
        "load_after": load_average(),
        "load_mean": sum(sampler.samples) / len(sampler.samples),
        "priority": os.getpriority(os.PRIO_PROCESS, 0),
        "results": results,
    }
    (work / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


def warm(data: Path, revision: str, work: Path) -> float:
    """Decode the her2st images and export the default encoder to ONNX into the cache; seconds taken."""
    tree = work / "warm"
    snapshot(revision, tree)
    code = (
        "import sys, histo2expr as hx\n"
        f"adata = hx.io.read_legacy_st({str(data)!r})\n"
        "hx.tl.embed_patches(adata[:8].copy(), progress=False)\n"
    )
    tic = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - tic


def method_table(old: dict, new: dict) -> tuple[list[str], bool]:
    """Per scheme and method: seconds and mean PCC(ACG) of each run, their difference; whether all are within TOLERANCE."""
    lines = [
        f"| scheme | method | {old['name']} s | {new['name']} s | {old['name']} PCC(ACG) | {new['name']} PCC(ACG) | "
        "difference | largest per-slide difference |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    kept = True
    for scheme, entry in old["results"]["cross_validation"].items():
        for method, before in entry["methods"].items():
            after = new["results"]["cross_validation"][scheme]["methods"][method]
            a, b = before["mean"]["pcc_acg"], after["mean"]["pcc_acg"]
            slides = {row["slide"]: row["pcc_acg"] for row in before["per_slide"]}
            per_slide = max(abs(row["pcc_acg"] - slides[row["slide"]]) for row in after["per_slide"])
            kept &= abs(b - a) <= TOLERANCE
            lines.append(
                f"| {scheme} | {method} | {before['seconds']:.0f} | {after['seconds']:.0f} | {a:.3f} | {b:.3f} | "
                f"{b - a:+.4f} | {per_slide:.4f} |"
            )
    return lines, kept


def report(work: Path, out: Path, warm_seconds: float | None) -> None:
    records = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
    old, new = records["old"], records["new"]
    invocations = list(dict.fromkeys(record["invocation"] for record in (old, new)))
    machine = new["results"]["machine"]
    rows = []
    for record in (old, new):
        settings = record["results"]["settings"]
        rows.append(
            f"| {record['name']} | `{record['revision']}` ({record['commit'][:9]}) | `{record['command']}` | "
            f"{settings.get('backend') or 'torch'} | {settings.get('jobs') or 1} | "
            f"{settings['embedding_seconds']:.0f} | {record['wall_s']:.0f} | {record['cpu_s']:.0f} | "
            f"{record['started']} | {record['load_before'][0]:.1f} / {record['load_mean']:.1f} / "
            f"{record['load_after'][0]:.1f} |"
        )
    methods, kept = method_table(old, new)
    warm_line = (
        []
        if warm_seconds is None
        else [
            f"Warm-up before the timed runs (decoded images and the ONNX export into the cache, as any "
            f"second run finds them): {warm_seconds:.0f} s.",
            "",
        ]
    )
    text = [
        "# `histo2expr benchmark` on her2st: old against new",
        "",
        "Command (from the repository root): " + " then ".join(f"`{i.strip()}`" for i in invocations),
        "",
        f"Machine: {machine['platform']}, {machine['cpu_cores']} CPU cores ({machine['available_cpus']} "
        f"available to the process), {machine['gpu'] or 'no GPU'}, torch {machine['torch']}, Python "
        f"{machine['python']}; threads: the package's default policy (torch threads of the new run's main "
        f"process at its end: {machine['torch_threads']}), `OMP_NUM_THREADS` "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}. "
        "**The machine was shared with other jobs**: the load average (1 minute) is given before / mean "
        "during / after each run; wall times under a different load are not comparable, CPU seconds are "
        "less sensitive to it. "
        + (
            "Both runs were at nice -20 with their scheduling autogroup at nice -20 (`--priority`): "
            "ahead of the other jobs, each run got the CPU it asked for; the load average counts the other jobs."
            if all(record.get("priority", 0) == -20 for record in (old, new))
            else "The runs were at the same priority as the other jobs."
        ),
        "",
        *warm_line,
        "Each run: every method, leave one slide out and leave one patient out (her2st's patients have "
        "several sections) on the six her2st sections, 250 genes, 50 epochs at most, the embedding "
        "included (`embedding s`), as a fresh process; `CPU s`: user + system time of the process and "
        "of the cross-validation jobs it waited for.",
        "",
        "| run | revision | command | backend | jobs | embedding s | wall s | CPU s | started | load |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        f"**new / old: wall {new['wall_s'] / old['wall_s']:.2f}, CPU {new['cpu_s'] / old['cpu_s']:.2f}, "
        f"embedding {new['results']['settings']['embedding_seconds'] / old['results']['settings']['embedding_seconds']:.2f}.**",
        "",
        "## Per cross-validation (`s`: its wall seconds, in a process of its own for jobs > 1)",
        "",
        *methods,
        "",
        f"Every method's mean PCC(ACG) within {TOLERANCE} of the old run: **{'yes' if kept else 'NO'}**.",
        "",
    ]
    out.write_text("\n".join(text))
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="main", help="git revision of the old run (default main)")
    parser.add_argument("--new", default="HEAD", help="git revision of the new run (default HEAD)")
    parser.add_argument("--old-args", default="", help="extra options of the old run's benchmark")
    parser.add_argument("--new-args", default="", help="extra options of the new run's benchmark")
    parser.add_argument("--variants", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozen_benchmark_speed"))
    parser.add_argument("--no-warm", dest="warm", action="store_false")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--priority",
        action="store_true",
        help="run the timed processes at nice -20, ahead of the machine's other jobs (needs root)",
    )
    parser.add_argument("--report-only", action="store_true", help="write the report from --work only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    warm_file = args.work / "warm_seconds.txt"
    if args.report_only:
        args.variants, args.warm = [], False
    if args.priority:
        raise_priority()
    if args.warm:
        warm_file.write_text(f"{warm(args.data, args.new, args.work):.1f}")
    for name in args.variants:
        revision, extra = (args.old, args.old_args) if name == "old" else (args.new, args.new_args)
        record = run_variant(name, revision, extra.split(), args.data, args.work)
        print(f"{name}: {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU", flush=True)
    if (args.work / "old.json").exists() and (args.work / "new.json").exists():
        warm_seconds = float(warm_file.read_text()) if warm_file.exists() else None
        report(args.work, args.out, warm_seconds)


if __name__ == "__main__":
    main()
