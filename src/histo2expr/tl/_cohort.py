"""Embedding and prediction over a cohort of slide files: one output per slide, sharded over processes, resumable.

Lightning Fabric starts the processes (``accelerator``, ``devices``, ``num_nodes`` and ``strategy``,
as for training; ``srun`` and ``torchrun`` environments are read the same way), the first process
lists which slides are still to do and every process takes every *N*-th of them. Each slide is read,
embedded (and predicted), and written under a temporary name in the output folder, then renamed
(:func:`histo2expr._cache.atomic_path`): an output that exists is complete, and a run that is
started again skips it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pandas as pd

from .. import _logging as logg
from .._cache import atomic_path, remove_temporaries
from .._keys import EMBEDDING_KEY, PREDICT_KEY, Key
from .._logging import Verbosity
from .._records import SCALES
from .._settings import settings
from .._validation import (
    check_element_name,
    check_patch_size,
    check_slide_id,
    non_negative_number,
    one_of,
    positive_int,
    seed_value,
)
from ..models.base import plain_value
from ._embed import check_feature_options
from ._model import Histo2ExprModel
from ._predict import check_feature_record, frozen_encoder_arguments

if TYPE_CHECKING:
    from anndata import AnnData
    from lightning.fabric import Fabric

#: Output formats and the suffix of their files.
FORMATS = {"h5ad": ".h5ad", "zarr": ".zarr"}
#: Characters that make an input a glob pattern (unless a file of that name exists).
_GLOB_MAGIC = ("*", "?", "[")


class SlidesFailedError(RuntimeError):
    """Some slides of a cohort run failed (named in the message); the outputs of the others are written."""


Inputs = str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...]


@dataclass
class CohortSlide:
    """One slide of a cohort: the file or folder it is read from, its reader and its slide id."""

    path: Path
    reader: Literal["h5ad", "visium", "wsi"]
    slide: str
    #: For an .h5ad file holding several slides: the value of ``obs[slide_key]`` to keep (else None).
    subset: str | None = None


def _expand(inputs: Inputs) -> list[Path]:
    """Paths of ``inputs``: a path, a glob pattern, or a list of them; each must exist."""
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not items:
        msg = "No slides given; pass slide files, Visium folders or .h5ad files (a list or a glob pattern)."
        raise ValueError(msg)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(mark in text for mark in _GLOB_MAGIC) and not Path(text).exists():
            matches = sorted(glob.glob(os.path.expanduser(text)))
            if not matches:
                msg = f"The pattern {text!r} matches no file or folder; check the path (quote it in a shell)."
                raise FileNotFoundError(msg)
            paths += [Path(m) for m in matches]
        elif Path(text).expanduser().exists():
            paths.append(Path(text).expanduser())
        else:
            msg = f"{text} does not exist; give slide files, Visium (Space Ranger) folders or .h5ad files."
            raise FileNotFoundError(msg)
    return list(dict.fromkeys(paths))


def _visium_folder(path: Path) -> Path | None:
    """The Space Ranger output folder at ``path`` (itself or its ``outs``), or None when it is none."""
    for folder in (path, path / "outs"):
        if any(
            (folder / name).exists()
            for name in ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix")
        ):
            return folder
    return None


def _h5ad_slides(path: Path, slide_key: str) -> list[CohortSlide]:
    """The slides of an .h5ad file (its ``obs`` only is read); one named after the file when it has no slide column."""
    import anndata as ad

    backed = ad.read_h5ad(path, backed="r")
    try:
        if slide_key not in backed.obs:
            return [CohortSlide(path, "h5ad", path.stem)]
        slides = pd.unique(backed.obs[slide_key].astype(str))
    finally:
        backed.file.close()
    if len(slides) == 1:
        return [CohortSlide(path, "h5ad", str(slides[0]))]
    return [CohortSlide(path, "h5ad", str(slide), subset=str(slide)) for slide in slides]


def cohort_slides(inputs: Inputs, *, slide_key: str = "slide") -> list[CohortSlide]:
    """The slides of ``inputs``, in order, each with its reader; slide ids are checked to be unique.

    An ``.h5ad`` file gives each of its slides (``obs[slide_key]``), a folder one Visium slide (a
    Space Ranger output folder, or the folder holding its ``outs``; the slide id is the folder's
    name), any other file one whole-slide image (the slide id is the file name without suffix).
    """
    slides: list[CohortSlide] = []
    for path in _expand(inputs):
        if path.suffix == ".h5ad" and path.is_file():
            slides += _h5ad_slides(path, slide_key)
        elif path.is_dir():
            folder = _visium_folder(path)
            if folder is None:
                msg = (
                    f"{path} is a folder but no Space Ranger output (no filtered_feature_bc_matrix.h5 or "
                    "filtered_feature_bc_matrix/ in it or in its outs/); give the output folders of the slides, "
                    f"e.g. '{path}/*/outs'."
                )
                raise ValueError(msg)
            name = (folder.parent if folder.name == "outs" else folder).name
            slides.append(CohortSlide(folder, "visium", name))
        else:
            slides.append(CohortSlide(path, "wsi", path.stem))
    seen: dict[str, Path] = {}
    for unit in slides:
        check_slide_id(unit.slide)
        if unit.slide.startswith("."):
            msg = f"Slide id {unit.slide!r} of {unit.path} starts with '.'; rename the file or slide."
            raise ValueError(msg)
        if unit.slide in seen:
            msg = (
                f"Two inputs hold slide {unit.slide!r} ({seen[unit.slide]} and {unit.path}); each slide gets one "
                "output named after it, so slide ids must be unique. Rename one of them."
            )
            raise ValueError(msg)
        seen[unit.slide] = unit.path
    return slides


@dataclass
class CohortJob:
    """What a cohort run does to every slide, and where it writes (everything picklable, for spawned processes)."""

    step: Literal["embed", "predict"]
    out_dir: Path
    format: str
    #: Parameters that determine the outputs: compared with those of an existing output before it is skipped.
    parameters: dict[str, Any]
    #: Recorded in the provenance, not compared (they do not change the values, or not beyond float rounding).
    run: dict[str, Any]
    slide_key: str
    #: :func:`~histo2expr.tl.embed_patches` arguments (None: the inputs are not embedded).
    embedding: dict[str, Any] | None
    #: :func:`~histo2expr.pp.tile_slide` arguments for whole-slide images.
    tiling: dict[str, Any]
    overwrite: bool
    progress: bool
    model: Histo2ExprModel | Path | None = None
    model_record: dict[str, Any] = field(default_factory=dict)
    prediction: dict[str, Any] = field(default_factory=dict)

    def target(self, unit: CohortSlide) -> Path:
        """The output of ``unit``."""
        return self.out_dir / f"{unit.slide}{FORMATS[self.format]}"


def _read_table(unit: CohortSlide, job: CohortJob, model: Histo2ExprModel | None) -> AnnData:
    """The spots of ``unit`` (pseudo-spots on the tissue of a whole-slide image)."""
    import anndata as ad

    from .. import io, pp

    if unit.reader == "visium":
        return io.read_visium(unit.path, library_id=unit.slide)
    if unit.reader == "wsi":
        geometry = None if model is None else model.patches
        return pp.tile_slide(unit.path, geometry=geometry, slide=unit.slide, **job.tiling)
    if unit.subset is None:
        return ad.read_h5ad(unit.path)
    backed = ad.read_h5ad(unit.path, backed="r")
    try:
        table = backed[(backed.obs[job.slide_key].astype(str) == unit.subset).to_numpy()].to_memory()
    finally:
        backed.file.close()
    spatial = table.uns.get(Key.uns.spatial)
    if isinstance(spatial, dict) and unit.subset in spatial:  # this slide's image only
        table.uns[Key.uns.spatial] = {unit.subset: spatial[unit.subset]}
    return table


def _provenance(job: CohortJob, unit: CohortSlide, table: AnnData) -> dict[str, Any]:
    from .._version import __version__

    record: dict[str, Any] = {
        "step": job.step,
        "input": str(unit.path),
        "slide": unit.slide,
        "histo2expr_version": __version__,
        "parameters": json.dumps(job.parameters, sort_keys=True),
        "run": json.dumps(job.run, sort_keys=True),
    }
    rep = (job.embedding or {}).get("key_added") or (job.model_record or {}).get("use_rep")
    encoder = (table.uns.get(rep) or {}).get("encoder") if rep else None
    if encoder:
        record["encoder"] = {
            key: encoder[key] for key in ("name", "weights", "weights_sha1") if key in encoder
        }
    if job.model_record:
        record["model"] = job.model_record
    return plain_value(record)


def _write(table: AnnData, target: Path, fmt: str) -> None:
    """Write ``table`` to ``target`` (h5ad, or a SpatialData zarr with the slide's image) in one rename."""
    from .. import io

    with atomic_path(target) as tmp:
        if fmt == "h5ad":
            table.write_h5ad(tmp)
        else:
            io.to_spatialdata(table).write(tmp)


def _stored_parameters(target: Path) -> str | None:
    """The parameters recorded in an existing output (None when it records none); nothing else is read."""
    name = f"uns/{Key.uns.cohort_provenance}/parameters"
    if target.suffix == ".zarr":
        import zarr

        entry = zarr.open_group(target / "tables" / "table", mode="r").get(name)
        value = None if entry is None else cast("Any", entry)[()]
    else:
        import h5py

        with h5py.File(target, "r") as handle:
            entry = handle.get(name)
            value = None if entry is None else cast("Any", entry)[()]
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value  # a 0-d array of zarr
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_existing(job: CohortJob, slides: list[CohortSlide]) -> None:
    """Refuse to resume over outputs written with other parameters (their values would mix silently)."""
    if job.overwrite:
        return
    expected = json.dumps(job.parameters, sort_keys=True)
    for unit in slides:
        target = job.target(unit)
        if not target.exists():
            continue
        try:
            stored = _stored_parameters(target)
        except Exception as error:  # not an output of a cohort run: h5py / zarr errors vary
            stored = f"unreadable ({type(error).__name__})"
        if stored != expected:
            msg = (
                f"{target} exists but was not written by `{job.step}` with these parameters (it records "
                f"{stored}; now {expected}). Write to another output folder, or pass overwrite=True "
                "(--overwrite) to redo every slide."
            )
            raise ValueError(msg)


def _process_slide(job: CohortJob, unit: CohortSlide, model: Histo2ExprModel | None, device: str) -> int:
    """Read, embed (and predict) one slide and write its output; the number of spots."""
    from ._embed import embed_patches
    from ._predict import predict_expression

    table = _read_table(unit, job, model)
    # one line per slide tells the progress; the messages of each call show from verbosity "hint" on
    verbosity = settings.verbosity
    with settings.override(
        verbosity=verbosity if verbosity >= Verbosity.hint else min(verbosity, Verbosity.warning)
    ):
        if job.embedding is not None and (
            job.step == "embed" or job.embedding["key_added"] not in table.obsm
        ):
            embed_patches(table, **job.embedding, slide_key=job.slide_key, device=device, progress=False)
        if model is not None:
            predict_expression(table, model, slide_key=job.slide_key, **job.prediction)
    table.uns[Key.uns.cohort_provenance] = _provenance(job, unit, table)
    _write(table, job.target(unit), job.format)
    return table.n_obs


def _say(job: CohortJob, text: str) -> None:
    if job.progress:
        print(f"histo2expr {job.step}: {text}", flush=True)


def _run_shard(fabric: Fabric, job: CohortJob, slides: list[CohortSlide]) -> pd.DataFrame:
    """Run in every process: take this process's share of the slides still to do; the table of all slides."""
    start = time.monotonic()  # as the package logger's timings
    if job.embedding is not None:  # on this process's device, before any work
        from ..models.backends import check_backend

        check_backend(job.embedding["backend"], fabric.device)
    rank, world = fabric.global_rank, fabric.world_size
    if rank == 0:
        processes = f" ({world} processes)" if world > 1 else ""
        logg.info(
            f"{job.step} a cohort of {logg.counted(len(slides), 'slide')} into {job.out_dir}{processes}"
        )
    done: list[bool] | None = None
    if rank == 0:  # one process decides, before any writes, which outputs are finished
        job.out_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(job.out_dir)
        done = [not job.overwrite and job.target(unit).exists() for unit in slides]
    done = cast("list[bool]", fabric.broadcast(done, src=0))
    rows = []
    for unit, finished in zip(slides, done, strict=True):
        if finished and rank == 0:
            _say(job, f"{unit.slide}: done before ({job.target(unit)}), skipped")
            rows.append(_row(unit, job, "skipped", rank))
    todo = [unit for unit, finished in zip(slides, done, strict=True) if not finished]
    mine = todo[rank::world]
    model = Histo2ExprModel.load(job.model) if isinstance(job.model, Path) else job.model
    if model is None:
        rows += _work_through(job, mine, None, fabric)
    else:  # a model passed in goes back to its device afterwards
        previous = model.device
        try:
            rows += _work_through(job, mine, model.to(fabric.device), fabric)
        finally:
            model.to(previous)
    if world > 1:
        import torch.distributed

        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    order = {unit.slide: i for i, unit in enumerate(slides)}
    table = pd.DataFrame(rows, columns=list(_row(slides[0], job, "", 0))).sort_values(
        "slide", key=lambda s: s.map(order), ignore_index=True
    )
    failed = table[table["status"] == "failed"]
    if rank == 0:
        counts = table["status"].value_counts()
        _say(
            job,
            f"{len(table)} slides: {counts.get('written', 0)} written, {counts.get('skipped', 0)} skipped, "
            f"{len(failed)} failed, in {time.monotonic() - start:.1f} s ({world} process{'es' if world > 1 else ''}); "
            f"outputs in {job.out_dir}",
        )
    if len(failed):
        listed = "; ".join(f"{row.slide} ({row.error})" for row in failed.itertuples())
        msg = (
            f"{len(failed)} of {len(table)} slides failed: {listed}. The other outputs are written; fix these "
            "slides and run the same command again: finished slides are skipped."
        )
        raise SlidesFailedError(msg)
    if rank == 0:
        logg.info("    finished", time=start)
    return table


def _work_through(
    job: CohortJob, mine: list[CohortSlide], model: Histo2ExprModel | None, fabric: Fabric
) -> list[dict[str, Any]]:
    """Process ``mine``, one slide after the other on ``fabric``'s device, with a progress line each; their rows."""
    rank, world = fabric.global_rank, fabric.world_size
    where = f", process {rank + 1}/{world}" if world > 1 else ""
    rows = []
    for index, unit in enumerate(mine, 1):
        tic = time.perf_counter()
        try:
            n_spots = _process_slide(job, unit, model, str(fabric.device))
        except Exception as error:  # one bad slide must not stop the others; reported together at the end
            seconds = time.perf_counter() - tic
            message = f"{type(error).__name__}: {' '.join(str(error).split())}"
            _say(job, f"{unit.slide} ({index}/{len(mine)}{where}): failed after {seconds:.1f} s: {message}")
            rows.append(_row(unit, job, "failed", rank, seconds=seconds, error=message))
            continue
        seconds = time.perf_counter() - tic
        _say(
            job,
            f"{unit.slide} ({index}/{len(mine)}{where}): {n_spots} spots in {seconds:.1f} s -> {job.target(unit)}",
        )
        rows.append(_row(unit, job, "written", rank, n_spots=n_spots, seconds=seconds))
    return rows


def _row(unit: CohortSlide, job: CohortJob, status: str, rank: int, **values: Any) -> dict[str, Any]:
    return {
        "slide": unit.slide,
        "input": str(unit.path),
        "output": str(job.target(unit)),
        "status": status,
        "n_spots": values.get("n_spots"),
        "seconds": values.get("seconds"),
        "process": rank,
        "error": values.get("error", ""),
    }


def _launch(job: CohortJob, slides: list[CohortSlide], engine: dict[str, Any]) -> pd.DataFrame:
    """Start the processes of ``engine`` with Lightning Fabric and run :func:`_run_shard` in each."""
    from lightning.fabric import Fabric

    try:
        fabric = Fabric(**engine)
    except (
        Exception
    ) as error:  # Lightning's MisconfigurationException, ValueError or RuntimeError name the flag
        msg = f"Lightning refuses {engine}: {error}"
        raise ValueError(msg) from error
    return fabric.launch(cast("Any", _run_shard), job, slides)


#: The embedding arguments that change how a cohort run computes, not its values (not compared on resume).
_RUN_OPTIONS = ("batch_size", "num_workers", "backend")


def _engine(
    accelerator: str, devices: int | str | list[int], strategy: str, num_nodes: int
) -> dict[str, Any]:
    positive_int(num_nodes, "num_nodes")
    return {"accelerator": accelerator, "devices": devices, "strategy": strategy, "num_nodes": num_nodes}


def _checked_format(format: str) -> str:
    one_of(format, FORMATS, "format", fix="'h5ad' writes AnnData files, 'zarr' SpatialData.")
    return format


def _tiling(
    spot_diameter_um: float | None, spacing_um: float | None, slide_mpp: float | None
) -> dict[str, Any]:
    return {
        "mpp": None if slide_mpp is None else non_negative_number(slide_mpp, "slide_mpp", positive=True),
        "spot_diameter_um": None
        if spot_diameter_um is None
        else non_negative_number(spot_diameter_um, "spot_diameter_um", positive=True),
        "spacing_um": None
        if spacing_um is None
        else non_negative_number(spacing_um, "spacing_um", positive=True),
    }


def embed_cohort(
    slides: Inputs,
    out_dir: str | os.PathLike[str],
    *,
    encoder: str = "efficientnet_lite0",
    weights: str | os.PathLike[str] | None = "default",
    patch_size: int = 224,
    mpp: float | None = None,
    tta: int = 4,
    context: float | None = None,
    neighbours: int | None = 6,
    stain_normalization: str | None = None,
    tokens: int | None = None,
    seed: int = 0,
    key_added: str = EMBEDDING_KEY,
    spot_diameter_um: float | None = None,
    spacing_um: float | None = None,
    slide_mpp: float | None = None,
    format: Literal["h5ad", "zarr"] = "h5ad",
    batch_size: int = 64,
    num_workers: int = 0,
    slide_key: str = "slide",
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Embed every slide of a cohort into its own output file, sharded over processes, resumable.

    Every slide is read, embedded with :func:`~histo2expr.tl.embed_patches` and written to
    ``out_dir/{slide}.h5ad`` (or ``.zarr``): under a temporary name first, then renamed, so an
    output that exists is complete. Slides whose output exists are skipped, so a run that crashed
    or was stopped is finished by running it again. With ``devices`` > 1 (or several nodes),
    Lightning Fabric starts one process per device and each embeds every *N*-th of the slides
    still to do; like data-parallel training, the ``"ddp"`` strategy re-runs the script (or
    command) in each process, so call this from a script, not a notebook (there:
    ``strategy="ddp_notebook"``). One line per slide reports its progress.

    Parameters
    ----------
    slides
        Whole-slide images (any file :func:`histo2expr.io.read_wsi` reads; pseudo-spots are laid on
        the tissue with :func:`histo2expr.pp.tile_slide`), Visium Space Ranger output folders
        (:func:`histo2expr.io.read_visium`; the slide id is the folder's name) or ``.h5ad`` files of
        the data model (one output per slide they hold): a path, a glob pattern such as
        ``"slides/*.svs"``, or a list of them.
    out_dir
        Folder of the outputs (made when missing). Run one cohort job per folder at a time:
        a run removes the temporary files it finds there (left by a crash).
    encoder, weights, patch_size, mpp, tokens, seed, key_added
        As in :func:`~histo2expr.tl.embed_patches` (``weights``: ``"default"``, ``"imagenet"``,
        ``None`` for random weights from ``seed``, or a checkpoint path).
    tta, context, neighbours, stain_normalization
        The feature options of :func:`~histo2expr.tl.embed_patches`, with its defaults (4 views,
        no context view, the mean of the 6 nearest spots, no stain normalisation). A model fitted on
        these features predicts only slides embedded with the same options (``predict_cohort``
        checks it before any work).
    spot_diameter_um, spacing_um
        Whole-slide images only: pseudo-spot size and spacing in µm (see :func:`~histo2expr.pp.tile_slide`).
    slide_mpp
        Whole-slide images only: micrometres per full-resolution pixel, for files that record none
        (see :func:`~histo2expr.io.read_wsi`).
    format
        ``"h5ad"`` (the AnnData) or ``"zarr"`` (a SpatialData with the slide's image, spots and table,
        :func:`histo2expr.io.to_spatialdata`).
    batch_size, num_workers
        Patches per forward pass, and DataLoader processes cutting patches in each process.
    slide_key
        Column of ``obs`` with the slide of each spot (``.h5ad`` inputs).
    accelerator, devices, strategy, num_nodes
        Lightning's flags, as for :func:`~histo2expr.tl.fit_histo2expr`: e.g. ``accelerator="gpu",
        devices=4`` for one process per GPU, ``num_nodes`` for clusters (SLURM's ``srun`` and
        ``torchrun`` set the ranks); ``accelerator="cpu", devices=2`` runs two CPU processes.
    backend
        What runs the encoder, as in :func:`~histo2expr.tl.embed_patches`: ``"auto"``, ``"torch"``,
        ``"onnx"`` or ``"bf16"``; checked against each process's device before its first slide. The
        backend asked for is recorded in the provenance (``run``), the one that ran in
        ``.uns[key_added]["backend"]``. It is not compared when a run resumes, so that a cohort may be
        finished on other hardware (``"auto"`` picks by device): ONNX Runtime gave EfficientNet-Lite0's
        float32 features (cosine 1.0), bf16 a cosine of at least 0.997 to them
        (``benchmarks/results/encoder_inference.md``).
    overwrite
        Redo every slide, replacing existing outputs. Without it, an existing output written with
        other parameters (encoder, weights, patch geometry, ...) is an error rather than skipped.
    progress
        Print one line per slide.

    Returns
    -------
    A DataFrame with one row per slide (the same in every process): ``slide``, ``input``,
    ``output``, ``status`` (``"written"`` or ``"skipped"``), ``n_spots``, ``seconds``, ``process``
    and ``error``. Raises after all other slides are done when some failed, naming them. Each output
    holds the slide's AnnData with

    ``.obsm[key_added]`` (and ``.uns[key_added]``)
        The embeddings and their description, as :func:`~histo2expr.tl.embed_patches` sets them.
    ``.uns["histo2expr_cohort"]``
        Provenance: ``step`` (``"embed"``), ``input``, ``slide``, ``histo2expr_version``,
        ``parameters`` (JSON of the arguments that determine the values: encoder, weights, patch
        geometry, the feature options ``tta``, ``context``, ``neighbours`` and
        ``stain_normalization``, ...), ``run`` (JSON: batch size, workers, engine flags, backend), ``encoder`` (``name``, ``weights``, ``weights_sha1``: a hash of the
        encoder's weights).

    Examples
    --------
    >>> hx.tl.embed_cohort("slides/*.svs", "embedded", mpp=0.5, accelerator="gpu", devices=4)  # doctest: +SKIP
    """
    check_patch_size(patch_size)
    positive_int(batch_size, "batch_size")
    from ..models.backends import check_backend_name  # imports torch: not at import time

    check_backend_name(backend)
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights is not None and not isinstance(weights, str):
        msg = "`weights` must be 'default', 'imagenet', None or a checkpoint path for a cohort (a name that each process can load)."
        raise TypeError(msg)
    if weights not in (None, "default", "imagenet") and not Path(weights).is_file():
        msg = f"`weights={weights!r}` is no file; give 'default', 'imagenet', None (random) or a checkpoint file."
        raise FileNotFoundError(msg)
    if tokens is not None:
        positive_int(tokens, "tokens")
    views = {
        "tta": tta,
        "context": context,
        "neighbours": neighbours,
        "stain_normalization": stain_normalization,
    }
    check_feature_options(**views)
    embedding = {
        "encoder": encoder,
        "weights": weights,
        "patch_size": patch_size,
        "mpp": mpp,
        **views,
        "tokens": tokens,
        "seed": seed_value(seed),
        "key_added": key_added,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "backend": backend,
    }
    engine = _engine(accelerator, devices, strategy, num_nodes)
    tiling = _tiling(spot_diameter_um, spacing_um, slide_mpp)
    job = CohortJob(
        step="embed",
        out_dir=Path(out_dir),
        format=_checked_format(format),
        parameters={
            **{k: v for k, v in embedding.items() if k not in _RUN_OPTIONS},
            **tiling,
        },
        run={"batch_size": batch_size, "num_workers": num_workers, "backend": backend, **engine},
        slide_key=slide_key,
        embedding=embedding,
        tiling=tiling,
        overwrite=bool(overwrite),
        progress=bool(progress),
    )
    return _start(job, slides)


def _start(job: CohortJob, inputs: Inputs, model: Histo2ExprModel | None = None) -> pd.DataFrame:
    """Check the inputs against the outputs there are (and ``model``), before any work; then run the job."""
    slides = cohort_slides(inputs, slide_key=job.slide_key)
    if model is not None:
        _check_input_features(slides, model)
    if job.format == "zarr":
        for unit in slides:
            check_element_name(unit.slide)
    if job.out_dir.exists() and not job.out_dir.is_dir():
        msg = f"The output folder {job.out_dir} is a file; give a folder (it is made when missing)."
        raise NotADirectoryError(msg)
    _check_existing(job, slides)
    return _launch(job, slides, {k: job.run[k] for k in ("accelerator", "devices", "strategy", "num_nodes")})


#: The embedding call named when the features of a cohort's inputs do not match a model's.
_EMBED_COHORT_CALL = "hx.tl.embed_cohort(slides, out_dir"


def _stored_features(path: Path, rep: str) -> dict[str, Any] | None:
    """The record ``uns[rep]`` of an .h5ad file that holds ``obsm[rep]`` (None when it has no such features)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        if f"obsm/{rep}" not in handle:
            return None
        record = handle.get(f"uns/{rep}")
        return {} if record is None else read_elem(record)


def _check_input_features(slides: list[CohortSlide], model: Histo2ExprModel) -> None:
    """Refuse, before any work, .h5ad inputs whose features were embedded otherwise than the model's training slides."""
    if model.use_rep is None:
        return
    for path in dict.fromkeys(unit.path for unit in slides if unit.reader == "h5ad"):
        record = _stored_features(path, model.use_rep)
        if record is None:
            continue  # embedded here, as the model's slides were
        try:
            check_feature_record(record, model, call=_EMBED_COHORT_CALL)
        except ValueError as error:
            msg = (
                f"{path}: {str(error).rstrip('.')} (`histo2expr embed` takes the same options), or give predict_cohort the slide "
                "images or Visium folders: it embeds them as the model's training slides were."
            )
            raise ValueError(msg) from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def predict_cohort(
    slides: Inputs,
    model: Histo2ExprModel | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    key_added: str = PREDICT_KEY,
    scale: str = "training",
    library_size: float | None = None,
    spot_diameter_um: float | None = None,
    spacing_um: float | None = None,
    slide_mpp: float | None = None,
    format: Literal["h5ad", "zarr"] = "h5ad",
    batch_size: int = 64,
    num_workers: int = 0,
    slide_key: str = "slide",
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict expression on every slide of a cohort into its own output file, sharded over processes, resumable.

    Like :func:`embed_cohort`, whose outputs it reads as well as slide files: a slide without the
    model's frozen features (``obsm[model.use_rep]``) is embedded first with the encoder, weights,
    patch geometry and feature options (``tta``, ``context``, ``neighbours``,
    ``stain_normalization``) the model was trained on, and an ``.h5ad`` input that holds features
    embedded otherwise (e.g. by :func:`embed_cohort` with other options) is refused before any
    work, naming the :func:`embed_cohort` call that matches the model; then :func:`~histo2expr.tl.predict_expression`
    predicts it, and the slide's AnnData with features and predictions is written to
    ``out_dir/{slide}.h5ad`` (or ``.zarr``). Pseudo-spots of whole-slide images take the model's
    spot size and spacing unless given.

    Parameters
    ----------
    slides
        As in :func:`embed_cohort` (e.g. its output files, ``"embedded/*.h5ad"``).
    model
        A fitted :class:`~histo2expr.tl.Histo2ExprModel` or the path of a saved one (read in each process).
    out_dir
        Folder of the outputs (made when missing).
    key_added, scale, library_size
        As in :func:`~histo2expr.tl.predict_expression`.
    spot_diameter_um, spacing_um, slide_mpp, format, batch_size, num_workers, slide_key
        As in :func:`embed_cohort` (``batch_size`` and ``num_workers`` for embedding).
    accelerator, devices, strategy, num_nodes, backend, overwrite, progress
        As in :func:`embed_cohort` (``backend`` for slides it embeds).

    Returns
    -------
    The table of :func:`embed_cohort`. Each output holds the slide's AnnData with the fields
    :func:`~histo2expr.tl.predict_expression` sets (``.obsm[key_added]``, ``.uns[key_added]``, ...;
    read them with :func:`histo2expr.get.predictions`), the features when it embedded them, and
    ``.uns["histo2expr_cohort"]`` as in :func:`embed_cohort` with ``step`` ``"predict"`` and
    ``parameters`` holding ``features`` (the embedding arguments of the model's features) and
    ``model`` (``sha256``: the hash of the model file, or of the saved model when an object was
    passed; ``method``, ``path``).
    """
    one_of(scale, SCALES, "scale", fix="See `hx.tl.predict_expression` for what each means.")
    positive_int(batch_size, "batch_size")
    from ..models.backends import check_backend_name  # imports torch: not at import time

    check_backend_name(backend)
    if isinstance(model, Histo2ExprModel):
        loaded = model
        with tempfile.TemporaryDirectory() as folder:  # hashed as saved
            saved = Path(folder) / "model.pt"
            model.save(saved)
            model_hash = _file_sha256(saved)
    else:
        path = Path(model)
        loaded = Histo2ExprModel.load(path)
        model_hash = _file_sha256(path)
    features = None if loaded.use_rep is None else frozen_encoder_arguments(loaded)
    embedding = (
        None
        if features is None
        else {**features, "batch_size": batch_size, "num_workers": num_workers, "backend": backend}
    )
    engine = _engine(accelerator, devices, strategy, num_nodes)
    tiling = _tiling(spot_diameter_um, spacing_um, slide_mpp)
    prediction = {"key_added": key_added, "scale": scale, "library_size": library_size}
    record = {"sha256": model_hash, "method": loaded.method.name, "use_rep": loaded.use_rep or ""}
    if not isinstance(model, Histo2ExprModel):
        record["path"] = str(Path(model))
    job = CohortJob(
        step="predict",
        out_dir=Path(out_dir),
        format=_checked_format(format),
        parameters={"model_sha256": model_hash, "features": features or {}, **prediction, **tiling},
        run={"batch_size": batch_size, "num_workers": num_workers, "backend": backend, **engine},
        slide_key=slide_key,
        embedding=embedding,
        tiling=tiling,
        overwrite=bool(overwrite),
        progress=bool(progress),
        model=model if isinstance(model, Histo2ExprModel) else Path(model),
        model_record=record,
        prediction=prediction,
    )
    return _start(job, slides, loaded)
