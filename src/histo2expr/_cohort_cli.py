"""``histo2expr embed`` and ``histo2expr predict``: the cohort tools of :mod:`histo2expr.tl` on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._keys import EMBEDDING_KEY, PREDICT_KEY
from .cli import (
    CommandError,
    _check_encoder,
    _int_at_least,
    _one_line,
    add_backend_option,
    add_engine_options,
    add_feature_options,
    engine_options,
    feature_options,
)


def _weights(text: str) -> str | None:
    """``--weights``: ``default``, ``imagenet``, ``random`` (None: seeded random weights) or a checkpoint path."""
    return None if text == "random" else text


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The options both commands hand to the API."""
    return {
        "spot_diameter_um": args.spot_diameter_um,
        "spacing_um": args.spacing_um,
        "slide_mpp": args.slide_mpp,
        "format": args.format,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "overwrite": args.overwrite,
        "backend": args.backend,
        "progress": args.progress,
        **engine_options(args),
    }


def _run(call: Any) -> int:
    """Run ``call``; failed slides give one line on stderr, status 1 (a missing package: status 2)."""
    from .tl import SlidesFailedError

    try:
        call()
    except ImportError as error:  # a backend whose packages are missing: the message names them
        raise CommandError(str(error)) from error
    except SlidesFailedError as error:
        print(f"histo2expr: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


def _embed(args: argparse.Namespace) -> int:
    from . import tl

    _check_encoder(args.encoder)
    return _run(
        lambda: tl.embed_cohort(
            args.slides,
            args.out,
            encoder=args.encoder,
            weights=args.weights,
            patch_size=args.patch_size,
            mpp=args.mpp,
            **feature_options(args),
            tokens=args.tokens,
            seed=args.seed,
            key_added=args.key_added,
            **_common(args),
        ),
    )


def _predict(args: argparse.Namespace) -> int:
    from . import tl

    if not args.model.is_file():
        raise CommandError(
            f"--model {args.model}: No model file there; give the file `histo2expr fit` wrote."
        )
    return _run(
        lambda: tl.predict_cohort(
            args.slides,
            args.model,
            args.out,
            key_added=args.key_added,
            scale=args.scale,
            library_size=args.library_size,
            **_common(args),
        ),
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _add_shared(add: Any) -> None:
    add(
        "slides",
        nargs="+",
        help="whole-slide images, Visium (Space Ranger) folders or .h5ad files; quoted glob patterns are expanded",
    )
    add("--out", type=Path, required=True, help="folder of the outputs, one per slide (made if missing)")
    add(
        "--format",
        choices=("h5ad", "zarr"),
        default="h5ad",
        help="h5ad (AnnData) or zarr (SpatialData) (default h5ad)",
    )
    add(
        "--spot-diameter-um",
        type=_positive_float,
        default=None,
        help="whole-slide images: pseudo-spot diameter in µm (default: the model's, else 55)",
    )
    add(
        "--spacing-um",
        type=_positive_float,
        default=None,
        help="whole-slide images: pseudo-spot spacing in µm (default: the model's, else the diameter)",
    )
    add(
        "--slide-mpp",
        type=_positive_float,
        default=None,
        help="whole-slide images that record no pixel size: µm per full-resolution pixel",
    )
    add("--batch-size", type=_int_at_least(1), default=64, help="patches per forward pass (default 64)")
    add("--workers", type=_int_at_least(0), default=0, help="DataLoader workers per process (default 0)")
    add_engine_options(add, nodes="machines sharing the slides, e.g. under SLURM (default 1)")
    add_backend_option(add)
    add(
        "--overwrite", action="store_true", help="redo every slide (default: skip slides whose output exists)"
    )


def add_cohort_commands(commands: Any) -> None:
    """Add ``embed`` and ``predict`` to the sub-commands of ``histo2expr``."""
    from ._records import SCALES

    embed = commands.add_parser(
        "embed", help="embed every slide of a cohort, one output per slide, resumable"
    )
    _add_shared(embed.add_argument)
    add = embed.add_argument
    add(
        "--encoder",
        default="efficientnet_lite0",
        help="encoder: efficientnet_lite0/1/2, colour_texture, a pathology foundation model or a timm name",
    )
    add(
        "--weights",
        type=_weights,
        default="default",
        help="default, imagenet, random (seeded by --seed) or a checkpoint path (default: default)",
    )
    add("--patch-size", type=_int_at_least(2), default=224, help="patch side in pixels (default 224)")
    add("--mpp", type=_positive_float, default=None, help="µm per patch pixel (default: the slide's own)")
    add_feature_options(add)
    add(
        "--tokens",
        type=_int_at_least(1),
        default=None,
        help="also keep a TOKENS x TOKENS grid of image tokens",
    )
    add("--seed", type=_int_at_least(0), default=0, help="seed of random weights (default 0)")
    add("--key-added", default=EMBEDDING_KEY, help=f"obsm key of the features (default {EMBEDDING_KEY})")
    embed.set_defaults(func=_embed)

    predict = commands.add_parser(
        "predict", help="predict expression on every slide of a cohort with a fitted model, resumable"
    )
    _add_shared(predict.add_argument)
    add = predict.add_argument
    add(
        "--model",
        type=Path,
        required=True,
        help="model file written by `histo2expr fit` (or Histo2ExprModel.save)",
    )
    add(
        "--scale",
        choices=sorted(SCALES),
        default="training",
        help="scale of the predictions (default training)",
    )
    add(
        "--library-size",
        type=_positive_float,
        default=None,
        help="with --scale depth: median counts per spot of slides without counts",
    )
    add("--key-added", default=PREDICT_KEY, help=f"key of the predictions (default {PREDICT_KEY})")
    predict.set_defaults(func=_predict)
