"""Fit a method with leak-free cross-validation, then refit it on every slide."""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from .. import _logging as logg
from .._keys import EMBEDDING_KEY, FIT_KEY, Key
from .._predictability import gene_predictability
from .._progress import progress_bar
from .._records import SCALES, is_record
from .._settings import cpu_threads
from .._shared_folds import fit_once
from .._validation import (
    check_log_normalised,
    check_not_empty,
    check_unique_var_names,
    get_table,
    log_expression,
    slide_labels,
)
from ..models.base import FitReport, Method, SpotSet, TrainConfig, get_method, plain_value
from ..models.ensemble import Ensemble, fit_members
from ..models.scaling import Standardizer
from ..pp import select_genes
from ..splits import Fold, inner_validation_splits, make_folds
from ._adapted import activation_cache, encoder_record, side_features
from ._data import (
    check_genes,
    coordinates,
    frozen_inputs,
    gene_pcc_table,
    score_slides,
    spot_geometry_um,
)
from ._intervals import (
    HeldOut,
    IntervalSettings,
    calibrate,
    check_calibration_slides,
    held_out,
    interval_settings,
    neighbour_reference,
    score_intervals,
)
from ._model import Histo2ExprModel
from ._predictions import check_key, prediction_frame, write_results
from ._scale import training_statistics

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models.adapted import ActivationCache
    from ..patches import PatchSource

#: Per-gene scale floor of the targets, relative to the median gene scale.
_TARGET_FLOOR_RATIO = 0.01


@dataclass
class _Inputs:
    """What every fold draws from: the table, slides, coordinates and features or patches."""

    table: AnnData
    slides: np.ndarray
    coords: np.ndarray
    features: np.ndarray | None
    patches: PatchSource | None
    activations: ActivationCache | None = None

    def spots(self, positions: np.ndarray, targets: np.ndarray | None = None) -> SpotSet:
        indexed = self.patches is not None or self.activations is not None
        return SpotSet(
            coords=self.coords[positions],
            groups=self.slides[positions],
            features=None if self.features is None else self.features[positions],
            patches=self.patches,
            indices=positions if indexed else None,
            targets=targets,
            activations=self.activations,
        )


@dataclass
class _FoldFit:
    """A method fitted on one fold's training spots; per member, its fit report and inner validation part."""

    method: Method
    genes: list[str]
    scaler: Standardizer
    reports: list[FitReport | None]
    validation: list[str]

    def record(self) -> dict[str, str]:
        """The fold record's ``inner_validation`` and ``best_epochs``: per member, '; '-separated."""
        epochs = ["-" if r is None or r.best_epoch is None else str(r.best_epoch) for r in self.reports]
        return {"inner_validation": "; ".join(self.validation), "best_epochs": "; ".join(epochs)}


def _fit_on(
    inputs: _Inputs,
    train: np.ndarray,
    *,
    method: str,
    method_params: Mapping[str, Any],
    genes: int | list[str],
    gene_flavor: str,
    slide_key: str,
    config: TrainConfig,
) -> _FoldFit:
    """Choose genes, standardise, split off inner validation sets and fit — training spots only.

    A method whose ``ensemble`` setting is K > 1 is fitted K times, each member on its own inner
    validation split (:func:`~histo2expr.splits.inner_validation_splits`) with its own seed
    (:func:`~histo2expr.models.ensemble.fit_members`).
    """
    train_slides = sorted(set(inputs.slides[train]))
    if isinstance(genes, int):
        chosen = cast(  # inplace=False returns the genes
            "list[str]",
            select_genes(
                inputs.table,
                genes,
                flavor=gene_flavor,
                slides=train_slides,
                slide_key=slide_key,
                inplace=False,
            ),
        )
    else:
        chosen = genes
    expression = log_expression(inputs.table[train], chosen)
    scaler = Standardizer(floor_ratio=_TARGET_FLOOR_RATIO, clip=None).fit(expression)
    targets = scaler.transform(expression)
    method_class = get_method(method)
    settings = method_class(**method_params).settings
    splits = inner_validation_splits(inputs.slides[train], getattr(settings, "ensemble", 1), seed=config.seed)
    parts = [
        (inputs.spots(train[fit], targets[fit]), inputs.spots(train[validation], targets[validation]))
        for fit, validation, _ in splits
    ]
    model = fit_members(method_class, settings, parts, config)
    validation = [
        "+".join(dict.fromkeys(inputs.slides[train[part]])) if how == "by slide" else f"{len(part)} spots"
        for _, part, how in splits
    ]
    members = model.members if isinstance(model, Ensemble) else [model]
    return _FoldFit(model, chosen, scaler, [m.report for m in members], validation)


