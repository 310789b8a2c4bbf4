"""Preprocessing: normalisation, leak-free gene selection, pseudo-spots on H&E-only slides."""

from ._genes import select_genes
from ._normalize import normalize
from ._tile import tile_slide

__all__ = ["normalize", "select_genes", "tile_slide"]
