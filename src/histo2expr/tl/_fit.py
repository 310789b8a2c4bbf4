"""Fit a method with leak-free cross-validation, then refit it on every slide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._validation import check_log_normalised, check_not_empty, check_unique_var_names, get_table
from ..models.base import FitReport, Method, SpotSet, TrainConfig, get_method
from ..models.scaling import Standardizer
from ..pp import select_genes
from ..splits import inner_validation_split, make_folds
from ._data import (
    check_genes,
    coordinates,
    frozen_inputs,
    gene_pcc_table,
    h5ad_safe,
    log_expression,
    score_slides,
    slide_labels,
    spot_geometry_um,
)
from ._model import Histo2ExprModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

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

    def spots(self, positions: np.ndarray, targets: np.ndarray | None = None) -> SpotSet:
        return SpotSet(
            coords=self.coords[positions],
            groups=self.slides[positions],
            features=None if self.features is None else self.features[positions],
            patches=self.patches,
            indices=None if self.patches is None else positions,
            targets=targets,
        )


@dataclass
class _FoldFit:
    method: Method
    genes: list[str]
    scaler: Standardizer
    report: FitReport
    validation: str


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
    """Choose genes, standardise, split off an inner validation set and fit — training spots only."""
    train_slides = sorted(set(inputs.slides[train]))
    if isinstance(genes, int):
        chosen = select_genes(
            inputs.table, genes, flavor=gene_flavor, slides=train_slides, slide_key=slide_key, inplace=False
        )
    else:
        chosen = genes
    expression = log_expression(inputs.table[train], chosen)
    scaler = Standardizer(floor_ratio=_TARGET_FLOOR_RATIO, clip=None).fit(expression)
    targets = scaler.transform(expression)
    fit_part, validation_part, how = inner_validation_split(inputs.slides[train], seed=config.seed)
    model = get_method(method)(**method_params)
    report = model.fit(
        inputs.spots(train[fit_part], targets[fit_part]),
        inputs.spots(train[validation_part], targets[validation_part]),
        config,
    )
    return _FoldFit(model, chosen, scaler, report, how)


def fit_histo2expr(
    data: AnnData | SpatialData,
    *,
    method: str = "ridge",
    genes: int | Sequence[str] = 250,
    gene_flavor: str = "heg",
    slide_key: str = "slide",
    patient_key: str | None = None,
    cv: str | int | None = None,
    use_rep: str | None = "X_histo",
    patch_size: int = 224,
    mpp: float | None = None,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 10,
    seed: int = 0,
    device: str = "auto",
    num_workers: int = 0,
    key_added: str = "histo2expr",
    table_key: str = "table",
    progress: bool = True,
    refit: bool = True,
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
        A registered method: ``"ridge"``, ``"stnet"``, ``"bleep"``, ... (see
        :func:`histo2expr.models.available_methods`).
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
        ``patch_size`` / ``mpp``.
    patch_size, mpp
        Patch geometry of the end-to-end regime.
    epochs, batch_size, lr, weight_decay, patience
        Training of the torch methods (AdamW, early stopping after ``patience``
        epochs without improvement of the inner validation loss).
    seed
        One seed for gene-independent randomness: initialisation, batches, splits;
        CPU runs with the same seed are bit-identical.
    device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"mps"``.
    num_workers
        DataLoader workers reading patches (end-to-end regime).
    key_added
        Prefix of the fields written.
    table_key
        SpatialData only: the table to use.
    progress
        Show progress bars over folds and epochs.
    refit
        After cross-validation, refit the method on every slide and return it. ``False``
        (only with ``cv``) skips the refit — for comparing methods, when only the
        cross-validated scores are wanted — and returns ``None``; ``.uns[key_added]["genes"]``
        is then not set.
    **method_params
        Parameters of the method (e.g. ``top_k=50`` for ``"bleep"``).

    Returns
    -------
    The model refitted on all slides (``None`` with ``refit=False``). With ``cv``, sets the
    following fields:

    ``.layers[f"{key_added}_pred"]``
        Out-of-fold predictions (log-normalised scale) for the genes of each fold,
        NaN for genes that fold did not predict.
    ``.obs[f"{key_added}_fold"]``
        The fold in which each spot was held out.
    ``.uns[key_added]["folds"]``
        One row per held-out slide: ``slide, fold, n_spots, pcc_acg, pcc_heg50,
        pcc_hvg50, mse, mae`` (standardised), ``mse_log, mae_log, gene_corr_agreement,
        n_nan_genes, n_genes, small_slide`` (fewer than 20 spots: left out of the means of
        :func:`histo2expr.metrics.summarize`, with a warning).
    ``.uns[key_added]["gene_pcc"]``
        PCC of every predicted gene (rows) on every held-out slide (columns).

    Always sets ``.uns[key_added]["params"]`` (incl. ``"token_rep"``, the ``obsm`` key of the
    image tokens used or ``""``, and ``"n_tokens"``), and ``.uns[key_added]["genes"]`` (the
    genes of the returned model) when it refits.
    """
    from tqdm.auto import tqdm

    from ..models import resolve_device

    table = get_table(data, table_key)
    method_class = get_method(method)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        seed=seed,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    if not refit and cv is None:
        msg = "`refit=False` only makes sense with cross-validation; pass `cv=` (e.g. 'leave_one_slide_out')."
        raise ValueError(msg)
    check_not_empty(table, what="fitting")
    check_unique_var_names(table)
    genes = check_genes(table, genes)
    slides = slide_labels(table, slide_key)
    uses_coordinates = method_class(**method_params).uses_coordinates  # also checks the parameters now
    resolve_device(device)
    check_log_normalised(table)
    coords = coordinates(table, needed_by=method if uses_coordinates else None)
    regime = "frozen" if use_rep is not None else "end2end"
    if regime not in method_class.regimes:
        msg = f"Method {method!r} supports the {method_class.regimes} regime(s); " + (
            "pass `use_rep=None` to train end to end."
            if regime == "frozen"
            else "pass `use_rep=` with frozen features."
        )
        raise ValueError(msg)
    features = patches = token_rep = None
    encoder = patch_geometry = None
    if use_rep is not None:
        features, token_rep = frozen_inputs(table, use_rep, tokens=method_class.token_input, method=method)
        record = table.uns.get(use_rep, {})
        encoder, patch_geometry = record.get("encoder"), record.get("patches")
    else:
        from ..patches import PatchSource

        patches = PatchSource(data, patch_size=patch_size, mpp=mpp, slide_key=slide_key, table_key=table_key)
        patch_geometry = {"patch_size": patches.patch_size, "mpp": patches.mpp}
    patch_geometry = {**(patch_geometry or {}), **spot_geometry_um(table)}
    inputs = _Inputs(table, slides, coords, features, patches)
    fit_args = {
        "method": method,
        "method_params": method_params,
        "genes": genes,
        "gene_flavor": gene_flavor,
        "slide_key": slide_key,
        "config": config,
    }
    params = h5ad_safe(
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
            "patience": patience,
            "seed": seed,
            "n_features": 0 if features is None else int(features.shape[-1]),
            "token_rep": token_rep or "",
            "n_tokens": int(features.shape[1]) if token_rep else 0,
        }
    )
    record: dict[str, Any] = {"params": params}
    cv_gene_pcc = None
    if cv is not None:
        folds = make_folds(table, cv, slide_key=slide_key, patient_key=patient_key, seed=seed)
        predictions = np.full(table.shape, np.nan, dtype=np.float32)
        fold_of = np.empty(table.n_obs, dtype=object)
        rows, pccs = [], {}
        for fold in tqdm(folds, desc="folds", disable=not progress):
            fitted = _fit_on(inputs, fold.train, **fit_args)
            predicted = fitted.scaler.inverse_transform(fitted.method.predict(inputs.spots(fold.test)))
            columns = table.var_names.get_indexer(fitted.genes)
            predictions[np.ix_(fold.test, columns)] = predicted
            fold_of[fold.test] = fold.name
            truth = log_expression(table[fold.test], fitted.genes)
            fold_rows, fold_pccs = score_slides(
                truth,
                predicted,
                slides[fold.test],
                genes=fitted.genes,
                mean=fitted.scaler.mean_,
                std=fitted.scaler.scale_,
            )
            rows += [{"slide": row["slide"], "fold": fold.name, **row} for row in fold_rows]
            pccs.update(fold_pccs)
        table.layers[f"{key_added}_pred"] = predictions
        table.obs[f"{key_added}_fold"] = pd.Categorical(
            fold_of.astype(str), categories=[f.name for f in folds]
        )
        gene_pcc = gene_pcc_table(pccs)
        record["folds"] = pd.DataFrame(rows)
        record["gene_pcc"] = gene_pcc
        cv_gene_pcc = {
            str(g): float(v) for g, v in gene_pcc.mean(axis=1, skipna=True).items() if np.isfinite(v)
        }
    if not refit:
        table.uns[key_added] = record
        return None
    final = _fit_on(inputs, np.arange(table.n_obs), **fit_args)
    record["genes"] = list(final.genes)
    table.uns[key_added] = record
    return Histo2ExprModel(
        method=final.method,
        genes=final.genes,
        scaler=final.scaler,
        use_rep=use_rep,
        encoder=encoder,
        patches=patch_geometry,
        params=params,
        cv_gene_pcc=cv_gene_pcc,
    )
