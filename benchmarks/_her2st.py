"""Shared by the her2st benchmark scripts: the embedded cohort, rows run on identical folds, the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import histo2expr as hx

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("HISTO2EXPR_HER2ST", HERE.parent.parent / "shared" / "data" / "her2st"))
COLUMNS = ["pcc_acg", "pcc_heg50", "pcc_hvg50", "mse", "mae"]


def embedded_her2st(tokens: int | None = None) -> tuple[Any, float]:
    """The normalised her2st cohort with frozen ImageNet EfficientNet-Lite0 features, and the embedding time.

    The features are those of the spot's patch alone, as it is (no test-time augmentation, context
    or neighbour blocks), which the ablation results in ``results/`` were measured on.

    The embedded cohort is kept in the histo2expr cache (``benchmarks/her2st_lite0.h5ad``) so
    that several benchmark scripts embed it once; delete that file to re-embed. The time
    returned is that of the run that embedded it. With ``tokens`` (the side of the token grid,
    see ``hx.tl.embed_patches``) the image tokens are embedded too, in
    ``obsm["X_histo_tokens"]``, and cached in a file of their own
    (``benchmarks/her2st_lite0_tokens{tokens}.h5ad``).
    """
    import anndata as ad

    from histo2expr._cache import cache_dir

    name = "her2st_lite0.h5ad" if tokens is None else f"her2st_lite0_tokens{tokens}.h5ad"
    cached = cache_dir("benchmarks") / name
    if cached.exists():
        adata = ad.read_h5ad(cached)
        return adata, float(adata.uns["benchmark_embed_seconds"])
    adata = hx.io.read_legacy_st(DATA)
    hx.pp.normalize(adata)
    tic = time.perf_counter()
    hx.tl.embed_patches(
        adata, encoder="efficientnet_lite0", weights="imagenet", patch_size=224, tokens=tokens, progress=False,
        tta=1, context=None, neighbours=None,
    )  # fmt: skip
    adata.uns["benchmark_embed_seconds"] = time.perf_counter() - tic
    adata.write_h5ad(cached)
    return adata, float(adata.uns["benchmark_embed_seconds"])


def ablation_parser(doc: str) -> argparse.ArgumentParser:
    """The options every her2st ablation script shares: ``--genes``, ``--seed``, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)"
    )
    return parser


def parse_ablation_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and give histo2expr's computations their ``--threads`` (``hx.settings.n_threads``)."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hx.settings.n_threads = args.threads
    return args


def run_rows(
    adata: Any, rows: Mapping[str, Mapping[str, Any]], *, genes: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-slide-out for every row (``fit_histo2expr`` keyword arguments) on identical folds and genes.

    Returns the mean metrics (and seconds) per row, and PCC(ACG) per held-out slide and row.
    """
    means, per_slide = [], {}
    for index, (row, params) in enumerate(rows.items()):
        key = f"run{index}"
        tic = time.perf_counter()
        hx.tl.fit_histo2expr(
            adata, genes=genes, cv="leave_one_slide_out", seed=seed, key_added=key, progress=False, **params
        )
        folds = adata.uns[key]["folds"]
        means.append(
            pd.Series({**folds[COLUMNS].mean().to_dict(), "seconds": time.perf_counter() - tic}, name=row)
        )
        per_slide[row] = folds.set_index("slide")["pcc_acg"]
        print(row, means[-1].round(4).to_dict(), flush=True)
    return pd.DataFrame(means), pd.DataFrame(per_slide)


def write_report(
    name: str,
    *,
    title: str,
    command: str,
    setting: str,
    means: pd.DataFrame,
    per_slide: pd.DataFrame,
    start: float,
) -> None:
    """Write the report to ``results/{name}.md`` and print it."""
    save_results(
        name,
        [
            f"# {title}",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, no GPU, torch "
            f"{torch.__version__} with {torch.get_num_threads()} thread(s). {setting}",
            "",
            "## Mean over held-out slides",
            "",
            means.round(4).to_markdown(),
            "",
            "## PCC(ACG) per held-out slide",
            "",
            per_slide.round(4).to_markdown(),
            "",
            f"Whole run: {time.perf_counter() - start:.0f} s.",
            "",
        ],
    )


def read_rows(path: Path) -> list[dict]:
    """The rows a benchmark script cached in the JSON-lines file ``path`` (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def mean_and_sd(values: Any) -> str:
    """``"mean ± sd"`` of a pandas Series to four decimals (sd over the values, ``ddof=1``); the mean alone for one value."""
    return f"{values.mean():.4f}" if len(values) < 2 else f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


#: What the heading of a section added to a results file by hand says; see :func:`save_results`.
HAND_WRITTEN = "written by hand"


def save_results(name: str, lines: list[str]) -> None:
    """Write ``lines`` to ``results/{name}.md``, keeping its hand-written sections, and print the file.

    The hand-written sections are the file's text from its first heading that says
    :data:`HAND_WRITTEN` (e.g. ``## Reading (written by hand after the runs)``) to its end: they
    follow ``lines``, so that a script's report replaces its own part only.
    """
    out = HERE / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    old = out.read_text().splitlines() if out.exists() else []
    by_hand = next(
        (i for i, line in enumerate(old) if line.startswith("#") and HAND_WRITTEN in line), len(old)
    )
    parts = ["\n".join(lines).rstrip("\n"), "\n".join(old[by_hand:])]
    out.write_text("\n\n".join(part for part in parts if part) + "\n")
    print(out.read_text())


def steps_parser(doc: str) -> tuple[argparse.ArgumentParser, Any]:
    """A parser with ``--threads`` and one required sub-command per step of a benchmark script."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser, parser.add_subparsers(dest="step", required=True)


def run_step(parser: argparse.ArgumentParser) -> None:
    """Parse the command line, give torch its ``--threads`` and run the chosen step."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.func(args)


def report_only_main(doc: str, report: Callable[[argparse.Namespace], None]) -> None:
    """The command line of a script whose one step is ``report`` (its runs are other scripts' rows)."""
    parser, steps = steps_parser(doc)
    steps.add_parser("report").set_defaults(func=report)
    run_step(parser)
