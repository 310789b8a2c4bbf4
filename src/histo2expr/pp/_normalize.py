"""Library-size normalisation and log transform, keeping the raw counts."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .. import _logging as logg
from .._keys import Key, write_fields
from .._validation import check_counts, check_not_empty, non_negative_number


def normalize(
    adata: AnnData,
    *,
    target_sum: float = 1e4,
    counts_layer: str = Key.layers.counts,
    copy: bool = False,
) -> AnnData | None:
    """Normalise every spot to ``target_sum`` counts and take ``log1p``.

    Normalisation is per spot, so it uses nothing of other slides and is leak-free.
    Running it twice is safe: when ``layers[counts_layer]`` exists, ``X`` is rebuilt
    from it.

    Parameters
    ----------
    adata
        Spots x genes with raw counts (whole numbers) in ``X`` (or already in ``layers[counts_layer]``);
        anything else — log-normalised or scaled values, counts with fractions — is refused, so that
        data are never logged twice.
    target_sum
        Counts per spot after scaling (10,000 by default, as in scanpy tutorials).
    counts_layer
        Layer that keeps the raw counts.
    copy
        Return a normalised copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Sets the following fields:

    ``.layers[counts_layer]``
        The raw counts.
    ``.X``
        ``log1p(counts / total * target_sum)``, float32.
    ``.uns["log1p"]``
        ``{"base": None}`` as scanpy writes it, so scanpy knows the data is logged.
    ``.obs["total_counts"]``
        Counts per spot.
    """
    target_sum = non_negative_number(target_sum, "target_sum", positive=True)
    check_not_empty(adata, what="normalisation")
    adata = adata.copy() if copy else adata
    if counts_layer not in adata.layers and Key.uns.log1p in adata.uns:
        msg = (
            f"`adata.X` is already log-normalised (`uns['log1p']` is set) and `layers[{counts_layer!r}]` with the "
            "raw counts is gone, so normalising again would log it twice. Use the data as they are, or put the "
            f"raw counts back into `layers[{counts_layer!r}]` (or pass `counts_layer=` naming the layer with them)."
        )
        raise ValueError(msg)
    start = logg.info(f"normalizing counts per spot to {target_sum:g}, then log1p")
    counts = adata.layers[counts_layer] if counts_layer in adata.layers else adata.X
    where = f"`adata.layers[{counts_layer!r}]`" if counts_layer in adata.layers else "`adata.X`"
    check_counts(counts, where=where)
    counts = (
        sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else np.asarray(counts, np.float32)
    )
    totals = np.asarray(counts.sum(axis=1)).ravel()
    empty = int((totals == 0).sum())
    if empty:
        msg = (
            f"{empty} spots have no counts at all; their expression cannot be normalised. "
            "Remove them first, e.g. `adata = adata[adata.X.sum(axis=1).A1 > 0].copy()`."
        )
        raise ValueError(msg)
    scale = (target_sum / totals).astype(np.float32)
    if sp.issparse(counts):
        logged = sp.diags(scale) @ counts
        logged.data = np.log1p(logged.data)
        logged = sp.csr_matrix(logged, dtype=np.float32)
    else:
        logged = np.log1p(counts * scale[:, None]).astype(np.float32)
    write_fields(
        adata,
        X=logged,
        layers={counts_layer: counts},
        obs={Key.obs.total_counts: totals},
        uns={Key.uns.log1p: {"base": None}},
        start=start,
    )
    return adata if copy else None
