"""Every AnnData key histo2expr writes or reads, and the one function that writes fields into an AnnData.

Keys are built here and nowhere else: ``Key.obsm.lower(key)`` rather than ``f"{key}_lower"``, so that
what a call writes, what :mod:`histo2expr.get` and :mod:`histo2expr.pl` read and what the docs list
cannot drift apart. Keys that depend on a ``key_added`` are functions of it; fixed keys are
attributes. ``docs/data_model.md`` describes what each field holds.

:func:`write_fields` is how every function of :mod:`histo2expr.tl` and :mod:`histo2expr.pp` that
changes a user's AnnData writes to it: all fields at once, after everything is computed (so that a
failed call leaves the AnnData as it was), each one logged as added, updated or removed, as scanpy
and squidpy log theirs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _logging as logg
from ._predictability import COLUMNS

if TYPE_CHECKING:
    from anndata import AnnData

#: Default ``key_added`` of :func:`~histo2expr.tl.fit_histo2expr`.
FIT_KEY = "histo2expr"
#: Default ``key_added`` of :func:`~histo2expr.tl.predict_expression` and ``evaluate_expression``.
PREDICT_KEY = "histo2expr_pred"
#: Default ``key_added`` of :func:`~histo2expr.tl.embed_patches` (its features in ``obsm``).
EMBEDDING_KEY = "X_histo"
#: Default ``key_added`` of :func:`~histo2expr.pp.select_genes`.
SELECTED_KEY = "histo2expr_selected"


def _key(template: str, doc: str) -> staticmethod[[str], str]:
    """A key built from a ``key_added``: ``template`` with ``{key}`` in it, e.g. ``"{key}_fold"``."""

    def build(key: str) -> str:
        return template.format(key=key)

    build.__doc__ = f"{doc} (``{template}``)"
    return staticmethod(build)


class Key:
    """The AnnData keys of histo2expr, by the attribute of the AnnData that holds them."""

    class obs:
        """Columns of ``.obs``."""

        #: Counts per spot before normalisation (:func:`~histo2expr.pp.normalize`).
        total_counts = "total_counts"
        #: The spots element and the spot's index in it, of a table made by :func:`~histo2expr.io.to_spatialdata`.
        region = "region"
        spot_id = "spot_id"
        fold = _key("{key}_fold", "The cross-validation fold that held each spot out")
        similarity = _key("{key}_similarity", "The retrieval similarity of each spot to the method's gallery")
        ood_pvalue = _key("{key}_ood_pvalue", "Each spot's out-of-distribution p-value")
        difficulty = _key("{key}_difficulty", "Each spot's difficulty (the scale of its adaptive intervals)")

    class obsm:
        """Arrays and frames of ``.obsm``."""

        #: Spot centres (x, y) in full-resolution pixels.
        spatial = "spatial"
        features = _key("{key}", "Frozen image features of each spot (:func:`~histo2expr.tl.embed_patches`)")
        tokens = _key("{key}_tokens", "The token grids beside the frozen features of ``obsm[key]``")
        predictions = _key("{key}", "The predictions, spots x genes")
        embedding = _key("X_{key}", "The fitted method's own image embedding of each spot")
        lower = _key("{key}_lower", "Lower bounds of the prediction intervals, laid out as the predictions")
        upper = _key("{key}_upper", "Upper bounds of the prediction intervals")

    class var:
        """Columns of ``.var``."""

        selected = _key("{key}", "Whether :func:`~histo2expr.pp.select_genes` chose the gene")
        rank = _key("{key}_rank", "The gene's rank in :func:`~histo2expr.pp.select_genes` (-1: not chosen)")

        @staticmethod
        def predictability(key: str, column: str) -> str:
            """A gene's cross-validated PCC, its interval or flag: ``column`` of ``_predictability.COLUMNS``."""
            return f"{key}_{column}"

    class layers:
        """Layers."""

        #: Raw counts (kept by :func:`~histo2expr.pp.normalize`).
        counts = "counts"
        #: Measured log-normalised expression beside predictions (:func:`~histo2expr.get.predicted_adata`).
        measured = "measured"
        #: Interval bounds of :func:`~histo2expr.get.predicted_adata`.
        lower = "lower"
        upper = "upper"

    class uns:
        """Entries of ``.uns``."""

        #: Images and scale factors per slide (scanpy's layout).
        spatial = "spatial"
        #: scanpy's mark of log-normalised ``X``.
        log1p = "log1p"
        #: Marks an AnnData made by :func:`~histo2expr.get.predicted_adata`.
        predicted = "predicted_expression"
        #: What :func:`~histo2expr.pp.tile_slide` did.
        tile_slide = "tile_slide"
        #: Provenance of one slide's output of the cohort tools.
        cohort_provenance = "histo2expr_cohort"
        #: Provenance of a table made by :func:`~histo2expr.io.to_spatialdata`.
        spatialdata_provenance = "histo2expr_to_spatialdata"
        record = _key(
            "{key}", "The record of a fit, prediction, embedding or gene selection with ``key_added=key``"
        )


def result_fields(key: str) -> dict[str, list[str]]:
    """Every field a fit or prediction with ``key_added=key`` may write, besides ``uns[key]``."""
    return {
        "obsm": [
            Key.obsm.predictions(key),
            Key.obsm.embedding(key),
            Key.obsm.lower(key),
            Key.obsm.upper(key),
        ],
        "obs": [Key.obs.fold(key), Key.obs.similarity(key), Key.obs.ood_pvalue(key), Key.obs.difficulty(key)],
        "var": [Key.var.predictability(key, column) for column in COLUMNS],
    }


#: The order fields are written in: ``uns`` (the record) last, so that it says the rest is there.
_ATTRIBUTES = ("obs", "var", "obsm", "layers", "uns")


def write_fields(
    adata: AnnData,
    *,
    X: Any = None,
    obs: Mapping[str, Any] | None = None,
    var: Mapping[str, Any] | None = None,
    obsm: Mapping[str, Any] | None = None,
    layers: Mapping[str, Any] | None = None,
    uns: Mapping[str, Any] | None = None,
    remove: Mapping[str, Iterable[str]] | None = None,
    start: float | None = None,
) -> None:
    """Write fields into ``adata`` and log each one: ``added``, ``updated`` (it was there) or ``removed``.

    Parameters
    ----------
    adata
        The AnnData written to.
    X
        A new ``X`` (None: unchanged).
    obs, var, obsm, layers, uns
        ``{key: value}`` of each attribute.
    remove
        ``{attribute: keys}`` deleted first where present and not written now (what an earlier call
        left that this one does not replace).
    start
        The start of the call (:func:`histo2expr._logging.info`): a ``finished (H:MM:SS)`` line follows.
    """
    written = {
        "obs": obs or {},
        "var": var or {},
        "obsm": obsm or {},
        "layers": layers or {},
        "uns": uns or {},
    }
    for attribute, names in (remove or {}).items():
        mapping = getattr(adata, attribute)
        for name in names:
            if name in mapping and name not in written[attribute]:
                del mapping[name]
                logg.info(f"    removed adata.{attribute}[{name!r}]")
    if X is not None:
        adata.X = X
        logg.info("    updated adata.X")
    for attribute in _ATTRIBUTES:
        mapping = getattr(adata, attribute)
        for name, value in written[attribute].items():
            verb = "updated" if name in mapping else "added"
            mapping[name] = value
            logg.info(f"    {verb} adata.{attribute}[{name!r}]")
    if start is not None:
        logg.info("    finished", time=start)
