"""What every plot shares: the fitted keys and their predictions, the spots of a slide, ``ax`` / ``show`` / ``save``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from .._records import SCALES, fit_record
from .._validation import log_expression, slide_labels
from ..get import predictions

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def as_keys(key: str | Sequence[str]) -> list[str]:
    """One key or a list of keys as a non-empty list of distinct strings."""
    keys = [key] if isinstance(key, str) else [str(k) for k in key]
    if not keys or len(set(keys)) != len(keys):
        msg = f"Give one key or a list of distinct keys (the `key_added` of each fit), got {key!r}."
        raise ValueError(msg)
    return keys


def protocol_of(adata: AnnData, key: str) -> str:
    """How the scores of ``key`` were made (``"leave_one_slide_out"``, ...), for titles; ``""`` when unknown."""
    record = fit_record(adata, key)
    return str(record.get("protocol") or record.get("params", {}).get("cv") or "")


def titled(title: str, protocols: Sequence[str]) -> str:
    """``title`` naming the evaluation protocol(s) behind it."""
    named = [p.replace("_", "-") for p in dict.fromkeys(protocols) if p]
    return f"{title} ({'; '.join(named)})" if named else title


def predicted_genes(record: Mapping[str, Any]) -> list[str]:
    """Every gene the key predicted: the rows of its PCC table (all folds), else the model's genes."""
    if "gene_pcc" in record:
        return [str(g) for g in record["gene_pcc"].index]
    return [str(g) for g in record["genes"]]


def check_genes(genes: str | Sequence[str], known: Sequence[str], key: str) -> list[str]:
    """``genes`` as a list, each one of the genes ``key`` predicted."""
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "`genes` is empty; give at least one gene."
        raise ValueError(msg)
    missing = [g for g in genes if g not in set(known)]
    if missing:
        msg = (
            f"{missing[:5]} {'is' if len(missing) == 1 else 'are'} not among the genes of {key!r} "
            f"({len(known)} genes, e.g. {list(known)[:5]}); choose genes the model predicts."
        )
        raise KeyError(msg)
    return genes


def pcc_table(adata: AnnData, key: str) -> pd.DataFrame:
    """Genes x held-out slides PCC table of ``key``, slide names as strings."""
    table = fit_record(adata, key, need=("gene_pcc",))["gene_pcc"]
    return table.rename(columns=str)


def choose_slides(available: Sequence[str], slides: str | Sequence[str] | None, what: str) -> list[str]:
    """``slides`` (default: all ``available``), each checked to be available."""
    if slides is None:
        return list(available)
    slides = [slides] if isinstance(slides, str) else [str(s) for s in slides]
    missing = [s for s in slides if s not in set(available)]
    if missing or not slides:
        msg = f"`slides` {missing or slides} not among the {what} {list(available)}; pass some of them."
        raise KeyError(msg)
    return slides


def slide_key_of(record: Mapping[str, Any]) -> str:
    """The ``slide_key`` the key was fitted with (``"slide"`` when not recorded)."""
    params = record.get("params", {})
    return str(params.get("slide_key") or "slide")


def slide_spots(
    adata: AnnData, record: Mapping[str, Any], slide: str | None, *, pooled: bool = True
) -> tuple[np.ndarray, str | None]:
    """Positions of the spots of ``slide`` and its name.

    ``slide=None`` means every spot (name None) when ``pooled``, else the only slide of ``adata``.
    """
    labels = slide_labels(adata, slide_key_of(record), required=False)
    names = list(dict.fromkeys(labels))
    if slide is None and pooled:
        return np.arange(adata.n_obs), None
    if slide is None and len(names) == 1:
        slide = names[0]
    if slide is None:
        msg = f"`adata` has {len(names)} slides {names}; pass `slide=` with the one to show."
        raise ValueError(msg)
    if str(slide) not in names:
        msg = f"`slide={slide!r}` is not a slide of `adata` (slides: {names}); pass one of them."
        raise KeyError(msg)
    return np.flatnonzero(labels == str(slide)), str(slide)