@dataclass
class _FitPlan:
    """A call of :func:`fit_histo2expr`, checked: what its fits draw from, its folds and its record's entries."""

    inputs: _Inputs
    fit_args: dict[str, Any]
    params: dict[str, Any]
    folds: list[Fold]
    intervals: IntervalSettings | None
    kind: str
    protocol: str
    protocol_note: str
    shared_patients_warning: str
    key_added: str
    use_rep: str | None
    encoder: Any
    patch_geometry: dict[str, Any]
    num_workers: int
    progress: bool
    refit: bool

    @cached_property
    def _fingerprint(self) -> str | None:
        """The fit's parameters but its scheme, as text; `None` when a callable setting makes them unknowable."""
        if any(callable(value) for value in self.fit_args["method_params"].values()):
            return None
        return json.dumps(
            {k: v for k, v in self.params.items() if k not in ("cv", "patient_key")},
            sort_keys=True,
            default=str,
        )

    def fold_key(self, train: np.ndarray) -> tuple[str, bytes] | None:
        """What a fit on the spots ``train`` is (the same in every process): parameters but the scheme, and spots.

        `None` when a callable setting makes the parameters unknowable: such a fit is never shared.
        """
        return None if self._fingerprint is None else (self._fingerprint, train.tobytes())

    def fit(self, train: np.ndarray) -> _FoldFit:
        """The method fitted on the spots ``train`` (:func:`_fit_on`), on the plan's threads."""
        with cpu_threads(self.num_workers):
            return _fit_on(self.inputs, train, **self.fit_args)


def _fold_fit_plan(data: AnnData, **kwargs: Any) -> _FitPlan | None:
    """The plan of ``fit_histo2expr(data, **kwargs)`` in the frozen regime, whose folds may be fitted apart.

    A fold fitted with :meth:`_FitPlan.fit` (in any process, on a copy of ``data``) and handed by its
    :meth:`~_FitPlan.fold_key` to :func:`~histo2expr._shared_folds.sharing_fold_fits` is taken by a
    :func:`fit_histo2expr` with the same arguments but ``cv`` and ``patient_key`` inside the block,
    with the results of fitting it there. None in the other regimes, whose inputs are a fit's own work
    (the adapted regime's activation cache). Checks the arguments as :func:`fit_histo2expr` does, but
    ``key_added`` (nothing is written).
    """
    arguments = inspect.signature(fit_histo2expr).bind(data, **kwargs)
    arguments.apply_defaults()
    given = arguments.arguments
    regimes = get_method(given["method"]).regimes
    if _regime(given["regime"], given["use_rep"], given["method"], regimes) != "frozen":
        return None
    return _plan_fit(**given)


def _deprecated_device(device: str) -> tuple[str, int | list[int]]:
    """The ``accelerator`` and ``devices`` of a ``device=`` name, with a deprecation warning."""
    from ..models.inference import lightning_device

    accelerator, devices = lightning_device(device)
    msg = (
        f"`device=` is deprecated; pass `accelerator={accelerator!r}, devices={devices!r}` instead "
        "(Lightning's flags, which also run on several devices)."
    )
    warnings.warn(msg, FutureWarning, stacklevel=4)
    return accelerator, devices


def _refitter(inputs: _Inputs, fit_args: dict[str, Any]) -> Any:
    """``fit(positions, genes)``: the method fitted on those spots alone, on the given genes (for calibration)."""
    quiet = {**fit_args, "config": replace(fit_args["config"], progress=False)}
    return lambda positions, genes: _fit_on(inputs, positions, **{**quiet, "genes": genes})


def protocol_name(cv: str | int | None, patient_key: str | None) -> str:
    """How the held-out scores were made, as the reports and plot titles name it."""
    if cv is None:
        return ""
    if isinstance(cv, str):
        return cv
    return f"{int(cv)} grouped folds by {'patient' if patient_key else 'slide'}"


def _shared_patients(table: AnnData, folds: list, patient_key: str | None) -> tuple[str, str]:
    """A note for the record, and a warning, when held-out slides share their patient with training slides.

    The patients are ``obs[patient_key]``, or ``obs["patient"]`` when present (the readers' column).
    Both are empty when no fold shares a patient.
    """
    column = patient_key or ("patient" if "patient" in table.obs else None)
    if column is None or column not in table.obs:
        return "", ""
    patients = table.obs[column].astype(str).to_numpy()
    shared = [f for f in folds if np.intersect1d(patients[f.train], patients[f.test]).size]
    if not shared:
        return "", ""
    n_patients = len(set(patients))
    examples = ", ".join(f"{f.name} (patient {patients[f.test][0]})" for f in shared[:3])
    note = (
        f"{len(shared)} of {len(folds)} folds hold out slides that share their patient with training slides"
    )
    advice = (
        f"For an estimate on new patients use `cv='leave_one_patient_out', patient_key={column!r}` "
        f"({n_patients} patients here)."
        if n_patients > 1
        else "All slides come from one patient: no split here can estimate performance on new patients."
    )
    msg = (
        f"{note}, e.g. {examples}. Their scores measure how well a new section of a patient seen in "
        f"training is predicted, which is easier than a new patient (serial sections look alike). {advice}"
    )
    return note, msg


