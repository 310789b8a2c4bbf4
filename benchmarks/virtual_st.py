"""Virtual spatial transcriptomics end to end: pseudo-spots per second on a 20,000 x 20,000 px slide.

Run on demand (not a test), from the repository root::

    python benchmarks/virtual_st.py [--size 20000] [--threads 2]
        [--out benchmarks/results/virtual_st.md]

The slide: a mosaic of the synthetic cohort's H&E-like images (``hx.datasets.synthetic``, 1 µm per
pixel; tissue ellipses on glass, so about two thirds of the slide is tissue), ``--size`` pixels
square, written as a pyramidal OME-TIFF (JPEG tiles of 512 px, quality 90, levels 1/4 and 1/16)
the way scanners store slides. It is made before the clock starts.

The model: ridge on frozen features of the synthetic cohort (4 slides, 50 genes), fitted once per
encoder before the clock starts and saved.

Timed, in a fresh subprocess per case (so peak-memory counters start from zero), with
``torch.set_num_threads(--threads)``: ``hx.io.read_wsi`` (pixel size from the file, the hires image
from the 1/4 level), ``hx.pp.tile_slide`` (Otsu tissue mask), ``hx.tl.embed_patches`` (patches cut
from the JPEG tiles, 224 px at 1 µm/px, batches of 64, DataLoader workers as given) and
``hx.tl.predict_expression``. Reported: seconds per step, pseudo-spots per second end to end, and
the peak RSS of the process tree (sampled every 0.1 s) and its ``ru_maxrss``.

Cases: the weight-free ``colour_texture`` encoder with legacy-ST geometry (100 µm spots, 200 µm
pitch); and the ImageNet ``efficientnet_lite0`` (offline weights) with 55 µm spots at a 400 µm
pitch. Both encoders cost tens of milliseconds per 224 px patch on a CPU, so the pitches keep the
run to minutes; the rate per pseudo-spot hardly depends on the pitch. Also reported: the rate of
cutting the patches alone (every patch read again through a fresh ``PatchSource``, not encoded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from patch_streaming import MemorySampler, machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "virtual_st.md"
TILE, CELL = 512, 1024  # TIFF tile side; side of each synthetic image in the mosaic
CASES = (
    {"encoder": "colour_texture", "weights": "default", "spot_um": 100.0, "spacing_um": 200.0, "workers": 0},
    {
        "encoder": "efficientnet_lite0",
        "weights": "imagenet",
        "spot_um": 55.0,
        "spacing_um": 400.0,
        "workers": 0,
    },
)
PATCH_SIZE, BATCH_SIZE = 224, 64


def write_slide(path: Path, size: int) -> None:
    """A ``size`` px square mosaic of synthetic H&E images as a JPEG-tiled pyramidal OME-TIFF."""
    import tifffile
    from PIL import Image

    import histo2expr as hx

    cohort = hx.datasets.synthetic(n_slides=4, seed=1, spots_per_side=8, n_genes=10)
    cells = [
        tifffile.imread(entry["metadata"]["source_image_path"])[:CELL, :CELL]
        for entry in cohort.uns["spatial"].values()
    ]
    n = -(-size // CELL)
    layout = np.random.default_rng(0).integers(0, len(cells), size=(n, n))

    def band(rows: slice, cell: list[np.ndarray], side: int, width: int) -> np.ndarray:
        out = np.empty((rows.stop - rows.start, width, 3), np.uint8)
        for y in range(rows.start, rows.stop):
            line = np.concatenate([cell[layout[y // side, c]][y % side] for c in range(n)])
            out[y - rows.start] = line[:width]
        return out

    def tiles(side_px: int, cell: list[np.ndarray], side: int):
        for top in range(0, side_px, TILE):
            rows = slice(top, min(top + TILE, side_px))
            strip = band(rows, cell, side, side_px)
            strip = np.pad(
                strip, ((0, TILE - strip.shape[0]), (0, -side_px % TILE), (0, 0)), constant_values=255
            )
            for left in range(0, strip.shape[1], TILE):
                yield strip[:, left : left + TILE]

    options = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
        "dtype": np.uint8,
    }
    metadata = {"axes": "YXS", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as writer:
        writer.write(tiles(size, cells, CELL), shape=(size, size, 3), subifds=2, metadata=metadata, **options)
        for factor in (4, 16):
            side = CELL // factor
            small = [np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.BOX)) for c in cells]
            level = -(-size // factor)
            writer.write(tiles(level, small, side), shape=(level, level, 3), subfiletype=1, **options)


def fit_model(encoder: str, weights: str, path: Path) -> None:
    import histo2expr as hx

    cohort = hx.datasets.synthetic(n_slides=4, seed=0, spots_per_side=10, n_genes=60)
    hx.pp.normalize(cohort)
    hx.tl.embed_patches(cohort, encoder=encoder, weights=weights, patch_size=PATCH_SIZE, progress=False)
    model = hx.tl.fit_histo2expr(cohort, method="ridge", genes=50, progress=False)
    model.save(path)


def pipeline(args: argparse.Namespace) -> None:
    """The timed part, in its own process; prints one JSON line."""
    import torch

    import histo2expr as hx

    torch.set_num_threads(args.threads)
    hx.settings.n_threads = args.threads
    model = hx.tl.Histo2ExprModel.load(args.model)
    seconds = {}
    with MemorySampler() as memory:
        start = time.perf_counter()
        slide = hx.io.read_wsi(args.slide)
        seconds["read_wsi"] = time.perf_counter() - start
        mark = time.perf_counter()
        tiles = hx.pp.tile_slide(
            slide, spot_diameter_um=args.spot_um, spacing_um=args.spacing_um, geometry=model.patches
        )
        seconds["tile_slide"] = time.perf_counter() - mark
        mark = time.perf_counter()
        hx.tl.embed_patches(
            tiles,
            encoder=args.encoder,
            weights=args.weights,
            patch_size=PATCH_SIZE,
            mpp=model.patches["mpp"],
            batch_size=BATCH_SIZE,
            num_workers=args.workers,
            device="cpu",
            progress=False,
        )
        seconds["embed_patches"] = time.perf_counter() - mark
        mark = time.perf_counter()
        hx.tl.predict_expression(tiles, model)
        seconds["predict_expression"] = time.perf_counter() - mark
        seconds["total"] = time.perf_counter() - start
        # the reading share: every patch cut again (its own PatchSource: a cold tile cache), not encoded
        from histo2expr.patches import PatchSource

        source = PatchSource(tiles, patch_size=PATCH_SIZE, mpp=model.patches["mpp"])
        mark = time.perf_counter()
        for first in range(0, len(source), BATCH_SIZE):
            source.read(np.arange(first, min(first + BATCH_SIZE, len(source))))
        seconds["read_patches_only"] = time.perf_counter() - mark
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "seconds": seconds,
        "n_tiles": int(tiles.n_obs),
        "n_genes": int(tiles.obsm["histo2expr_pred"].shape[1]),
        "tissue_threshold": float(tiles.uns["tile_slide"]["params"]["saturation_threshold"]),
        "tissue_share": float(tiles.n_obs / tiles.uns["tile_slide"]["params"]["n_candidates"]),
        "peak": memory.mib(),
        "ru_maxrss_mib": rusage,
        "ru_maxrss_children_mib": children,
    }
    print(json.dumps(result))


def run_case(case: dict, slide: Path, model: Path, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--pipeline",
        "--slide",
        str(slide),
        "--model",
        str(model),
        "--threads",
        str(threads),
        "--encoder",
        case["encoder"],
        "--weights",
        case["weights"],
        "--spot-um",
        str(case["spot_um"]),
        "--spacing-um",
        str(case["spacing_um"]),
        "--workers",
        str(case["workers"]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env=env, cwd=Path(__file__).parent
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(
    args: argparse.Namespace, results: list[tuple[dict, dict]], slide_mb: float, minutes: float, load
) -> str:
    lines = [
        "# Virtual spatial transcriptomics benchmark",
        "",
        f"Command (from the repository root): `python benchmarks/virtual_st.py --size {args.size} --threads {args.threads}`",
        "",
        f"Machine: {machine()}; torch {args.threads} threads, CPU only. Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{minutes:.1f} minutes in all. Load averages (1 / 5 / 15 min) {load[0][0]:.2f} / {load[0][1]:.2f} / "
        f"{load[0][2]:.2f} before, {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} after: the cores are "
        "shared with other jobs, so rates vary between runs.",
        "",
        f"Slide: {args.size:,} x {args.size:,} px at 1 µm/px ({args.size**2 * 3 / 1e9:.1f} GB of RGB pixels), a mosaic "
        f"of synthetic H&E images, pyramidal OME-TIFF with 512 px JPEG tiles (quality 90), {slide_mb:.0f} MB on disk. "
        "Model: ridge on frozen features, 50 genes, patches of 224 px at 1 µm/px. Each case runs in a fresh "
        "process: read_wsi, tile_slide (Otsu tissue mask on the hires image), embed_patches (batches of 64, "
        "workers as given), predict_expression, timed end to end.",
        "",
        "| encoder | spots (µm) / pitch (µm) | workers | pseudo-spots | read_wsi s | tile_slide s | embed s | "
        "predict s | total s | **pseudo-spots/s** | patches read alone, /s | peak RSS MiB (tree) | ru_maxrss MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, result in results:
        s = result["seconds"]
        lines.append(
            f"| {case['encoder']} | {case['spot_um']:g} / {case['spacing_um']:g} | {case['workers']} | "
            f"{result['n_tiles']:,} | {s['read_wsi']:.1f} | {s['tile_slide']:.2f} | {s['embed_patches']:.1f} | "
            f"{s['predict_expression']:.2f} | {s['total']:.1f} | **{result['n_tiles'] / s['total']:.1f}** | "
            f"{result['n_tiles'] / s['read_patches_only']:.0f} | "
            f"{result['peak']['rss_mib']:.0f} | {result['ru_maxrss_mib']:.0f} |"
        )
    first = results[0][1]
    lines += [
        "",
        f"Tissue: Otsu's saturation threshold {first['tissue_threshold']:.3f}; {first['tissue_share']:.0%} of the "
        "candidate pseudo-spots lie on tissue.",
        "",
        "Reading: the hires image (2,000 px) is made from the 1/4 level; patches are cut from level 0, decoding "
        "only the JPEG tiles each patch touches. Memory stays far below the slide's size in every case: the "
        "process holds the encoder, one batch of patches and at most 64 MiB of decoded tiles (neighbouring "
        "patches share tiles, which is why reading is faster at the denser pitch).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    for name in ("--slide", "--model", "--encoder", "--weights"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--spot-um", "--spacing-um"):
        parser.add_argument(name, type=float, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline:
        pipeline(args)
        return
    start, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["HISTO2EXPR_CACHE_DIR"] = str(Path(folder) / "cache")
        slide = Path(folder) / "virtual.ome.tif"
        mark = time.perf_counter()
        write_slide(slide, args.size)
        print(f"slide written in {time.perf_counter() - mark:.0f} s", flush=True)
        results = []
        for case in CASES:
            model = Path(folder) / f"{case['encoder']}.pt"
            fit_model(case["encoder"], case["weights"], model)
            result = run_case(case, slide, model, args.threads)
            print(case["encoder"], json.dumps(result), flush=True)
            results.append((case, result))
        slide_mb = slide.stat().st_size / 1e6
    text = report(args, results, slide_mb, (time.perf_counter() - start) / 60, (load_before, os.getloadavg()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
