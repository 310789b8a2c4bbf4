"""The ``histo2expr`` command line: ``demo``, ``benchmark``, ``fit``, and ``embed`` / ``predict`` over cohorts."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import _logging as logg
from ._hest_benchmark import PROTOCOLS
from ._keys import EMBEDDING_KEY, Key
from ._logging import LEVELS, Verbosity
from ._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData

    from ._benchmark import MethodRun

#: Readers of ``histo2expr benchmark --reader``.
READERS = ("auto", "legacy_st", "visium", "hest", "h5ad")
#: Accelerators of ``histo2expr fit --accelerator`` (Lightning's names).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: Cross-validation schemes of ``histo2expr benchmark --cv``.
CV_SCHEMES = ("leave_one_slide_out", "leave_one_patient_out")
#: Suffixes of the result keys when both cross-validation schemes run.
_PROTOCOL_SUFFIX = {"leave_one_slide_out": "_loso", "leave_one_patient_out": "_lopo"}


class CommandError(Exception):
    """Bad command-line input: printed as one line on stderr, exit status 2."""


#: What histo2expr raises for bad input; the command prints its message as one line (exit status 2).
BAD_INPUT = (CommandError, ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a :class:`CommandError`), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see `{self.prog} --help`)")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {low}, got {text!r}")
        return value

    return parse


def _method_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _check_encoder(name: str) -> None:
    """Raise the encoder's clear error now when ``name`` is no encoder, without building a known one."""
    import timm
    from timm.models import split_model_name_tag

    from .models import BUILTIN_ENCODERS, ENCODER_PRESETS, build_encoder

    timm_name = split_model_name_tag(BUILTIN_ENCODERS.get(name, name))[0]
    if name != "colour_texture" and name not in ENCODER_PRESETS and not timm.is_model(timm_name):
        build_encoder(name, weights=None)  # fails with the names there are


def _check_common(args: argparse.Namespace, regime: str) -> list[str]:
    """Check what both commands take, before any work; return the methods (``--methods``, else every one of ``regime``)."""
    from ._validation import check_patch_size
    from .models import available_methods, get_method, resolve_device
    from .models.backends import check_backend

    check_patch_size(args.patch_size)
    if args.methods is None:
        methods = [m for m in available_methods() if regime in get_method(m).regimes]
    else:
        methods = _method_list(args.methods)
        if not methods:
            raise CommandError("--methods names no method; give e.g. --methods ridge,stnet.")
        for method in methods:
            if regime not in get_method(method).regimes:
                raise CommandError(
                    f"method {method!r} supports the {get_method(method).regimes} regime(s), not "
                    f"{regime!r}; drop it from --methods or use --regime frozen."
                )
        if len(set(methods)) != len(methods):
            raise CommandError(f"--methods lists a method twice ({args.methods}); give each once.")
    _check_encoder(args.encoder)
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        raise CommandError(f"--device {args.device}: {error}") from error
    try:
        check_backend(args.backend, device)
    except (ValueError, ImportError) as error:
        raise CommandError(f"--backend {args.backend}: {error}") from error
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(
            f"--out {args.out} is a file; give a folder for the results (it is made if missing)."
        )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"--out {args.out} cannot be made ({error.strerror}); give a writable folder."
        ) from error
    if not os.access(args.out, os.W_OK):
        raise CommandError(f"--out {args.out} is not writable; give a folder you can write to.")
    return methods