def _out_of_fold(table: AnnData, parts: list[tuple[np.ndarray, list[str], np.ndarray]]) -> pd.DataFrame:
    """One spots x genes frame of the folds' ``(test, genes, values)``: the union of their genes, NaN elsewhere."""
    genes = list(dict.fromkeys(g for _, fold_genes, _ in parts for g in fold_genes))
    values = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    column = {g: i for i, g in enumerate(genes)}
    for test, fold_genes, predicted in parts:
        values[np.ix_(test, np.array([column[g] for g in fold_genes], dtype=np.intp))] = predicted
    return prediction_frame(values, table.obs_names, genes)


def _cross_validate(
    plan: _FitPlan, *, progress: Any
) -> tuple[pd.DataFrame, np.ndarray, list[dict[str, Any]], dict[str, pd.Series], dict[str, Any]]:
    """Fit and score every fold; out-of-fold predictions of the union of the folds' genes.

    With ``intervals``, the last value holds the out-of-fold interval bounds (``"lower"``, ``"upper"``),
    the spots' ``"ood_pvalue"`` and ``"difficulty"``, and the per-gene ``"coverage"`` and ``"width"`` of
    every held-out slide; the rows gain their means and the slides' shift. Inside
    :func:`histo2expr._shared_folds.sharing_fold_fits`, a fold with the :meth:`~_FitPlan.fold_key` of one
    fitted before (by an earlier cross-validation, or handed to the block) is not fitted again.
    """
    inputs, fit_args, intervals = plan.inputs, plan.fit_args, plan.intervals
    table = inputs.table
    predicted_by_fold, fold_of = [], np.empty(table.n_obs, dtype=object)
    rows, pccs = [], {}
    held: list[tuple[np.ndarray, list[str], HeldOut]] = []
    trust: dict[str, Any] = {"coverage": {}, "width": {}}
    for fold in plan.folds:
        start = logg.info(
            f"    fold {fold.name}: {logg.counted(len(fold.train), 'training spot')}, {len(fold.test):,} held out"
        )
        fitted, shared = fit_once(table, plan.fold_key(fold.train), partial(plan.fit, fold.train))
        if shared:
            logg.info(
                f"    fold {fold.name}: the fit of an earlier cross-validation on the same training spots"
            )
        predicted = fitted.scaler.inverse_transform(fitted.method.predict(inputs.spots(fold.test)))
        predicted_by_fold.append((fold.test, fitted.genes, predicted))
        fold_of[fold.test] = fold.name
        truth = log_expression(table[fold.test], fitted.genes)
        slides = inputs.slides[fold.test]
        fold_rows, fold_pccs = score_slides(
            truth, predicted, slides, genes=fitted.genes, mean=fitted.scaler.mean_, std=fitted.scaler.scale_
        )
        if intervals is not None:
            refit = _refitter(inputs, fit_args)
            spots = held_out(
                inputs,
                fitted,
                fold.train,
                fold.test,
                predicted,
                refit,
                intervals,
                seed=fit_args["config"].seed,
            )
            per_slide, coverage, width = score_intervals(truth, spots, slides, fitted.genes)
            fold_rows = [{**row, **per_slide.loc[row["slide"]].to_dict()} for row in fold_rows]
            held.append((fold.test, fitted.genes, spots))
            trust["coverage"].update(coverage)
            trust["width"].update(width)
        rows += [{"slide": row["slide"], "fold": fold.name, **row, **fitted.record()} for row in fold_rows]
        pccs.update(fold_pccs)
        mean_pcc = pd.concat(list(fold_pccs.values())).mean()
        logg.info(f"    fold {fold.name}: mean held-out gene PCC {mean_pcc:.3f}", time=start)
        progress.update(1)
    if intervals is not None:
        for name in ("lower", "upper"):
            trust[name] = _out_of_fold(table, [(test, genes, getattr(s, name)) for test, genes, s in held])
        for name, field in (("ood_pvalue", "p_value"), ("difficulty", "difficulty")):
            trust[name] = np.full(table.n_obs, np.nan)
            for test, _, spots in held:
                trust[name][test] = getattr(spots, field)
    return _out_of_fold(table, predicted_by_fold), fold_of, rows, pccs, trust