def prediction(adata: AnnData, key: str, genes: Sequence[str], spots: np.ndarray) -> np.ndarray:
    """``(len(spots), len(genes))`` predictions of ``key`` (through :func:`histo2expr.get.predictions`), NaN where none."""
    frame = predictions(adata, key)
    return frame.reindex(columns=list(genes)).to_numpy(dtype=np.float64)[spots]


def scale_of(adata: AnnData, key: str) -> str:
    """What the predicted values of ``key`` are (``uns[key]["scale"]``)."""
    return str(fit_record(adata, key).get("scale") or SCALES["training"])


def has_truth(adata: AnnData) -> bool:
    """Whether ``X`` holds measured log-normalised expression (not predictions of an H&E-only slide)."""
    return "log1p" in adata.uns


def truth(adata: AnnData, genes: Sequence[str], spots: np.ndarray) -> np.ndarray:
    """Measured log-normalised expression of ``genes`` on ``spots`` (clear error on H&E-only data)."""
    if not has_truth(adata):
        msg = (
            "This plot compares predictions with measured expression, but `adata` has none (no "
            "`uns['log1p']`: H&E-only predictions, or counts not normalised). Run `hx.pp.normalize(adata)` "
            "on data with counts, or plot the predictions alone with `hx.pl.spatial_expression`."
        )
        raise ValueError(msg)
    return log_expression(adata[spots], genes).astype(np.float64)


def unpredicted(values: np.ndarray) -> np.ndarray:
    """Columns (genes) without a prediction on some spot (their fold did not choose them)."""
    return ~np.isfinite(values).all(axis=0)


#: One Axes, or the list of Axes of a plot of several panels.
AxesOrList = TypeVar("AxesOrList", "Axes", "list[Axes]")


def axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """``ax``, or the axes of a new figure of ``figsize`` inches."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, layout="constrained")[1]


def figure_path(name: str, save: bool | str) -> Path:
    """Where ``save`` puts the figure of plot ``name``: scanpy's ``figdir``, file name and format rules."""
    from scanpy import settings  # figdir, file_format_figs and plot_suffix, shared with scanpy and squidpy

    if isinstance(save, bool) or not isinstance(save, str):
        if save is not True:
            msg = f"`save` must be True, False, None or a string to append to the file name, got {save!r}."
            raise TypeError(msg)
        save = ""
    extension = str(settings.file_format_figs)
    for candidate in ("svg", "pdf", "png"):
        if save.endswith(f".{candidate}"):
            extension, save = candidate, save.removesuffix(f".{candidate}")
            break
    folder = Path(settings.figdir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}{save}{settings.plot_suffix}.{extension}"


def finish(
    axes: AxesOrList,
    *,
    name: str,
    show: bool | None,
    save: bool | str | None,
    return_fig: bool,
    ax_given: bool,
) -> AxesOrList | Figure | None:
    """Save and show the figure of plot ``name`` as scanpy does, and return what the caller asked for.

    The figure is saved when ``save`` is set, shown when ``show`` is (by default when the plot made
    its own figure and no Figure is to be returned; a figure the plot made is closed once shown); the
    Figure is returned with ``return_fig``, else the Axes unless shown.
    """
    import matplotlib.pyplot as plt

    fig: Figure = (axes[0] if isinstance(axes, list) else axes).figure  # type: ignore[assignment]
    if save is not None and save is not False:  # a string, even empty, saves (as scanpy)
        fig.savefig(figure_path(name, save), bbox_inches="tight")
    if show is None:
        show = not ax_given and not return_fig
    if show:
        plt.show()
        if not ax_given:
            plt.close(fig)
    if return_fig:
        return fig
    return None if show else axes


def key_colours(n: int) -> list:
    """One distinct colour per key (matplotlib's tab10 cycle)."""
    import matplotlib as mpl

    cycle = mpl.colormaps["tab10"]
    return [cycle(i % cycle.N) for i in range(n)]