def _report(
    adata: AnnData,
    runs: list[MethodRun],
    *,
    out: Path,
    title: str,
    preamble: list[str],
    settings: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Print the report, write results.json / results.md and the figures into ``out``, say where.

    ``extra``: further top-level entries of results.json.
    With several cross-validation schemes, each one's figures go to a sub-folder named after it.
    """
    from . import pl
    from ._benchmark import results_markdown, write_results

    markdown = results_markdown(runs, title=title, preamble=preamble)
    print()
    print(markdown)
    written = write_results(runs, out, markdown=markdown, settings=settings, extra=extra)
    protocols = list(dict.fromkeys(run.protocol for run in runs))
    for protocol in protocols:
        keys = [run.key for run in runs if run.protocol == protocol]
        written += pl.save_run_figures(adata, key=keys, out_dir=out / protocol if len(protocols) > 1 else out)
    print("Written:")
    for path in written:
        print(f"  {path}")


#: Side of the grid of frozen image tokens kept for methods that take tokens (e.g. ``"cmrcnet"``).
TOKEN_GRID = 3


def _token_grid(encoder: Any, patch_size: int) -> int | None:
    """:data:`TOKEN_GRID`, or the encoder's own smaller grid at ``patch_size``; None without a feature map."""
    import torch

    if encoder.token_dim is None:
        return None  # e.g. colour_texture: methods taking tokens use the pooled features
    with torch.inference_mode():
        n_tokens = (
            encoder.eval()
            .forward_tokens(torch.zeros(1, 3, patch_size, patch_size, dtype=torch.uint8))
            .shape[1]
        )
    return min(TOKEN_GRID, int(n_tokens**0.5))


def _embed(
    adata: AnnData, args: argparse.Namespace, methods: Sequence[str], *, mpp: float | None = None
) -> tuple[float, str]:
    """Frozen features of every spot into ``obsm["X_histo"]`` (and tokens when a method takes them).

    Returns the seconds taken and the inference backend that ran the encoder.

    The feature options (:func:`feature_options`) override :func:`~histo2expr.tl.embed_patches`' defaults.

    ``mpp``: pixel size of the patches (None: the slides' native resolution).
    """
    from . import tl
    from .models import build_encoder, get_method

    grid = None
    if any(getattr(get_method(m), "token_input", False) for m in methods):
        grid = _token_grid(build_encoder(args.encoder, weights=None), args.patch_size)
    tic = time.perf_counter()
    tl.embed_patches(
        adata,
        tokens=grid,
        **feature_options(args),
        encoder=args.encoder,
        patch_size=args.patch_size,
        mpp=mpp,
        num_workers=args.workers,
        device=args.device,
        backend=args.backend,
        progress=args.progress,
    )
    return time.perf_counter() - tic, adata.uns["X_histo"]["backend"]


def _jobs(text: str) -> int | str:
    """``--jobs``: ``auto`` or a positive number."""
    if text == "auto":
        return text
    return _int_at_least(1)(text)


def _n_jobs(args: argparse.Namespace, n_methods: int) -> int:
    """The processes of ``histo2expr benchmark`` (of ``n_methods`` methods): ``--jobs``, ``auto`` resolved.

    In the frozen regime a job is one fold fit, in the others one method's cross-validations.
    """
    from ._settings import available_cpus
    from .models import resolve_device

    frozen = args.regime == "frozen"
    if args.jobs == "auto":
        return available_cpus() if frozen and resolve_device(args.device).type == "cpu" else 1
    return args.jobs if frozen else min(args.jobs, n_methods)


def _jobs_note(n_jobs: int, regime: str) -> str:
    """How the report's cross-validations ran, in words."""
    shared = "a fold that two schemes train on the same spots fitted once"
    if n_jobs == 1:
        return f"Cross-validations one after the other in one process ({shared})."
    job = "one fold fit" if regime == "frozen" else "a method's cross-validations under every scheme"
    return f"{n_jobs} processes fitting at once, a job being {job} ({shared})."


def _device_flags(device: str) -> dict[str, Any]:
    """``--device`` as the ``accelerator`` and ``devices`` of :func:`~histo2expr.tl.fit_histo2expr`."""
    from .models.inference import lightning_device

    accelerator, devices = lightning_device(device)
    return {"accelerator": accelerator, "devices": devices}


def _devices(text: str) -> int | str | list[int]:
    """``--devices``: a number (``2``, ``-1`` for all), ``auto``, or comma-separated indices (``0,1``)."""
    text = text.strip()
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return text if text == "auto" else int(text)
    except ValueError as error:
        msg = (
            f"--devices must be a number, 'auto' or comma-separated device indices such as 0,1; got {text!r}"
        )
        raise argparse.ArgumentTypeError(msg) from error


def _setting(text: str) -> tuple[str, Any]:
    """``--param NAME=VALUE``: a method setting, the value read as a Python literal (else as text)."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        msg = f"--param takes NAME=VALUE (e.g. top_k=20), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name.strip(), parsed


def _check_fit(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Check the options of ``histo2expr fit`` before any work; return the method's class, settings and regime."""
    from .models import TrainConfig, check_engine_flags, get_method

    method_class = get_method(args.method)
    if args.regime not in method_class.regimes:
        raise CommandError(
            f"method {args.method!r} supports the {' and '.join(method_class.regimes)} regime(s), not "
            f"--regime {args.regime}."
        )
    method_params = dict(args.param)
    if args.regime != "frozen":
        _check_encoder(args.encoder)
        method_params.setdefault("encoder", args.encoder)
    method_class(**method_params)  # the settings' own checks
    regime = regime_options(args, method_params.get("encoder", args.encoder))
    interval_options(args)
    try:
        check_engine_flags(TrainConfig(**_training_options(args), progress=False))
    except ValueError as error:
        raise CommandError(str(error)) from error
    if args.out.is_dir():
        raise CommandError(f"--out {args.out} is a folder; give the model file to write (e.g. model.pt).")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(
            f"--out {args.out}: its folder cannot be made ({error.strerror}); give a writable place."
        ) from error
    if not os.access(args.out.parent, os.W_OK):
        raise CommandError(f"--out {args.out}: its folder is not writable; give a place you can write to.")
    _check_data(args.data, args.reader)
    return method_class, method_params, regime


def _fit(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from . import pp

    start = time.perf_counter()
    method_class, method_params, regime = _check_fit(args)
    slides = _method_list(args.slides) if args.slides else None
    adata = read_cohort(args.data, reader=args.reader, slides=slides)
    if "log1p" not in adata.uns:
        pp.normalize(adata)
    model = _fit_model(adata, args, use_rep=_use_rep(adata, args), regime=regime, method_params=method_params)
    # every process of a data-parallel run holds the same model; Lightning sets `rank` (untyped) at import
    if getattr(rank_zero_only, "rank", 0) != 0:
        return 0
    model.save(args.out)
    report = model.method.report
    epochs = "" if report is None or not report.train_loss else f", {len(report.train_loss)} epochs"
    print(
        f"histo2expr fit: {method_class.name} ({args.regime}) on {adata.n_obs} spots of "
        f"{adata.obs['slide'].nunique()} slides, {len(model.genes)} genes{epochs}, in "
        f"{time.perf_counter() - start:.1f} s. Saved {args.out}."
    )
    return 0


def _use_rep(adata: AnnData, args: argparse.Namespace) -> str | None:
    """``--use-rep`` of ``histo2expr fit``: the frozen features the regime reads (None: none), checked in ``adata``."""
    if args.regime == "end2end":
        return None
    if args.use_rep == "none":
        if args.regime == "frozen":
            raise CommandError(
                "--use-rep none: the frozen regime needs frozen features; give their obsm key."
            )
        return None
    if args.use_rep not in adata.obsm:
        if args.regime == "frozen":
            what, fix = "frozen features", "or use --regime end2end"
        else:
            what = "frozen features (their context and neighbour blocks join the adapted features)"
            fix = "or pass --use-rep none for the adapted features alone"
        raise CommandError(
            f"{args.data} has no {what} in obsm[{args.use_rep!r}]; embed them first with "
            f"`hx.tl.embed_patches(adata, key_added={args.use_rep!r})` and save the AnnData, {fix}."
        )
    return args.use_rep


def _fit_model(
    adata: AnnData,
    args: argparse.Namespace,
    *,
    use_rep: str | None,
    regime: dict[str, Any],
    method_params: dict,
) -> Any:
    """:func:`~histo2expr.tl.fit_histo2expr` with the options of ``histo2expr fit`` (``regime``: :func:`regime_options`)."""
    from . import tl

    return tl.fit_histo2expr(
        adata,
        method=args.method,
        genes=args.genes,
        use_rep=use_rep,
        patch_size=args.patch_size,
        progress=args.progress,
        **regime,
        **_training_options(args),
        **interval_options(args),
        **method_params,
    )


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options of ``histo2expr fit``, as ``TrainConfig`` and ``fit_histo2expr`` name them."""
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "num_workers": args.workers,
        **engine_options(args),
        "precision": args.precision,
    }


def _embedding_options(adata: AnnData) -> dict[str, Any]:
    """The feature options ``obsm["X_histo"]`` was embedded with (``tta``, ``context``, ...), for the report."""
    patches = adata.uns[Key.uns.record(EMBEDDING_KEY)]["patches"]
    return {option: patches.get(option) for option in FEATURE_OPTIONS}


def _embedding_note(options: Mapping[str, Any]) -> str:
    """``options`` of :func:`_embedding_options` in words."""
    views = (
        f"averaged over {options['tta']} views of each patch"
        if options["tta"] > 1
        else "one view of each patch"
    )
    stain = ", Macenko stain-normalised" if options.get("stain_normalization") else ""
    context = f", with a context view {options['context']:g} times wider" if options.get("context") else ""
    near = f", then the mean of the {options['neighbours']} nearest spots" if options["neighbours"] else ""
    return f"{views}{stain}{context}{near}"


def _adapted_note(options: Mapping[str, Any], embedding: Mapping[str, Any]) -> str:
    """The adapted regime's options (:func:`regime_options`) and the frozen blocks joining it in words."""
    stain = f" and {options['stain_copies']} stain-jittered copies" if options["stain_copies"] else ""
    blocks = [name for name in ("context", "neighbours") if embedding.get(name)]
    joined = f", next to the frozen features' {' and '.join(blocks)} block(s)" if blocks else ""
    return (
        f"Adapted regime: each method trains the encoder's top {logg.counted(options['trainable_blocks'], 'stage')} "
        f"on cached activations of the lower ones ({options['views']} dihedral views{stain} per patch){joined}."
    )


def _demo(args: argparse.Namespace) -> int:
    from . import datasets, pp
    from ._benchmark import compare_methods

    start = time.perf_counter()
    if args.n_slides < 2:
        raise CommandError("cross-validation needs at least two slides; use --n-slides 2 or more.")
    methods = _check_common(args, "frozen")
    print(
        f"histo2expr demo: synthetic cohort of {args.n_slides} slides (seed {args.seed}), frozen {args.encoder} "
        f"features of {args.patch_size} px patches; leave-one-slide-out for {', '.join(methods)} on "
        f"{args.genes} highly expressed genes chosen on the training slides of each fold."
    )
    adata = datasets.synthetic(n_slides=args.n_slides, seed=args.seed)
    pp.normalize(adata)
    embed_seconds, backend = _embed(adata, args, methods)
    embedding = _embedding_options(adata)
    runs = compare_methods(
        adata,
        methods,
        genes=args.genes,
        seed=args.seed,
        epochs=args.epochs,
        progress=args.progress,
        **_device_flags(args.device),
    )
    total = time.perf_counter() - start
    command = "histo2expr " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    _report(
        adata,
        runs,
        out=args.out,
        title=f"histo2expr demo: synthetic cohort of {args.n_slides} slides, leave-one-slide-out",
        preamble=[
            f"Command: `{command}`",
            "",
            f"Frozen {args.encoder} features of {args.patch_size} px patches, {_embedding_note(embedding)} "
            f"(embedding: {embed_seconds:.1f} s, backend {backend}); "
            f"{args.genes} highly expressed genes chosen on the training slides of each fold; "
            f"at most {args.epochs} epochs. Whole run: {total:.1f} s.",
            "",
        ],
        settings={
            "command": command,
            "n_slides": args.n_slides,
            "seed": args.seed,
            "genes": args.genes,
            "encoder": args.encoder,
            "backend": backend,
            "patch_size": args.patch_size,
            "embedding": embedding,
            "epochs": args.epochs,
            "embedding_seconds": embed_seconds,
            "total_seconds": total,
        },
    )
    print(f"Done in {time.perf_counter() - start:.1f} s.")
    return 0


def _detect_reader(path: Path) -> str:
    if path.suffix == ".h5ad":
        return "h5ad"
    if (path / "st").is_dir() and (path / "metadata").is_dir():
        return "hest"
    if _space_ranger_folders(path):
        return "visium"
    return "legacy_st"


def _space_ranger_folders(path: Path) -> list[Path]:
    """The Space Ranger output folders directly under ``path`` (or their ``outs``): those with counts (.h5 or mtx)."""
    return sorted(
        {
            counts.parent
            for pattern in ("*/filtered_feature_bc_matrix*", "*/outs/filtered_feature_bc_matrix*")
            for counts in path.glob(pattern)
            if counts.name in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")
        }
    )


def _read_visium_folder(path: Path) -> AnnData:
    """Every Space Ranger output folder directly under ``path`` (or its ``outs``), one slide each."""
    import anndata as ad

    from . import io

    outs = _space_ranger_folders(path)
    slides = [
        io.read_visium(folder, library_id=(folder.parent if folder.name == "outs" else folder).name)
        for folder in outs
    ]
    return ad.concat(slides, join="inner", merge="same", uns_merge="unique")


def _check_data(path: Path, reader: str) -> str:
    """The reader of ``--data``, after checking that the path can be what it reads."""
    if not path.exists():
        raise CommandError(f"--data {path} does not exist; give the dataset folder (or .h5ad file).")
    reader = _detect_reader(path) if reader == "auto" else reader
    if reader == "h5ad" and not path.is_file():
        raise CommandError(
            f"--data {path} is a folder, not an .h5ad file; give the file, or --reader for the folder."
        )
    if reader != "h5ad" and not path.is_dir():
        raise CommandError(
            f"--data {path} is a file, but the {reader} reader reads a folder; give the dataset folder (legacy ST, "
            "or a folder of Space Ranger outputs) or an .h5ad file."
        )
    return reader


def read_cohort(path: Path, *, reader: str = "auto", slides: Sequence[str] | None = None) -> AnnData:
    """The spots of ``path`` in the histo2expr data model, restricted to ``slides`` when given.

    Parameters
    ----------
    path
        A legacy ST dataset folder (:func:`histo2expr.io.read_legacy_st`), a folder of Space
        Ranger output folders (one Visium slide each, :func:`histo2expr.io.read_visium`), a HEST
        folder (:func:`histo2expr.io.read_hest`) or an ``.h5ad`` file following the data model.
    reader
        ``"legacy_st"``, ``"visium"``, ``"hest"``, ``"h5ad"`` or ``"auto"`` (from the path).
    slides
        Slide ids to keep; all by default.
    """
    import anndata as ad

    from . import io

    reader = _check_data(path, reader)
    if reader == "legacy_st":
        adata = io.read_legacy_st(path, sections=slides)
    elif reader == "hest":
        adata = io.read_hest(path, ids=slides)
    elif reader == "visium":
        adata = _read_visium_folder(path)
    else:
        adata = ad.read_h5ad(path)
    if "slide" not in adata.obs:
        raise CommandError(f"{path} has no obs['slide'] column; benchmarks cross-validate by slide.")
    if slides and reader not in ("legacy_st", "hest"):
        missing = sorted(set(slides) - set(adata.obs["slide"].astype(str)))
        if missing:
            raise CommandError(
                f"--slides {','.join(missing)} not found; the slides are {sorted(adata.obs['slide'].unique())}."
            )
        adata = adata[adata.obs["slide"].astype(str).isin(slides)].copy()
    return adata


def _protocols(adata: AnnData, cv: str | None) -> tuple[list[str], str]:
    """The cross-validation schemes to run, and a note when patients contribute several slides.

    ``cv=None``: leave-one-slide-out, and leave-one-patient-out as well when patients repeat.
    """
    if "patient" not in adata.obs:
        return (["leave_one_slide_out"] if cv is None else [cv]), ""
    slides_per_patient = adata.obs.groupby(adata.obs["patient"].astype(str), observed=True)["slide"].nunique()
    repeated = slides_per_patient[slides_per_patient > 1]
    if repeated.empty:
        return (["leave_one_slide_out"] if cv is None else [cv]), ""
    note = (
        f"Patients repeat: {', '.join(f'{p} ({n} slides)' for p, n in repeated.items())}. Leave-one-slide-out "
        "then scores new sections of patients seen in training; leave-one-patient-out scores new patients."
    )
    if cv is not None:
        return [cv], note
    both = len(slides_per_patient) > 1
    return (["leave_one_slide_out", "leave_one_patient_out"] if both else ["leave_one_slide_out"]), note


def _protocol(args: argparse.Namespace) -> tuple[str | None, int, float | None]:
    """Cross-validation (None: see :func:`_protocols`), number of genes and patch pixel size of the protocol."""
    from ._hest_benchmark import HEST_GENES, HEST_MPP

    if args.protocol == "hest":
        if args.cv not in (None, "leave_one_patient_out"):
            raise CommandError(
                f"--protocol hest holds out one patient at a time; drop --cv {args.cv} or use leave_one_patient_out."
            )
        return "leave_one_patient_out", args.genes or HEST_GENES, HEST_MPP
    return args.cv, args.genes or 250, None


def _hest_scores(adata: AnnData, runs: list[MethodRun], genes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The report section and the results entries of HEST-Benchmark's score, per method."""
    import pandas as pd

    from ._hest_benchmark import hest_fold_pearson

    scores = {run.method: hest_fold_pearson(adata, run.key, genes) for run in runs}
    table = pd.DataFrame(
        {
            method: {
                "mean over folds": f"{folds['pearson_mean'].mean():.4f}",
                "std over folds": f"{folds['pearson_mean'].std(ddof=0):.4f}",
                **{f"fold {row.fold}": f"{row.pearson_mean:.4f}" for row in folds.itertuples()},
            }
            for method, folds in scores.items()
        }
    )
    lines = [
        "## HEST-Benchmark score",
        "",
        "Per fold (one patient held out), the Pearson correlation of each gene over all held-out spots pooled, "
        "averaged over the genes; then the mean and standard deviation over folds, as HEST-Benchmark reports.",
        "",
        table.to_markdown(),
        "",
    ]
    return lines, {method: folds.to_dict(orient="records") for method, folds in scores.items()}


def _benchmark(args: argparse.Namespace) -> int:
    from . import pp
    from ._benchmark import Scheme, compare_methods, machine_description
    from ._hest_benchmark import hest_genes, hest_log_expression

    start = time.perf_counter()
    methods = _check_common(args, args.regime)
    regime = regime_options(args, args.encoder)
    intervals = interval_options(args)
    cv, n_genes, mpp = _protocol(args)
    hest = args.protocol == "hest"
    _check_data(args.data, args.reader)
    slides = _method_list(args.slides) if args.slides else None
    adata = read_cohort(args.data, reader=args.reader, slides=slides)
    n_slides = adata.obs["slide"].nunique()
    if n_slides < 2:
        raise CommandError(f"{args.data} has {n_slides} slide; cross-validation needs at least two.")
    if n_genes > adata.n_vars:
        raise CommandError(f"--genes {n_genes} exceeds the {adata.n_vars} genes of {args.data}; lower it.")
    if cv == "leave_one_patient_out" and adata.obs.get("patient", adata.obs["slide"]).nunique() < 2:
        raise CommandError("leave_one_patient_out needs obs['patient'] with at least two patients.")
    protocols, patients_note = _protocols(adata, cv)
    scored: list[str] | None = None  # the genes of HEST-Benchmark's score
    if hest:  # HEST-Benchmark embeds each spot's patch once, alone
        args.tta = args.tta or 1
        args.neighbours = args.neighbours or 0
        hest_log_expression(adata)
        scored = hest_genes(adata, n_genes)
        genes: int | list[str] = scored
        gene_rule = f"HEST-Benchmark's {n_genes} highly variable genes of all slides (log1p counts)"
    else:
        pp.normalize(adata)
        genes = n_genes
        gene_rule = f"{n_genes} highly expressed genes chosen on the training slides of each fold"
    print(
        f"histo2expr benchmark ({args.protocol} protocol): {adata.n_obs} spots on {n_slides} slides of {args.data}; "
        f"{' and '.join(protocols)}, {args.regime} regime ({args.encoder}), {n_genes} genes, methods "
        f"{', '.join(methods)}."
    )
    fit_kwargs: dict[str, Any] = {
        "epochs": args.epochs,
        "num_workers": args.workers,
        **regime,
        **_device_flags(args.device),
        **intervals,
    }
    embed_seconds = embedding = backend = None
    features = ""  # the report's words on the features
    if args.regime == "end2end":
        fit_kwargs.update(use_rep=None, patch_size=args.patch_size, mpp=mpp)
    else:  # the adapted regime keeps the context and neighbour blocks of the frozen features
        embed_seconds, backend = _embed(adata, args, methods if args.regime == "frozen" else [], mpp=mpp)
        embedding = _embedding_options(adata)
        features = (
            f" Features: {_embedding_note(embedding)}; embedding: {embed_seconds:.1f} s (backend {backend})."
        )
        if args.regime == "adapted":
            fit_kwargs.update(patch_size=args.patch_size, mpp=mpp)
            features += f" {_adapted_note(regime, embedding)}"
    method_params = None if args.regime == "frozen" else {m: {"encoder": args.encoder} for m in methods}
    schemes = [
        Scheme(
            protocol,
            key_suffix=_PROTOCOL_SUFFIX[protocol] if len(protocols) > 1 else "",
            patient_key="patient" if protocol == "leave_one_patient_out" else None,
        )
        for protocol in protocols
    ]
    n_jobs = _n_jobs(args, len(methods))
    runs = compare_methods(
        adata,
        methods,
        schemes=schemes,
        n_jobs=n_jobs,
        genes=genes,
        seed=args.seed,
        progress=args.progress,
        method_params=method_params,
        **fit_kwargs,
    )
    hest_lines, hest_results = ([], None) if scored is None else _hest_scores(adata, runs, scored)
    total = time.perf_counter() - start
    machine = machine_description()
    command = "histo2expr " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    gpu = machine["gpu"] or "no GPU"
    _report(
        adata,
        runs,
        out=args.out,
        title=(
            f"histo2expr benchmark: {args.data.name}, {args.protocol} protocol, {' and '.join(protocols)}, "
            f"{args.regime} {args.encoder}"
        ),
        preamble=[
            f"Command: `{command}`",
            "",
            *([patients_note, ""] if patients_note else []),
            f"Machine: {machine['cpu_cores']} CPU cores ({machine['available_cpus']} available to the process), "
            f"{gpu}, torch {machine['torch']}, Python {machine['python']}, {machine['platform']}.",
            "",
            f"Data: {adata.n_obs} spots on {n_slides} slides ({', '.join(map(str, adata.obs['slide'].unique()))}); "
            f"{gene_rule}; {args.patch_size} px patches"
            f"{'' if mpp is None else f' at {mpp} µm/px'}; at most {args.epochs} epochs; seed {args.seed}."
            f"{features} {_jobs_note(n_jobs, args.regime)} Whole run: {total:.1f} s.",
            "",
            *hest_lines,
        ],
        settings={
            "command": command,
            "data": str(args.data),
            "reader": args.reader,
            "protocol": args.protocol,
            "slides": sorted(map(str, adata.obs["slide"].unique())),
            "n_spots": adata.n_obs,
            "cv": cv or "auto",
            "cv_schemes": protocols,
            "regime": args.regime,
            "adapted": {k: v for k, v in regime.items() if k != "regime"} or None,
            "encoder": args.encoder,
            "backend": backend,
            "jobs": n_jobs,
            "patch_size": args.patch_size,
            "patch_mpp": mpp,
            "embedding": embedding,
            "genes": genes,
            "epochs": args.epochs,
            "seed": args.seed,
            "intervals": intervals or None,
            "embedding_seconds": embed_seconds,
            "total_seconds": total,
        },
        extra=None if hest_results is None else {"hest_pearson": hest_results},
    )
    return 0


#: The feature options of :func:`~histo2expr.tl.embed_patches` the commands that embed take.
FEATURE_OPTIONS = ("tta", "context", "neighbours", "stain_normalization")


def _context(text: str) -> float:
    """``--context``: the side of the context view in patch sides, checked as :class:`~histo2expr.patches.PatchSource` does."""
    from .patches import PatchSource

    try:
        return PatchSource.check_view(float(text))
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to 8 such as 3, got {text!r}") from error


def add_feature_options(add: Any, *, hest: bool = False) -> None:
    """``--tta``, ``--context``, ``--neighbours`` and ``--stain-normalization`` (``hest``: note the protocol's defaults)."""
    tta_default, neighbours_default = (
        ("4; 1 with --protocol hest", "6; 0 with --protocol hest") if hest else (4, 6)
    )
    add(
        "--tta",
        type=int,
        choices=(1, 4, 8),
        default=None,
        help=f"views averaged per patch: 1, its 4 quarter turns, or 8 with their mirror images (default {tta_default})",
    )
    add(
        "--context",
        type=_context,
        default=None,
        help="also embed a context view CONTEXT times wider than the patch, 1 to 8 (default: none)",
    )
    add(
        "--neighbours",
        type=_int_at_least(0),
        default=None,
        help="append the mean features of each spot's N nearest spots on its slide; 0: none "
        f"(default {neighbours_default})",
    )
    add(
        "--stain-normalization",
        choices=("macenko",),
        default=None,
        help="re-stain every slide's patches to reference stain vectors (default: none)",
    )


def add_backend_option(add: Any) -> None:
    """``--backend``: what runs the encoder, :func:`~histo2expr.tl.embed_patches`' ``backend``."""
    add(
        "--backend",
        default="auto",
        help="what runs the encoder: auto (ONNX Runtime for efficientnet_lite on the CPU when installed, "
        "else torch), torch, onnx or bf16 (default auto)",
    )


def add_interval_options(add: Any) -> None:
    """``--intervals``, ``--level`` and ``--calibration-folds``: the conformal intervals of fit_histo2expr."""
    from ._validation import CALIBRATIONS, KINDS, MAX_CALIBRATION_FOLDS

    add(
        "--intervals",
        choices=("none", *KINDS),
        default="none",
        help="conformal prediction intervals per spot and gene, calibrated on inner folds of the training slides: "
        "adaptive (scaled per spot by its distance to the training spots), constant (one half-width per gene) "
        "or none (default none)",
    )
    add(
        "--level", type=float, default=None, help="nominal coverage of the intervals, in (0, 1) (default 0.9)"
    )
    add(
        "--calibration-folds",
        type=int,
        default=None,
        help=f"inner folds of whole training slides the calibration residuals come from, 2 to "
        f"{MAX_CALIBRATION_FOLDS}; each costs one more fit (default {MAX_CALIBRATION_FOLDS})",
    )
    add(
        "--interval-calibration",
        choices=tuple(CALIBRATIONS),
        default=None,
        help="pooled: one quantile over all calibration spots; per_slide: the largest of the calibration slides' "
        "own quantiles, the level on every calibration slide (wider); shift: pooled, and a slide farther from the "
        "training spots than an unseen training slide (distance ratio r > 1) widened r-fold (default shift)",
    )


def _given_options(
    args: argparse.Namespace, names: Sequence[str], *, used: bool, needs: str
) -> dict[str, Any]:
    """The options ``names`` as :func:`~histo2expr.tl.fit_histo2expr` names them, its defaults for those not given.

    ``used``: whether the options apply; when not, giving any is an error that says to add ``needs``.
    """
    import inspect

    from . import tl

    given = {name: getattr(args, name) for name in names}
    if not used:
        flags = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
        if flags:
            raise CommandError(f"{' and '.join(flags)} {'sets' if len(flags) == 1 else 'set'} {needs}.")
        return {}
    defaults = inspect.signature(tl.fit_histo2expr).parameters
    return {name: defaults[name].default if value is None else value for name, value in given.items()}


def interval_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_interval_options` as :func:`~histo2expr.tl.fit_histo2expr` names them, checked as it does."""
    from ._validation import check_intervals

    options = _given_options(
        args,
        ("level", "calibration_folds", "interval_calibration"),
        used=args.intervals != "none",
        needs="the intervals; add --intervals adaptive (or constant)",
    )
    if not options:
        return {}
    check_intervals(
        args.intervals, options["level"], options["calibration_folds"], options["interval_calibration"]
    )
    return {"intervals": args.intervals, **options}


def add_regime_options(add: Any) -> None:
    """``--regime`` and the adapted regime's ``--trainable-blocks``, ``--views`` and ``--stain-copies``."""
    from .models.base import REGIMES

    add(
        "--regime",
        choices=REGIMES,
        default="frozen",
        help="frozen: methods train on features embedded once; end2end: each method trains the encoder too "
        "(use a GPU); adapted: each method trains the encoder's top stages on cached activations of the "
        "lower ones (runs on a CPU) (default frozen)",
    )
    add(
        "--trainable-blocks",
        type=_int_at_least(1),
        default=None,
        help="adapted regime: top stages of the encoder that train (default 1)",
    )
    add(
        "--views",
        type=int,
        choices=(1, 4, 8),
        default=None,
        help="adapted regime: dihedral views of each patch cached for training: 1, 4 or 8 (default 8)",
    )
    add(
        "--stain-copies",
        type=_int_at_least(0),
        default=None,
        help="adapted regime: stain-jittered views of each patch cached for training (default 0)",
    )


def regime_options(args: argparse.Namespace, encoder: str) -> dict[str, Any]:
    """``--regime`` and the options of the adapted regime, as :func:`~histo2expr.tl.fit_histo2expr` names them.

    Checked as the fit checks them, without computing anything: ``--trainable-blocks`` against the stages
    of ``encoder`` (built without weights), ``--views`` and ``--stain-copies`` as the cached views.
    """
    options = _given_options(
        args,
        ("trainable_blocks", "views", "stain_copies"),
        used=args.regime == "adapted",
        needs="the adapted regime; add --regime adapted",
    )
    if options:
        from .models import build_encoder
        from .models.adapted import AdaptedViews, check_trainable_blocks

        AdaptedViews.for_training(options["views"], options["stain_copies"], args.seed)
        check_trainable_blocks(build_encoder(encoder, weights=None), options["trainable_blocks"])
    return {"regime": args.regime, **options}


def feature_options(args: argparse.Namespace) -> dict[str, Any]:
    """The feature options given on the command line, as :func:`~histo2expr.tl.embed_patches` names them.

    Options not given are left out (the API's defaults apply); ``--neighbours 0`` is ``neighbours=None``.
    """
    given = {option: getattr(args, option) for option in FEATURE_OPTIONS if getattr(args, option) is not None}
    if "neighbours" in given:
        given["neighbours"] = given["neighbours"] or None
    return given


def _add_common(add: Any, *, genes: int | None, epochs: int, methods: str | None, out: str) -> None:
    add(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="seed of the training (and the synthetic cohort) (default 0)",
    )
    shown_genes = genes or "250; 50 with --protocol hest"
    add(
        "--genes",
        type=_int_at_least(1),
        default=genes,
        help=f"number of genes to predict (default {shown_genes})",
    )
    shown = methods or "every registered method of the regime"
    add("--methods", default=methods, help=f"comma-separated methods (default: {shown})")
    add(
        "--encoder",
        default="efficientnet_lite0",
        help="encoder: efficientnet_lite0/1/2 (ImageNet, offline), colour_texture (no weights), a pathology "
        "foundation model (uni, uni2-h, virchow2, h-optimus-0, ...) or a timm name",
    )
    add(
        "--epochs",
        type=_int_at_least(1),
        default=epochs,
        help=f"maximum training epochs of the torch methods (default {epochs})",
    )
    add_feature_options(add, hest=True)
    add("--patch-size", type=_int_at_least(2), default=224, help="patch side in pixels (default 224)")
    add("--workers", type=_int_at_least(0), default=0, help="DataLoader workers reading patches (default 0)")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps (default auto)")
    add_backend_option(add)
    add("--out", type=Path, default=Path(out), help=f"folder for results and figures (default {out})")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="histo2expr", description="Predict spatial gene expression from H&E images.")
    parser.add_argument("--version", action="version", version=f"histo2expr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="cross-validate the baselines on the embedded synthetic cohort")
    demo.add_argument("--n-slides", type=int, default=4, help="slides in the synthetic cohort (default 4)")
    _add_common(demo.add_argument, genes=100, epochs=30, methods="ridge,stnet,bleep", out="histo2expr-demo")
    demo.set_defaults(func=_demo)

    bench = commands.add_parser(
        "benchmark", help="compare methods on your own data with leak-free cross-validation"
    )
    add = bench.add_argument
    add(
        "--data",
        type=Path,
        required=True,
        help="dataset folder (legacy ST, folder of Visium outs, HEST) or .h5ad file",
    )
    add("--reader", choices=READERS, default="auto", help="how to read --data (default: from the path)")
    add("--slides", default=None, help="comma-separated slides to keep (default: all)")
    add(
        "--cv",
        choices=CV_SCHEMES,
        default=None,
        help="cross-validation (default: leave_one_slide_out, and leave_one_patient_out too when patients have "
        "several slides; leave_one_patient_out alone with --protocol hest)",
    )
    add(
        "--protocol",
        choices=PROTOCOLS,
        default="histo2expr",
        help="histo2expr (genes chosen per fold, log-normalised targets; default) or hest (HEST-Benchmark's "
        "genes, targets, patient folds, 0.5 µm/px patches and score)",
    )
    add_regime_options(add)
    _add_common(add, genes=None, epochs=50, methods=None, out="histo2expr-benchmark")
    add(
        "--jobs",
        type=_jobs,
        default="auto",
        help="processes fitting at once, the CPUs shared out (the results of one process with as many threads): "
        "in the frozen regime a job is one fold fit (a method's folds fit in parallel too), else a method's "
        "cross-validations under every scheme; auto (frozen regime on the CPU: one per available CPU; else 1) or a "
        "number (default auto)",
    )
    add_interval_options(add)
    bench.set_defaults(func=_benchmark)

    fit = commands.add_parser("fit", help="fit one method on every slide of a dataset and save the model")
    _add_fit_options(fit.add_argument)
    fit.set_defaults(func=_fit)
    from ._cohort_cli import add_cohort_commands

    add_cohort_commands(commands)
    for command in commands.choices.values():
        add_verbosity_options(command)
    return parser


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    """``--verbosity`` and ``--quiet`` (its shorthand for warnings only), one or the other."""
    either = parser.add_mutually_exclusive_group()
    either.add_argument(
        "--verbosity",
        choices=tuple(LEVELS),
        default=None,
        help="how much is said, as hx.settings.verbosity: error, warning, info, hint or debug; progress bars "
        "and per-slide lines from info on (default info)",
    )
    either.add_argument(
        "--quiet", action="store_true", help="warnings and errors only, no progress bars: --verbosity warning"
    )


def add_engine_options(add: Any, *, nodes: str) -> None:
    """Lightning's ``--accelerator``, ``--devices``, ``--strategy`` and ``--num-nodes`` (``nodes``: its help)."""
    add(
        "--accelerator",
        choices=ACCELERATORS,
        default="auto",
        help="Lightning accelerator (default auto: a GPU when there is one)",
    )
    add(
        "--devices",
        type=_devices,
        default=1,
        help="devices per node: a number, -1 (all), auto or indices 0,1 (default 1)",
    )
    add("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default auto)")
    add("--num-nodes", type=_int_at_least(1), default=1, help=nodes)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`add_engine_options`, as the API names them."""
    return {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "num_nodes": args.num_nodes,
    }


def _add_fit_options(add: Any) -> None:
    add(
        "data",
        type=Path,
        help="dataset: .h5ad file (data model, frozen features in obsm), legacy ST or Visium folder",
    )
    add("--method", required=True, help="the method (see histo2expr.models.available_methods())")
    add("--out", type=Path, required=True, help="model file to write (hx.tl.Histo2ExprModel.load reads it)")
    add("--reader", choices=READERS, default="auto", help="how to read DATA (default: from the path)")
    add("--slides", default=None, help="comma-separated slides to fit on (default: all)")
    add_regime_options(add)
    add(
        "--use-rep",
        default=EMBEDDING_KEY,
        help="obsm key of the frozen features; adapted regime: of the features whose context and neighbour "
        f"blocks join the adapted ones, or none (default {EMBEDDING_KEY})",
    )
    add(
        "--encoder",
        default="efficientnet_lite0",
        help="end-to-end and adapted regimes: the encoder trained (default efficientnet_lite0)",
    )
    add(
        "--patch-size",
        type=_int_at_least(2),
        default=224,
        help="end-to-end and adapted regimes: patch side in pixels (default 224)",
    )
    add("--genes", type=_int_at_least(1), default=250, help="highly expressed genes to predict (default 250)")
    add("--epochs", type=_int_at_least(1), default=50, help="maximum training epochs (default 50)")
    add("--batch-size", type=_int_at_least(2), default=64, help="spots per batch and device (default 64)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate (default 0.001)")
    add("--seed", type=_int_at_least(0), default=0, help="seed of the training (default 0)")
    add("--workers", type=_int_at_least(0), default=0, help="DataLoader workers reading patches (default 0)")
    add(
        "--param",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method setting, repeatable (e.g. --param top_k=20)",
    )
    add_interval_options(add)
    add_engine_options(add, nodes="machines training together, e.g. under SLURM (default 1)")
    add(
        "--precision",
        default=None,
        help="Lightning precision, e.g. 32-true, bf16-mixed (default: bf16-mixed on CUDA, else 32-true)",
    )


def _one_line(error: Exception) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histo2expr`` command.

    Every argument is checked before any work starts; bad input (a bad argument, or data histo2expr
    refuses) prints one line on stderr naming the problem and the fix, and returns exit status 2.
    """
    try:
        args = _parser().parse_args(argv)
    except CommandError as error:
        print(f"histo2expr: {_one_line(error)}", file=sys.stderr)
        return 2
    args.argv = None if argv is None else list(argv)
    try:
        with settings.override(verbosity="warning" if args.quiet else args.verbosity or settings.verbosity):
            args.progress = settings.verbosity >= Verbosity.info
            return args.func(args)
    except BAD_INPUT as error:  # the message names the problem and the fix
        print(f"histo2expr {args.command}: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