def fit_histo2expr(
    data: AnnData | SpatialData,
    *,
    method: str = "chrep",
    genes: int | Sequence[str] = 250,
    gene_flavor: str = "heg",
    slide_key: str = "slide",
    patient_key: str | None = None,
    cv: str | int | None = None,
    use_rep: str | None = EMBEDDING_KEY,
    regime: str | None = None,
    trainable_blocks: int = 1,
    views: int = 8,
    stain_copies: int = 0,
    patch_size: int = 224,
    mpp: float | None = None,
    stain_normalization: str | None = None,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    num_workers: int = 0,
    key_added: str = FIT_KEY,
    table_key: str = "table",
    progress: bool = True,
    refit: bool = True,
    intervals: bool | str = False,
    level: float = 0.9,
    calibration_folds: int = 5,
    interval_calibration: str = "shift",
    device: str | None = None,
    **method_params: Any,
) -> Histo2ExprModel | None:
    """Fit a histology-to-expression method, optionally cross-validated slide by slide.

    Inside every fold, everything learned from data — the gene choice, the per-gene
    standardisation, the method's weights, galleries and calibration, and early
    stopping (on an inner validation split of the *training* slides: by slide when
    there are at least two, else by spot) — sees the training slides only. The
    held-out slides are only predicted and scored, each on its own.

    Parameters
    ----------
    data
        Log-normalised AnnData (:func:`histo2expr.pp.normalize`) following the
        histo2expr data model, or a SpatialData whose table it is.
    method
        A registered method: ``"chrep"``, ``"ridge"``, ``"stnet"``, ``"bleep"``, ... (see
        :func:`histo2expr.models.available_methods`). The default, ``"chrep"``, had the highest
        mean PCC(ACG) on her2st with :func:`~histo2expr.tl.embed_patches`' default features, over
        three seeds, for about one CPU-minute per leave-one-slide-out run of 1193 spots
        (``benchmarks/results/her2st_features.md``, ``her2st_patience.md``); ``"ridge"`` is
        faster, deterministic, and was better on the one section of an unseen patient.
    genes
        Number of genes to choose on the training slides of each fold (``gene_flavor``),
        or the genes themselves (a list, array or Index of names).
    gene_flavor
        ``"heg"`` (highly expressed) or ``"hvg"`` (highly variable), see
        :func:`histo2expr.pp.select_genes`.
    slide_key, patient_key
        Columns of ``obs`` with the slide and (optionally) the patient of every spot.
    cv
        ``None`` (no cross-validation), ``"leave_one_slide_out"``,
        ``"leave_one_patient_out"`` (recommended when patients have several slides) or
        an integer number of grouped folds.
    use_rep
        Frozen regime: key of ``obsm`` with the frozen features
        (:func:`histo2expr.tl.embed_patches`). A method that takes image tokens
        (``"cmrcnet"``) uses ``obsm[f"{use_rep}_tokens"]`` (``embed_patches(..., tokens=3)``)
        when present, else the pooled features as a single token (with a warning).
        ``None``: end-to-end regime, the method trains its encoder on patches cut at
        ``patch_size`` / ``mpp``. Adapted regime: the context and neighbour blocks of
        ``obsm[use_rep]`` (not its spot view) join the adapted features; ``None``: none.
    regime
        ``None``: ``"frozen"`` with ``use_rep``, else ``"end2end"``. ``"adapted"``: the method trains
        the top ``trainable_blocks`` stages of its encoder (``encoder=``, ImageNet
        EfficientNet-Lite0 by default) with its heads and losses, on activations of the lower
        stages computed once per patch and view and cached on disk (float16, in
        ``hx.settings.cache_dir``, bounded by ``hx.settings.cache_max_bytes``; held-out slides'
        activations are computed too, from their images only). Training draws one cached view per
        spot and epoch; prediction averages the top's features over the four quarter turns, as
        ``embed_patches(tta=4)``. Runs on a CPU; see the methods docs page for time and memory.
    trainable_blocks
        Adapted regime: stages of the encoder that train (1: EfficientNet-Lite0's last stage and head
        convolution). Their BatchNorm layers keep the encoder's running statistics.
    views, stain_copies
        Adapted regime: the training views cached per patch — ``views`` dihedral views (1, 4 or 8)
        and ``stain_copies`` HED stain-jittered copies (strength 0.2, each under a random
        flip / rotation). Each view costs one pass of the lower stages, once.
    patch_size, mpp, stain_normalization
        Patches of the end-to-end and adapted regimes: side, micrometres per pixel, and ``None`` or
        ``"macenko"`` (each slide re-stained from its own stain vectors, see
        :class:`~histo2expr.patches.PatchSource`). In the frozen regime these are choices of
        :func:`~histo2expr.tl.embed_patches`.
    epochs, batch_size, lr, weight_decay
        Training of the torch methods (AdamW).
    patience
        Early stopping after ``patience`` epochs without improvement of the inner validation loss.
        `None`: the method's own (:attr:`~histo2expr.models.Method.default_patience`: 3 for
        ``"chrep"`` and ``"bleep"``, 5 for ``"cmrcnet"``, 10 for the others; the smallest measured
        on her2st that kept each method's accuracy, ``benchmarks/results/her2st_patience.md``); an
        integer applies to any method. The value used is recorded in
        ``.uns[key_added]["params"]["patience"]``.
    seed
        One seed for gene-independent randomness: initialisation, batches, splits;
        CPU runs with the same seed are bit-identical.
    accelerator, devices, strategy, num_nodes, precision
        Where the torch methods train, handed to ``lightning.pytorch.Trainer`` (see the docs
        page "Scaling out"): ``accelerator="auto"`` (a GPU when there is one, else the CPU),
        ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"mps"``; ``devices=1`` (``4`` or ``[0, 1]`` for
        data-parallel training, ``batch_size`` spots per device and step); ``strategy="auto"``
        (``"ddp"`` for several devices: run from a script or ``histo2expr fit``, which every
        process runs in full); ``num_nodes`` machines (e.g. under SLURM); ``precision=None``:
        ``"bf16-mixed"`` on CUDA, ``"32-true"`` elsewhere, recorded in
        ``.uns[key_added]["params"]["precision"]``. Each process returns the same model.
    num_workers
        DataLoader workers reading patches (end-to-end regime).
    key_added
        Key of the results (``uns``, ``obsm``) and prefix of the ``obs`` column written. Predictions of
        :func:`~histo2expr.tl.predict_expression` have their own default key, and a key holding them
        is refused, so that out-of-fold and new predictions never overwrite each other.
    table_key
        SpatialData only: the table to use.
    progress
        Show one progress bar: over the folds (and the refit) with ``cv``, else over the epochs.
    refit
        After cross-validation, refit the method on every slide and return it. ``False``
        (only with ``cv``) skips the refit — for comparing methods, when only the
        cross-validated scores are wanted — and returns ``None``; ``.uns[key_added]["genes"]``
        is then not set.
    intervals
        Conformal prediction intervals per spot and gene (see ``docs/trust.md``): ``True`` or
        ``"adaptive"`` (per-gene half-widths scaled per spot by its distance to the training spots in
        the method's embedding), ``"constant"`` (one half-width per gene), ``False`` (none). They are
        calibrated on residuals of the *training* slides of each model, predicted by the method refitted
        in an inner grouped cross-validation over those slides, so every fold and the refit cost up to
        ``1 + calibration_folds`` fits.
    level
        Nominal coverage of the intervals, in (0, 1).
    calibration_folds
        Inner folds of whole training slides (2 to 5) the calibration residuals come from; fewer folds
        cost less.
    interval_calibration
        ``"shift"``: each gene's half-width is the conformal quantile of all calibration spots' scores,
        and the intervals of every slide predicted whose median spot lies farther from the training
        spots than an unseen training slide's (distance ratio ``r > 1``, read from its images only) are
        widened ``r``-fold; ``"pooled"``: that quantile alone (the same intervals on slides with
        ``r <= 1``, narrower on farther ones); ``"per_slide"``: the largest of every calibration slide's
        own quantile, so that the level holds on each calibration slide, not only on average (wider
        intervals). See ``docs/trust.md``.
    device
        Deprecated: pass ``accelerator`` and ``devices`` (``device="cuda:1"`` is
        ``accelerator="cuda", devices=[1]``).
    **method_params
        Parameters of the method (e.g. ``top_k=50`` for ``"bleep"``). ``ensemble=K`` (every
        trained method) fits K members, each with its own seed and inner validation slide(s),
        rotating through the training slides, and predicts their mean
        (:class:`~histo2expr.models.Ensemble`); it costs K fits in every regime, the intervals'
        calibration refits included. The ridges take no ``ensemble``.

    Returns
    -------
    The model refitted on all slides (``None`` with ``refit=False``). Computations use
    ``hx.settings.n_threads`` CPU threads. When held-out slides
    share their patient with training slides (``patient_key``, or an ``obs["patient"]`` column), a
    warning gives the numbers and recommends ``cv="leave_one_patient_out"``. With ``cv``, sets:

    ``.obsm[key_added]``
        Out-of-fold predictions, a DataFrame of spots x genes (the union of the genes the folds
        chose; NaN where a spot's fold did not predict a gene), log-normalised at the training
        slides' depth. Read it with :func:`histo2expr.get.predictions`; hand it to scanpy with
        :func:`histo2expr.get.predicted_adata`.
    ``.obs[f"{key_added}_fold"]``
        The fold in which each spot was held out.
    ``.uns[key_added]["folds"]``
        One row per held-out slide: ``slide, fold, n_spots, pcc_acg, pcc_heg50,
        pcc_hvg50, mse, mae`` (standardised), ``mse_log, mae_log, gene_corr_agreement,
        n_nan_genes, n_genes, small_slide`` (fewer than 20 spots: left out of the means of
        :func:`histo2expr.metrics.summarize`, with a warning), ``inner_validation`` (the slides each
        member's early stopping validated on, or its number of validation spots) and ``best_epochs``
        (the epoch each member kept; ``-`` for none), one entry per member, ``"; "``-separated.
    ``.uns[key_added]["gene_pcc"]``
        PCC of every predicted gene (rows) on every held-out slide (columns).
    ``.var[f"{key_added}_cv_pcc"]``, ``[f"{key_added}_cv_pcc_low"]``, ``[f"{key_added}_cv_pcc_high"]``
        Each gene's mean held-out PCC and its 95% confidence interval over the held-out slides (a t
        interval over the slides where the gene was predicted; NaN for genes not predicted, and with
        fewer than two such slides).
    ``.var[f"{key_added}_predictable"]``
        Whether that interval lies above zero.

    With ``intervals`` and ``cv``, also:

    ``.obsm[f"{key_added}_lower"]``, ``.obsm[f"{key_added}_upper"]``
        Out-of-fold interval bounds, laid out like the predictions (read them with
        :func:`histo2expr.get.intervals`).
    ``.obs[f"{key_added}_ood_pvalue"]``, ``.obs[f"{key_added}_difficulty"]``
        Each held-out spot's distance to its fold's training spots in the method's embedding: its conformal
        p-value (small: unlike the training slides) and its ratio to an unseen training slide's median.
    ``.uns[key_added]["intervals"]``
        ``level``, ``kind``, ``method`` and ``calibration`` (how they were made).
    ``.uns[key_added]["interval_coverage"]``, ``["interval_width"]``
        Empirical coverage and mean width of every gene (rows) on every held-out slide (columns); the
        ``folds`` rows gain their means, ``coverage`` and ``interval_width``, and ``ood_fraction``
        (share of spots with p < 0.05) and ``distance_ratio`` (median distance to the training spots
        relative to an unseen training slide's).

    Always sets ``.uns[key_added]``: ``"kind"`` (``"cross_validation"``, or ``"fit"`` without ``cv``),
    ``"method"``, ``"protocol"`` (the ``cv`` scheme) and ``"protocol_note"`` (held-out slides that
    share a patient with training slides), ``"scale"``, ``"params"`` (incl. ``"token_rep"``, the
    ``obsm`` key of the image tokens used or ``""``, and ``"n_tokens"``), and ``"genes"`` (the genes
    of the returned model) when it refits. The warning about shared patients is given once per
    AnnData and protocol: a fit of another method on the same folds records the note silently.
    """
    plan = _plan_fit(**locals())  # every argument by name, method_params as one mapping
    check_key(plan.inputs.table, key_added, kind=plan.kind, method=method, protocol=plan.protocol)
    if plan.shared_patients_warning and not any(  # once per AnnData and protocol: other methods stay quiet
        is_record(v) and (v.get("protocol"), v.get("protocol_note")) == (plan.protocol, plan.protocol_note)
        for v in plan.inputs.table.uns.values()
    ):
        warnings.warn(plan.shared_patients_warning, UserWarning, stacklevel=2)
    return _fit_planned(plan)


