"""Read what :mod:`histo2expr.tl` wrote: stored predictions, and an AnnData of them for scanpy (as ``scanpy.get``)."""

from ..tl._predictions import predicted_adata, predictions

__all__ = ["predicted_adata", "predictions"]
