"""Benchmark of cosine top-k retrieval: the exact path against faiss, and the approximate IVF index.

Run on demand, not a test (each part rewrites its own section of
``benchmarks/results/retrieval.md``)::

    python benchmarks/retrieval.py --part exact
    python benchmarks/retrieval.py --part ivf --n-gallery 10000000 --n-queries 1000

*exact*: ``n_queries`` queries (default 10,000) against a gallery of ``n_gallery`` rows
(default 1,000,000) of d = 256 float32 features (256 is the width of the BLEEP and CMRCNet
galleries, their projection dimension), k = 50, with the same threads for everyone.
:func:`~histo2expr.models.retrieval.cosine_topk` reads the gallery from a ``np.memmap``
(*memmap*) or from memory (*memory*); faiss's ``IndexFlatIP`` searches the same rows,
normalised, from memory. The ratio is faiss's time over the package's.

*ivf*: :class:`~histo2expr.models.gallery.Gallery` with ``index="ivf"`` built over a
memory-mapped gallery (default 10,000,000 rows), its build time and memory, and its query
time and recall@k against the exact path over the same queries, for several ``n_probe``.

The data are a Gaussian mixture of 2,000 centres of unequal sizes and spreads along a
shared 32-dimensional subspace (:data:`DATA`). Each run is a
subprocess, so that its peak memory is its own; a sampling thread reads
``/proc/self/status`` (resident memory split into anonymous memory and file-backed pages,
the latter being the memory-mapped gallery) and the kernel's high-water mark ``VmHWM``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "retrieval.md"
N_CHECKED = 20
N_CENTRES = 2000
INTRINSIC_DIM = 32
#: How the data are made, for the results.
DATA = (
    f"a Gaussian mixture of {N_CENTRES:,} centres (standard normal) with Zipf-like sizes (weight of centre i "
    f"proportional to i^-0.5); each point spreads around its centre along a shared {INTRINSIC_DIM}-dimensional "
    "subspace (scale 0.6-1.4 per centre, as large as the centres) plus isotropic noise of scale 0.1: "
    "clustered, overlapping embeddings of low intrinsic dimension"
)
PARTS = ("exact", "ivf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=PARTS, default="exact")
    parser.add_argument("--n-queries", type=int, help="default: 10,000 (exact), 1,000 (ivf)")
    parser.add_argument("--n-gallery", type=int, help="default: 1,000,000 (exact), 10,000,000 (ivf)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["package:memmap", "package:memory", "faiss:memory"],
        help="exact part: who:gallery pairs; who 'package' or 'faiss' (IndexFlatIP), gallery 'memmap' or 'memory'",
    )
    parser.add_argument(
        "--n-probe", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024], help="ivf part"
    )
    parser.add_argument("--n-lists", type=int, help="ivf part; default: the library default")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    exact = args.part == "exact"
    args.n_queries = args.n_queries or (10_000 if exact else 1_000)
    args.n_gallery = args.n_gallery or (1_000_000 if exact else 10_000_000)
    return args


# --- data ----------------------------------------------------------------------------------------


def make_data(folder: Path, n_queries: int, n_gallery: int, dim: int, seed: int = 0) -> None:
    """Clustered embeddings of low intrinsic dimension, written in blocks (see :data:`DATA`)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CENTRES, dim), dtype=np.float32)
    weights = 1.0 / np.arange(1, N_CENTRES + 1) ** 0.5
    weights /= weights.sum()
    scales = rng.uniform(0.6, 1.4, N_CENTRES).astype(np.float32)
    basis = rng.standard_normal((INTRINSIC_DIM, dim), dtype=np.float32) * np.float32(
        np.sqrt(dim / INTRINSIC_DIM)
    )

    def draw(n: int) -> np.ndarray:
        which = rng.choice(N_CENTRES, size=n, p=weights)
        spread = rng.standard_normal((n, INTRINSIC_DIM), dtype=np.float32) @ basis
        return (
            centres[which]
            + scales[which, None] * spread
            + np.float32(0.1) * rng.standard_normal((n, dim), dtype=np.float32)
        )

    gallery = np.memmap(folder / "gallery.f32", dtype=np.float32, mode="w+", shape=(n_gallery, dim))
    for start in range(0, n_gallery, 65536):
        gallery[start : start + 65536] = draw(min(65536, n_gallery - start))
    gallery.flush()
    del gallery
    np.save(folder / "queries.npy", draw(n_queries))