def _plan_fit(
    data: AnnData | SpatialData,
    *,
    method: str,
    genes: int | Sequence[str],
    gene_flavor: str,
    slide_key: str,
    patient_key: str | None,
    cv: str | int | None,
    use_rep: str | None,
    regime: str | None,
    trainable_blocks: int,
    views: int,
    stain_copies: int,
    patch_size: int,
    mpp: float | None,
    stain_normalization: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int | None,
    seed: int,
    accelerator: str,
    devices: int | str | list[int],
    strategy: str,
    num_nodes: int,
    precision: str | None,
    num_workers: int,
    key_added: str,
    table_key: str,
    progress: bool,
    refit: bool,
    intervals: bool | str,
    level: float,
    calibration_folds: int,
    interval_calibration: str,
    device: str | None,
    method_params: dict[str, Any],
) -> _FitPlan:
    """:func:`fit_histo2expr`'s arguments (``method_params`` as one mapping) checked, and what its fits draw from."""
    table = get_table(data, table_key)
    method_class = get_method(method)
    if device is not None:
        accelerator, devices = _deprecated_device(device)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        seed=seed,
        num_workers=num_workers,
        progress=progress and cv is None,  # with cv, the one bar is the fit's over folds
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        precision=precision,
    ).for_method(method_class)
    if not refit and cv is None:
        msg = "`refit=False` only makes sense with cross-validation; pass `cv=` (e.g. 'leave_one_slide_out')."
        raise ValueError(msg)
    check_not_empty(table, what="fitting")
    check_unique_var_names(table)
    genes = check_genes(table, genes)
    slides = slide_labels(table, slide_key)
    _check_ensemble(method, method_class, method_params)
    uses_coordinates = method_class(**method_params).uses_coordinates  # also checks the parameters now
    check_log_normalised(table)
    settings = interval_settings(intervals, level, calibration_folds, interval_calibration)
    coords = coordinates(table, needed_by=method if uses_coordinates else None)
    regime = _regime(regime, use_rep, method, method_class.regimes)
    if regime == "frozen" and stain_normalization is not None:
        msg = (
            "`stain_normalization` applies to the patches of the end-to-end regime (`use_rep=None`); for frozen "
            "features pass it to `hx.tl.embed_patches(..., stain_normalization=...)`."
        )
        raise ValueError(msg)
    features = patches = token_rep = activations = None
    encoder = patch_geometry = None
    n_tokens = 0
    if regime == "frozen":
        assert use_rep is not None  # _regime refuses the frozen regime without it
        features, token_rep = frozen_inputs(table, use_rep, tokens=method_class.token_input, method=method)
        n_tokens = int(features.shape[1]) if token_rep else 0
        embedded = plain_value(
            table.uns.get(use_rep, {})
        )  # a read h5ad's arrays as lists, as a model file holds
        encoder, patch_geometry = embedded.get("encoder"), embedded.get("patches")
    else:
        from ..patches import PatchSource

        patches = PatchSource(
            data,
            patch_size=patch_size,
            mpp=mpp,
            stain_normalization=stain_normalization,
            slide_key=slide_key,
            table_key=table_key,
        )
        patch_geometry = {"patch_size": patches.patch_size, "mpp": patches.mpp}
        if stain_normalization is not None:
            patch_geometry["stain_normalization"] = stain_normalization
        if regime == "adapted":
            from ..models import AdaptedViews

            settings_of_method = method_class(**method_params).settings
            with cpu_threads(num_workers):
                activations = activation_cache(
                    patches,
                    encoder=settings_of_method.encoder,
                    weights=settings_of_method.weights,
                    trainable_blocks=trainable_blocks,
                    views=AdaptedViews.for_training(views, stain_copies, seed),
                    seed=seed,
                    batch_size=batch_size,
                    progress=progress,
                )
            features, patches = side_features(table, use_rep), None
            encoder = encoder_record(activations, seed)
            if use_rep is not None:  # how the frozen blocks were embedded, to embed new slides alike
                embedded = plain_value(table.uns.get(use_rep, {})).get("patches", {})
                patch_geometry.update(
                    {k: embedded[k] for k in ("tta", "context", "neighbours") if k in embedded}
                )
    patch_geometry = {**(patch_geometry or {}), **spot_geometry_um(table)}
    inputs = _Inputs(table, slides, coords, features, patches, activations)
    fit_args = {
        "method": method,
        "method_params": method_params,
        "genes": genes,
        "gene_flavor": gene_flavor,
        "slide_key": slide_key,
        "config": config,
    }
    params = plain_value(
        {
            "method": method,
            "method_params": {k: v for k, v in method_params.items() if v is not None and not callable(v)},
            "genes": genes if isinstance(genes, int) else "given",
            "gene_flavor": gene_flavor,
            "slide_key": slide_key,
            "patient_key": patient_key or "",
            "cv": "" if cv is None else cv,
            "use_rep": use_rep or "",
            "regime": regime,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "patience": config.patience,
            "precision": config.resolved_precision,
            "seed": seed,
            "n_features": _n_features(table, use_rep, features, regime),
            **_adapted_params(activations),
            "token_rep": token_rep or "",
            "n_tokens": n_tokens,
            "intervals": settings.kind if settings else "",
            "level": level,
            "calibration_folds": calibration_folds,
            "interval_calibration": interval_calibration,
        }
    )
    kind, protocol = ("fit", "") if cv is None else ("cross_validation", protocol_name(cv, patient_key))
    folds = (
        [] if cv is None else make_folds(table, cv, slide_key=slide_key, patient_key=patient_key, seed=seed)
    )
    check_calibration_slides(slides, folds, settings)
    note, warning = _shared_patients(table, folds, patient_key) if folds else ("", "")
    return _FitPlan(
        inputs=inputs,
        fit_args=fit_args,
        params=params,
        folds=folds,
        intervals=settings,
        kind=kind,
        protocol=protocol,
        protocol_note=note,
        shared_patients_warning=warning,
        key_added=key_added,
        use_rep=use_rep,
        encoder=encoder,
        patch_geometry=patch_geometry,
        num_workers=num_workers,
        progress=progress,
        refit=refit,
    )


