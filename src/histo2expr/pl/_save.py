"""Write the figures of a cross-validation run to PNG files (for the command line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ._compare import compare_methods
from ._pcc import gene_pcc_boxplot, heg_curve
from ._utils import as_keys

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure


def save_run_figures(
    adata: AnnData,
    key: str | Sequence[str],
    out_dir: str | Path,
    *,
    ks: Sequence[int] | None = None,
    dpi: int = 150,
) -> list[Path]:
    """Save the figures of cross-validated fits as PNG files.

    Writes ``gene_pcc_boxplot.png`` (:func:`gene_pcc_boxplot`), ``heg_curve.png``
    (:func:`heg_curve`) and, for several keys, ``compare_methods.png``
    (:func:`compare_methods` of PCC(ACG)), replacing files of those names.

    Parameters
    ----------
    adata
        AnnData cross-validated with :func:`~histo2expr.tl.fit_histo2expr` once per key.
    key
        The ``key_added`` of every fit (a method name each in ``histo2expr demo``).
    out_dir
        Folder of the files; made when missing.
    ks
        The K of the HEG curve (default: 50, 100, 150, 200, up to the number of genes predicted).
    dpi
        Resolution of the PNG files.

    Returns
    -------
    The paths of the files written, in the order above.
    """
    import matplotlib.pyplot as plt

    keys = as_keys(key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "gene_pcc_boxplot": lambda: gene_pcc_boxplot(adata, key=keys, return_fig=True),
        "heg_curve": lambda: heg_curve(adata, key=keys, ks=ks, return_fig=True),
    }
    if len(keys) > 1:
        plots["compare_methods"] = lambda: compare_methods(adata, key=keys, return_fig=True)
    paths = []
    for name, plot in plots.items():
        figure = cast("Figure", plot())  # return_fig=True
        try:
            path = out_dir / f"{name}.png"
            figure.savefig(path, dpi=dpi)
            paths.append(path)
        finally:
            plt.close(figure)
    return paths