def open_gallery(folder: Path, n_gallery: int, dim: int) -> np.memmap:
    """The gallery file as a copy-on-write memory map (writable for torch, never written)."""
    return np.memmap(folder / "gallery.f32", dtype=np.float32, mode="c", shape=(n_gallery, dim))


def exact_reference(queries: np.ndarray, gallery: np.memmap, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 brute force for a few queries, streaming the gallery."""
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = np.empty((len(q), len(gallery)))
    for start in range(0, len(gallery), 65536):
        g = np.asarray(gallery[start : start + 65536], dtype=np.float64)
        sims[:, start : start + len(g)] = q @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours that were found."""
    return float(
        np.mean([len(np.intersect1d(a, b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)])
    )


# --- memory --------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


class MemorySampler(threading.Thread):
    """Track the peak resident memory (total, anonymous, file-backed) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            status = proc_status()
            for name in self.peak:
                self.peak[name] = max(self.peak[name], status[name])
            self.finished.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self.finished.set()
        self.join()
        return self.peak


def measured(function: object, *args: object, **kwargs: object) -> tuple[object, dict[str, float]]:
    """Call ``function``; its result and wall time, CPU time and peak memory (anonymous, file-backed)."""
    sampler = MemorySampler()
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)  # type: ignore[operator]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = sampler.stop()
    return result, {"wall_s": wall, "cpu_s": cpu, "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"]}


# --- workers, each in its own process -----------------------------------------------------------


def set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def exact_worker(args: argparse.Namespace) -> dict:
    """One exact search of every query: the package's cosine_topk or faiss's IndexFlatIP."""
    import faiss

    from histo2expr.models.retrieval import (
        DEFAULT_GALLERY_CHUNK,
        DEFAULT_QUERY_CHUNK,
        cosine_topk,
        cpu_block_product,
    )

    who, access = args.worker.split(":")
    set_threads(args.threads)
    queries = np.load(args.data / "queries.npy")
    gallery = open_gallery(args.data, args.n_gallery, args.dim)
    if access == "memory":
        gallery = np.array(gallery)  # read into anonymous memory
    before = proc_status()
    result = {"run": args.worker, "rss_before": before["VmRSS"], "anon_before": before["RssAnon"]}
    if who == "package":
        (sims, idx), result["search"] = measured(cosine_topk, queries, gallery, args.k)
        result["chunks"] = f"{DEFAULT_QUERY_CHUNK:,} x {DEFAULT_GALLERY_CHUNK:,}"
        result["block_product"] = cpu_block_product()
    else:

        def build() -> faiss.IndexFlatIP:
            faiss.normalize_L2(gallery)  # in place: the memory copy of the gallery
            index = faiss.IndexFlatIP(args.dim)
            index.add(gallery)
            return index

        def search(index: faiss.IndexFlatIP) -> tuple[np.ndarray, np.ndarray]:
            normalised = queries.copy()
            faiss.normalize_L2(normalised)
            return index.search(normalised, args.k)

        index, result["build"] = measured(build)
        (sims, idx), result["search"] = measured(search, index)
    result["vm_hwm"] = proc_status()["VmHWM"]
    np.save(args.data / f"idx_{who}_{access}.npy", idx)
    np.save(args.data / f"sims_{who}_{access}.npy", sims)
    return result


def ivf_worker(args: argparse.Namespace) -> dict:
    """Build the IVF gallery over the memory-mapped gallery, search at several n_probe, and exactly."""
    import torch

    from histo2expr.models.gallery import Gallery
    from histo2expr.models.ivf import RERANK_FACTOR, factory_string
    from histo2expr.models.retrieval import cosine_topk

    set_threads(args.threads)
    queries = np.load(args.data / "queries.npy")
    keys = open_gallery(args.data, args.n_gallery, args.dim)
    values = np.zeros((args.n_gallery, 1), dtype=np.float32)  # one gene: the values play no part in search
    before = proc_status()
    result: dict = {"run": "ivf", "rss_before": before["VmRSS"], "anon_before": before["RssAnon"]}
    gallery, result["build"] = measured(
        Gallery, keys, values, top_k=args.k, index="ivf", n_lists=args.n_lists, seed=0
    )
    result["n_lists"], result["default_n_probe"] = gallery.ivf.n_lists, gallery.ivf.n_probe
    result["factory"], result["rerank"] = factory_string(gallery.ivf.n_lists, args.dim), RERANK_FACTOR
    (_, exact), result["exact"] = measured(cosine_topk, queries, keys, args.k)
    result["searches"] = []
    for n_probe in sorted({*args.n_probe, gallery.ivf.n_probe}):
        gallery.ivf.n_probe = n_probe
        (_, found), timing = measured(gallery.search, queries)
        result["searches"].append({"n_probe": n_probe, "recall": recall(found, exact), **timing})
    result["vm_hwm"] = proc_status()["VmHWM"]
    result["torch_threads"] = torch.get_num_threads()
    result["index_bytes"] = int(gallery.ivf.state_dict()["faiss_index"].numel())  # after the peak: a copy
    return result


# --- driver ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    import faiss
    import torch

    return (
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"faiss-cpu {faiss.__version__}"
    )


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def run_worker(run: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", run, "--data", str(folder), "--part", args.part]
    for name in ("n_queries", "n_gallery", "dim", "k", "threads", "n_lists"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--n-probe", *map(str, args.n_probe)]
    load_before = os.getloadavg()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the {run} worker failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = (load_before[0], os.getloadavg()[0])
    print(result, flush=True)
    return result


def header(args: argparse.Namespace, argv: list[str] | None) -> list[str]:
    command = " ".join(["python", "benchmarks/retrieval.py", *(argv if argv is not None else sys.argv[1:])])
    return [
        f"Written by `benchmarks/retrieval.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
        f"- Command: `nice {command}` (from the repository root, with the project's virtual environment)",
        f"- Machine: {machine()}; no GPU; the CPUs were shared with other jobs (load averages below).",
        f"- Software: {versions()}",
        f"- Case: {args.n_queries:,} queries x {args.n_gallery:,} gallery rows, d = {args.dim} float32 (the width "
        f"of the BLEEP / CMRCNet galleries), k = {args.k}, {args.threads} threads for torch, numpy's BLAS and faiss",
        f"- Data: {args.n_gallery * args.dim * 4 / 2**30:.2f} GiB of float32 in a temporary file, {DATA}",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(exact_worker(args) if args.part == "exact" else ivf_worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="h2e-retrieval-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        make_data(folder, args.n_queries, args.n_gallery, args.dim)
        print(f"data written in {time.perf_counter() - start:.1f} s", flush=True)
        if args.part == "ivf":
            section = ivf_section(args, argv, run_worker("ivf", folder, args))
        else:
            results = [run_worker(run, folder, args) for run in args.runs]
            section = exact_section(args, argv, results, exact_checks(folder, args))
    write_section(args.output, args.part, section)


def exact_checks(folder: Path, args: argparse.Namespace) -> list[str]:
    """Each run against a float64 brute force on a few queries, and the runs against each other."""
    queries = np.load(folder / "queries.npy")
    checked = np.random.default_rng(1).choice(
        args.n_queries, size=min(N_CHECKED, args.n_queries), replace=False
    )
    ref_sims, ref_idx = exact_reference(
        queries[checked], open_gallery(folder, args.n_gallery, args.dim), args.k
    )
    found = {run: np.load(folder / f"idx_{run.replace(':', '_')}.npy") for run in args.runs}
    lines = []
    for run in args.runs:
        sims = np.load(folder / f"sims_{run.replace(':', '_')}.npy")
        lines.append(
            f"- {run}: {int((found[run][checked] == ref_idx).all(axis=1).sum())}/{len(checked)} rows with identical "
            f"indices in identical order, recall@{args.k} {recall(found[run][checked], ref_idx):.4f}, "
            f"max |similarity error| {np.abs(sims[checked] - ref_sims).max():.2e}"
        )
    first = args.runs[0]
    for run in args.runs[1:]:
        same_rows = (found[run] == found[first]).all(axis=1).mean()
        lines.append(
            f"- {run} vs {first}, all {args.n_queries:,} queries: {same_rows:.4f} of rows identical, recall@{args.k} "
            f"{recall(found[run], found[first]):.4f} (differences: float32 near-ties)"
        )
    return lines


def exact_section(
    args: argparse.Namespace, argv: list[str] | None, results: list[dict], checks: list[str]
) -> str:
    lines = [
        "## Exact top-k: the package against faiss `IndexFlatIP`",
        "",
        *header(args, argv),
        "",
        "| run | build (s) | search wall (s) | search CPU (s) | load avg before / after | peak RSS (GiB) | "
        "peak anonymous (GiB) | peak file-backed (GiB) | before: RSS / anonymous (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        build = r.get("build", {"wall_s": 0.0})
        lines.append(
            f"| {r['run']} | {build['wall_s']:.1f} | {r['search']['wall_s']:.1f} | {r['search']['cpu_s']:.1f} | "
            f"{r['load'][0]:.1f} / {r['load'][1]:.1f} | {gib(r['vm_hwm'])} | {gib(r['search']['peak_anon'])} | "
            f"{gib(r['search']['peak_file'])} | {gib(r['rss_before'])} / {gib(r['anon_before'])} |"
        )
    package = [r for r in results if r["run"].startswith("package")]
    lines += [
        "",
        "*build*: faiss's normalisation of the in-memory gallery and `IndexFlatIP.add`; the package needs none "
        "(cosine_topk normalises each block as it reads it, inside its search time). *Peak RSS* is the kernel's "
        "high-water mark `VmHWM` of the worker process (Python, libraries, queries, the gallery copy in memory for "
        "*memory* runs, the search); *peak anonymous* / *file-backed* are sampled every 20 ms during the search, "
        "file-backed pages being the libraries and, for *memmap*, the gallery pages read: page cache the kernel "
        f"can drop. Package chunks: {package[0]['chunks'] if package else '?'} rows (query x gallery); CPU "
        f"block product: {package[0]['block_product'] if package else '?'}.",
        "",
        "Ratios (faiss / package, > 1: the package is faster), same data, same threads, same run:",
        "",
    ]
    faiss_runs = [r for r in results if r["run"].startswith("faiss")]
    for f in faiss_runs:
        for p in package:
            total = f["build"]["wall_s"] + f["search"]["wall_s"]
            lines.append(
                f"- {f['run']} / {p['run']}: search wall {f['search']['wall_s'] / p['search']['wall_s']:.2f}, "
                f"search CPU {f['search']['cpu_s'] / p['search']['cpu_s']:.2f}, build + search wall "
                f"{total / p['search']['wall_s']:.2f}"
            )
    lines += ["", f"Correctness, {N_CHECKED} random queries against a float64 brute force:", "", *checks]
    return "\n".join(lines)


def ivf_section(args: argparse.Namespace, argv: list[str] | None, r: dict) -> str:
    build, exact = r["build"], r["exact"]
    lines = [
        '## Approximate top-k: `Gallery(index="ivf")` (faiss IVF, 4-bit PQ codes, exact re-rank)',
        "",
        *header(args, argv),
        f"- Index: {r['factory']} (n_lists by default sqrt(n)), trained on a seeded sample, built over the "
        f"memory-mapped gallery; serialised size {gib(r['index_bytes'])} GiB; {r['rerank']} x k candidates "
        "re-ranked exactly per query",
        "",
        f"Build: {build['wall_s']:.1f} s wall, {build['cpu_s']:.1f} s CPU, peak anonymous memory "
        f"{gib(build['peak_anon'])} GiB (before: {gib(r['anon_before'])} GiB), peak file-backed "
        f"{gib(build['peak_file'])} GiB (gallery pages read through the memory map); load "
        f"{r['load'][0]:.1f} before, {r['load'][1]:.1f} after the worker. Worker peak RSS (`VmHWM`, including "
        f"the memory-mapped gallery): {gib(r['vm_hwm'])} GiB.",
        "",
        f"Exact search of the same queries (cosine_topk over the memory map): {exact['wall_s']:.1f} s wall, "
        f"{exact['cpu_s']:.1f} s CPU.",
        "",
        f"| n_probe | recall@{args.k} vs exact | search wall (s) | search CPU (s) | CPU speed-up vs exact | "
        "peak anonymous (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in r["searches"]:
        default = " (default)" if s["n_probe"] == r["default_n_probe"] else ""
        lines.append(
            f"| {s['n_probe']}{default} | {s['recall']:.4f} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | "
            f"{exact['cpu_s'] / s['cpu_s']:.1f} | {gib(s['peak_anon'])} |"
        )
    return "\n".join(lines)


def write_section(path: Path, part: str, section: str) -> None:
    """Rewrite this part's section of the results file, keeping the other part's."""
    sections = dict.fromkeys(PARTS, "")
    if path.exists():
        for name, text in re.findall(r"<!-- part: (\w+) -->\n(.*?)<!-- end -->", path.read_text(), re.S):
            sections[name] = text
    sections[part] = section + "\n"
    body = "".join(
        f"<!-- part: {name} -->\n{text}<!-- end -->\n\n" for name, text in sections.items() if text
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Retrieval benchmark\n\n" + body.rstrip() + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