def _fit_planned(plan: _FitPlan) -> Histo2ExprModel | None:
    """Cross-validate (with folds) and refit (with ``refit``) as planned; write the results."""
    inputs, folds, fit_args, settings = plan.inputs, plan.folds, plan.fit_args, plan.intervals
    table, slides, params, key_added = inputs.table, inputs.slides, plan.params, plan.key_added
    method, regime, protocol, refit = fit_args["method"], params["regime"], plan.protocol, plan.refit
    start = logg.info(
        f"fitting {method} ({regime}) on {logg.counted(table.n_obs, 'spot')} of "
        f"{logg.counted(len(set(slides)), 'slide')}"
        + (f", {protocol}: {logg.counted(len(folds), 'fold')}" if folds else "")
    )
    record: dict[str, Any] = {
        "kind": plan.kind,
        "method": method,
        "protocol": protocol,
        "protocol_note": plan.protocol_note,
        "scale": SCALES["training"],
        "params": params,
    }
    results: dict[str, Any] = {}
    cv_gene_pcc = predictability = None
    with (
        cpu_threads(plan.num_workers),
        progress_bar(
            total=len(folds) + int(refit), desc=f"fit {method}", disable=not plan.progress or not folds
        ) as bar,
    ):
        if folds:
            frame, fold_of, rows, pccs, trust = _cross_validate(plan, progress=bar)
            gene_pcc = gene_pcc_table(pccs)
            record.update(folds=pd.DataFrame(rows), gene_pcc=gene_pcc)
            predictability = gene_predictability(gene_pcc)
            results = {
                "predictions": frame,
                "obs": {
                    Key.obs.fold(key_added): pd.Categorical(
                        fold_of.astype(str), categories=[f.name for f in folds]
                    )
                },
                "var": {
                    Key.var.predictability(key_added, column): predictability[column]
                    .reindex(table.var_names, fill_value=False if column == "predictable" else np.nan)
                    .to_numpy(dtype=bool if column == "predictable" else np.float32)
                    for column in predictability
                },
            }
            if settings is not None:
                record.update(
                    intervals=settings.describe(),
                    interval_coverage=gene_pcc_table(trust["coverage"]),
                    interval_width=gene_pcc_table(trust["width"]),
                )
                results["obs"][Key.obs.ood_pvalue(key_added)] = trust["ood_pvalue"]
                results["obs"][Key.obs.difficulty(key_added)] = trust["difficulty"]
                results["obsm"] = {
                    Key.obsm.lower(key_added): trust["lower"],
                    Key.obsm.upper(key_added): trust["upper"],
                }
            cv_gene_pcc = {
                str(g): float(v) for g, v in gene_pcc.mean(axis=1, skipna=True).items() if np.isfinite(v)
            }
        refit_start = (
            logg.info(f"    final model: fitting on all {logg.counted(table.n_obs, 'spot')}")
            if refit
            else None
        )
        final = plan.fit(np.arange(table.n_obs)) if refit else None
        model_trust = (
            None if final is None else _model_trust(inputs, final, fit_args, settings, predictability)
        )
        bar.update(int(refit))
        if refit_start is not None:
            logg.info("    final model: finished", time=refit_start)
    if final is None:
        write_results(table, key_added, record=record, **results, start=start)
        return None
    record["genes"] = list(final.genes)
    model_params = {**params, "protocol": protocol, "training_data": training_statistics(table, slides)}
    write_results(table, key_added, record=record, **results, start=start)
    return Histo2ExprModel(
        method=final.method,
        genes=final.genes,
        scaler=final.scaler,
        use_rep=plan.use_rep,
        encoder=plan.encoder,
        patches=plan.patch_geometry,
        params=plain_value(model_params),
        cv_gene_pcc=cv_gene_pcc,
        trust=model_trust,
    )


