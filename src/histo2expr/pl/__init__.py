"""Plots of what :mod:`histo2expr.tl` wrote into the AnnData (matplotlib, scanpy conventions)."""

from ._compare import compare_methods
from ._corr import gene_corr_heatmap
from ._pcc import gene_pcc_boxplot, heg_curve
from ._save import save_run_figures
from ._spatial import spatial_expression
from ._trust import gene_predictability, interval_coverage, spatial_uncertainty

__all__ = [
    "compare_methods",
    "gene_corr_heatmap",
    "gene_pcc_boxplot",
    "gene_predictability",
    "heg_curve",
    "interval_coverage",
    "save_run_figures",
    "spatial_expression",
    "spatial_uncertainty",
]
