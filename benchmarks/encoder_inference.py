"""CPU inference of the encoders: backends against float32 eager PyTorch, embed_patches against the bare forward.

Run on demand (not a test; needs her2st and the ``onnx`` extra)::

    python benchmarks/encoder_inference.py [--spots 192] [--rounds 3] [--e2e-spots 0]
        [--encoders efficientnet_lite0 ...] [--her2st ../shared/data/her2st]
        [--out benchmarks/results/encoder_inference.md]

Part 1, backends. For each encoder (the ImageNet EfficientNet-Lite0/1/2 that embed_patches offers,
and a timm ViT-S/16 with seeded random weights standing in for the transformer foundation models),
``--spots`` real her2st patches (224 px, evenly spaced over the six sections, held in memory as
uint8) are pushed through every backend in batches of 64, in ``--rounds`` rounds; each round runs
every backend once, starting from a different one, so all see the same load. Throughput ratios
(backend / float32 eager PyTorch) are taken within each round and their median reported, with the
cosine similarity of every patch's features to the float32 eager features of the same round.
Backends: ``torch``, ``onnx`` and ``bf16`` of :class:`histo2expr.models.InferenceEncoder`, and two
that the package does not offer, measured to show why: ``compile`` (``torch.compile``, inductor
with freezing) and ``int8`` (ONNX Runtime quantization: static QDQ, per channel, calibrated on 32
other her2st patches, for the CNNs; dynamic MatMul quantization for the ViT). Their one-time setup
(ONNX export, compilation, quantization) is timed on the first batch.

Part 2, end to end. ``hx.tl.embed_patches`` embeds ``--e2e-spots`` her2st spots (0: all) with
``backend="torch"``, ``backend="auto"`` (ONNX Runtime here, with its check of the first patches
against PyTorch) and ``backend="auto", num_workers=1`` (patch reading in a worker process,
overlapping the forward), each right after a bare forward of as many in-memory patches by the
backend it runs; the ONNX export is already cached by then. Reported: patches/s, the
ratio embed / bare forward of each backend, embed onnx / embed torch, and the cosine of the
features of every embedded spot to those of ``backend="torch"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from patch_streaming import machine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HER2ST = ROOT.parent / "shared" / "data" / "her2st"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "encoder_inference.md"
ENCODERS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "vit_small_patch16_224"]
# candidates the package does not offer, measured on the default encoder and the ViT only
UNOFFERED = {"efficientnet_lite0", "vit_small_patch16_224"}
PATCH_SIZE, BATCH_SIZE, CALIBRATION = 224, 64, 32
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def build(name: str):
    import torch

    from histo2expr.models import build_encoder

    torch.manual_seed(0)
    weights = "imagenet" if name.startswith("efficientnet_lite") else None
    encoder = build_encoder(name, weights=weights).eval()
    return encoder.to(memory_format=torch.channels_last)  # as embed_patches does for names


def package_backend(encoder, backend: str):
    from histo2expr.models import InferenceEncoder

    runner = InferenceEncoder(encoder, backend=backend, channels_last=True)
    return lambda images: runner(images)[0].float()


def compiled_backend(encoder):
    import torch
    import torch._inductor.config

    torch._inductor.config.freezing = True
    compiled = torch.compile(encoder, dynamic=False)

    def run(images):
        with torch.inference_mode():
            return compiled(images.contiguous(memory_format=torch.channels_last))

    return run


def int8_backend(encoder, calibration, folder: Path):
    import onnxruntime
    import torch
    from onnxruntime import quantization

    from histo2expr.models.backends import export_onnx

    source, target = folder / f"{encoder.name}.onnx", folder / f"{encoder.name}.int8.onnx"
    export_onnx(encoder, source, (PATCH_SIZE, PATCH_SIZE), tokens=False)
    if encoder.name.startswith("efficientnet"):
        prepared = folder / f"{encoder.name}.pre.onnx"
        quantization.shape_inference.quant_pre_process(str(source), str(prepared))

        class Reader(quantization.CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"images": calibration.numpy()}])

            def get_next(self):
                return next(self.batches, None)

        quantization.quantize_static(
            str(prepared), str(target), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True
        )
    else:
        quantization.quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def forward_all(run, images):
    import torch

    return torch.cat([run(images[i : i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE)])


def cosine(a, b) -> np.ndarray:
    import torch

    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).numpy()


def backends_case(name: str, images, calibration, rounds: int, folder: Path) -> dict:
    """Part 1 for one encoder: setup seconds, per-round patches/s and cosines of every backend."""
    from histo2expr.models.backends import cpu_supports_bf16

    encoder = build(name)
    makers = {
        "torch": lambda: package_backend(encoder, "torch"),
        "onnx": lambda: package_backend(encoder, "onnx"),
    }
    if cpu_supports_bf16():
        makers["bf16"] = lambda: package_backend(encoder, "bf16")
    if name in UNOFFERED:
        makers["compile"] = lambda: compiled_backend(encoder)
        makers["int8"] = lambda: int8_backend(encoder, calibration, folder)
    runs, setup = {}, {}
    for backend, make in makers.items():
        start = time.perf_counter()
        runs[backend] = make()
        runs[backend](images[:BATCH_SIZE])  # first batch: export / compilation / quantization
        setup[backend] = time.perf_counter() - start
        print(f"{name} {backend}: setup {setup[backend]:.1f} s", file=sys.stderr, flush=True)
    names = list(runs)
    speed = {backend: [] for backend in names}
    similarity = {}
    for round_ in range(rounds):
        outputs = {}
        for backend in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            outputs[backend] = forward_all(runs[backend], images)
            speed[backend].append(len(images) / (time.perf_counter() - start))
        similarity = {backend: cosine(outputs[backend], outputs["torch"]) for backend in names}
        print(f"{name} round {round_}: {speed}", file=sys.stderr, flush=True)
    return {
        "encoder": name,
        "setup_s": setup,
        "patches_per_s": speed,
        "ratio": {b: [s / t for s, t in zip(speed[b], speed["torch"], strict=True)] for b in names},
        "cosine_min": {b: float(similarity[b].min()) for b in names},
        "cosine_mean": {b: float(similarity[b].mean()) for b in names},
        "load": os.getloadavg(),
    }


def end_to_end(adata, images, rounds: int) -> dict:
    """Part 2: embed_patches of every spot of ``adata`` per backend, each after a bare forward of as many patches."""
    import histo2expr as hx

    # "auto" runs ONNX Runtime here, with its check of the first patches against PyTorch
    variants = {"torch": ("torch", 0), "auto": ("auto", 0), "auto, 1 worker": ("auto", 1)}
    bare_runs = {
        backend: package_backend(build("efficientnet_lite0"), backend) for backend in ("torch", "onnx")
    }
    for run in bare_runs.values():
        run(images[:BATCH_SIZE])  # export (cached for embed_patches too) and warm-up
    repeat = -(-adata.n_obs // len(images))
    bare_images = images.repeat(repeat, 1, 1, 1)[: adata.n_obs]
    result = {variant: {"bare": [], "embed": []} for variant in variants}
    features = {}
    for _ in range(rounds):
        for variant, (backend, workers) in variants.items():
            start = time.perf_counter()
            forward_all(bare_runs["torch" if backend == "torch" else "onnx"], bare_images)
            result[variant]["bare"].append(adata.n_obs / (time.perf_counter() - start))
            start = time.perf_counter()
            hx.tl.embed_patches(
                adata,
                encoder="efficientnet_lite0",
                weights="imagenet",
                patch_size=PATCH_SIZE,
                batch_size=BATCH_SIZE,
                device="cpu",
                backend=backend,
                num_workers=workers,
                key_added=variant,
                progress=False,
            )
            result[variant]["embed"].append(adata.n_obs / (time.perf_counter() - start))
            features[variant] = adata.obsm[variant]
            result[variant]["ran"] = adata.uns[variant]["backend"]
            print(f"e2e {variant}: {result[variant]}", file=sys.stderr, flush=True)
    import torch

    for variant in variants:
        similarity = cosine(torch.from_numpy(features[variant]), torch.from_numpy(features["torch"]))
        result[variant]["cosine_min"] = float(similarity.min())
        result[variant]["cosine_mean"] = float(similarity.mean())
    result["spots"] = adata.n_obs
    return result


def load_patches(her2st: Path, n_spots: int):
    """The her2st cohort, ``n_spots`` evenly spaced patches (uint8, NCHW) and 32 others for calibration."""
    import torch

    import histo2expr as hx
    from histo2expr.patches import PatchSource

    adata = hx.io.read_legacy_st(her2st)
    source = PatchSource(adata, patch_size=PATCH_SIZE)
    chosen = np.linspace(0, adata.n_obs - 1, n_spots).round().astype(int)
    others = np.setdiff1d(np.arange(adata.n_obs), chosen)
    others = others[np.linspace(0, len(others) - 1, CALIBRATION).round().astype(int)]

    def stack(rows):
        return torch.from_numpy(np.stack([source[int(i)] for i in rows]).transpose(0, 3, 1, 2).copy())

    return adata, stack(chosen), stack(others)


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)


def _median(values) -> float:
    return statistics.median(values)


def report(
    cases: list[dict], e2e: dict | None, args, command: str, loads, wall_s: float, threads: int
) -> str:
    import onnxruntime
    import torch

    from histo2expr.models.backends import CHECKED_PATCHES

    lines = [
        "# Encoder inference on the CPU",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {machine()}; CPU flags: {cpu_flags()}; torch {threads} intra-op threads (the default), "
        f"ONNX Runtime {onnxruntime.__version__} with as many (`intra_op_num_threads` = torch's), CPU only. "
        f"Run {time.strftime('%Y-%m-%d %H:%M')}, {wall_s / 60:.1f} minutes in all.",
        "",
        f"**The machine was loaded**: its {os.cpu_count()} cores were shared with other jobs (load average "
        f"{loads[0][0]:.1f} / {loads[0][1]:.1f} / {loads[0][2]:.1f} at the start, {loads[1][0]:.1f} / "
        f"{loads[1][1]:.1f} / {loads[1][2]:.1f} at the end), so absolute patches/s are low and noisy; "
        "the backends alternate within each round, and the ratios, taken within a round, are the numbers "
        "to read.",
        "",
        f"## Backends against float32 eager PyTorch ({args.spots} real her2st patches, {PATCH_SIZE} px, "
        f"batches of {BATCH_SIZE}, {args.rounds} rounds, medians)",
        "",
        "`torch`, `onnx`, `bf16`: `hx.models.InferenceEncoder` (what `embed_patches(backend=...)` runs); "
        "`compile`, `int8`: not offered by the package, measured to show why. Cosine: of each patch's "
        "features to its float32 eager features (acceptance: min >= 0.999). Setup: the one-time cost on "
        "the first batch (ONNX export, compilation, quantization; the package caches the ONNX export).",
        "",
        "| encoder | backend | patches/s | ratio to torch | cosine min | cosine mean | setup (s) | per-round ratios |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for backend in case["patches_per_s"]:
            ratios = case["ratio"][backend]
            lines.append(
                f"| {case['encoder']} | {backend} | {_median(case['patches_per_s'][backend]):.1f} | "
                f"**{_median(ratios):.2f}** | {case['cosine_min'][backend]:.5f} | "
                f"{case['cosine_mean'][backend]:.6f} | {case['setup_s'][backend]:.1f} | "
                f"{', '.join(f'{r:.2f}' for r in ratios)} |"
            )
    if e2e is not None:
        torch_embed = e2e["torch"]["embed"]
        lines += [
            "",
            f"## End to end: `embed_patches` against the bare forward ({e2e['spots']} her2st spots, "
            "efficientnet_lite0, ImageNet weights)",
            "",
            "Bare: the same backend on as many in-memory patches; embed: one `hx.tl.embed_patches` call "
            "timed end to end (builds the encoder, finds the cached ONNX export, cuts the patches from the "
            "decoded-image cache, runs the forward; `auto` also checks its first "
            f"{CHECKED_PATCHES} patches against PyTorch). Cosine: of every spot's features to those of "
            "`backend='torch'`.",
            "",
            "| backend | bare patches/s | embed patches/s | embed / bare | embed / embed torch | cosine min | cosine mean |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in ("torch", "auto", "auto, 1 worker"):
            entry = e2e[variant]
            ratio = _median([e / b for e, b in zip(entry["embed"], entry["bare"], strict=True)])
            speedup = _median([e / t for e, t in zip(entry["embed"], torch_embed, strict=True)])
            lines.append(
                f"| {variant} (ran {entry['ran']}) | {_median(entry['bare']):.1f} | {_median(entry['embed']):.1f} | **{ratio:.2f}** | "
                f"**{speedup:.2f}** | {entry['cosine_min']:.6f} | {entry['cosine_mean']:.7f} |"
            )
    lines += ["", f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spots", type=int, default=192, help="her2st patches per backend pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the backends")
    parser.add_argument("--encoders", nargs="+", default=ENCODERS)
    parser.add_argument(
        "--e2e-spots", type=int, default=0, help="spots embedded end to end (0: all; -1: skip)"
    )
    parser.add_argument("--e2e-rounds", type=int, default=1)
    parser.add_argument("--her2st", type=Path, default=DEFAULT_HER2ST)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    import torch

    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    start, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="histo2expr-inference-") as folder:
        os.environ["HISTO2EXPR_CACHE_DIR"] = str(Path(folder) / "cache")  # ONNX exports start uncached
        adata, images, calibration = load_patches(args.her2st, args.spots)
        cases = [
            backends_case(name, images, calibration, args.rounds, Path(folder)) for name in args.encoders
        ]
        e2e = None
        if args.e2e_spots >= 0:
            if 0 < args.e2e_spots < adata.n_obs:
                adata = adata[np.linspace(0, adata.n_obs - 1, args.e2e_spots).round().astype(int)].copy()
            e2e = end_to_end(adata, images, args.e2e_rounds)
    loads = (load_start, os.getloadavg())
    text = report(cases, e2e, args, command, loads, time.perf_counter() - start, torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