def _check_ensemble(method: str, method_class: type[Method], method_params: Mapping[str, Any]) -> None:
    """A clear error for ``ensemble=`` of a method that is not trained (its settings have no ``ensemble``)."""
    if "ensemble" in method_params and "ensemble" not in {
        f.name for f in fields(method_class.settings_class)
    }:
        msg = (
            f"Method {method!r} has no `ensemble` setting: it is not trained from a random start, so its members "
            "would all be one model. Drop `ensemble=`; it applies to the trained methods "
            "(see `hx.models.Ensemble`)."
        )
        raise ValueError(msg)


def _regime(regime: str | None, use_rep: str | None, method: str, supported: tuple[str, ...]) -> str:
    """The regime of a fit: ``regime``, or frozen / end-to-end by ``use_rep``; a clear error when unsupported."""
    from ..models.base import REGIMES

    if regime is None:
        regime = "frozen" if use_rep is not None else "end2end"
    if regime not in REGIMES:
        msg = (
            f"`regime={regime!r}` is not one of {REGIMES} (or None: frozen with `use_rep`, else end to end)."
        )
        raise ValueError(msg)
    if regime == "frozen" and use_rep is None:
        msg = "The frozen regime needs `use_rep`, the `obsm` key of the frozen features (e.g. 'X_histo')."
        raise ValueError(msg)
    if regime == "end2end" and use_rep is not None:
        msg = "The end-to-end regime reads patches, not frozen features; pass `use_rep=None`."
        raise ValueError(msg)
    if regime not in supported:
        msg = f"Method {method!r} supports the {supported} regime(s), not {regime!r}; " + (
            "pass `use_rep=` with frozen features." if "frozen" in supported else "choose one of those."
        )
        raise ValueError(msg)
    return regime


