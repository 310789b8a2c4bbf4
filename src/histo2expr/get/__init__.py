"""Read what :mod:`histo2expr.tl` wrote: stored predictions, and an AnnData of them for scanpy (as ``scanpy.get``)."""

from ._predictions import intervals, predicted_adata, predictions

__all__ = ["intervals", "predicted_adata", "predictions"]