def _n_features(table: AnnData, use_rep: str | None, features: np.ndarray | None, regime: str) -> int:
    """Width of the frozen features the model reads: ``obsm[use_rep]`` as a whole in the adapted regime."""
    if regime == "adapted":
        return 0 if use_rep is None else int(table.obsm[use_rep].shape[1])
    return 0 if features is None else int(features.shape[-1])


def _adapted_params(activations: ActivationCache | None) -> dict[str, Any]:
    """The adapted regime's record: trainable blocks, views, and the size and build time of the activation cache."""
    if activations is None:
        return {}
    return {
        "trainable_blocks": activations.trainable_blocks,
        "views": activations.views.plain(),
        "activation_cache": {
            "bytes": activations.nbytes,
            "seconds": activations.seconds,
            "shape": list(activations.shape),
        },
    }


def _model_trust(
    inputs: _Inputs,
    final: _FoldFit,
    fit_args: dict[str, Any],
    settings: IntervalSettings | None,
    predictability: pd.DataFrame | None,
) -> dict[str, Any]:
    """What the refitted model keeps to judge new spots (``Histo2ExprModel.trust``).

    Its training spots' neighbour reference, the calibration of its intervals (with ``intervals``) and
    its genes' predictability (with ``cv``).
    """
    everything, seed = np.arange(inputs.table.n_obs), fit_args["config"].seed
    calibration = None
    if settings is not None:
        calibration = calibrate(
            inputs,
            everything,
            final.genes,
            _refitter(inputs, fit_args),
            settings,
            seed=seed,
        )
    table = None if predictability is None else predictability.reindex(final.genes)
    return {
        "reference": neighbour_reference(inputs, final, everything, seed).state_dict(),
        "calibration": None if calibration is None else calibration.state_dict(),
        "predictability": None
        if table is None
        else {c: table[c].tolist() for c in ("cv_pcc_low", "cv_pcc_high")},
    }
