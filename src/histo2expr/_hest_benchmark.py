"""The HEST-Benchmark protocol (``histo2expr benchmark --protocol hest``): its targets, genes, folds and score.

As HEST-Benchmark's code runs it (``hest.bench.benchmark``, ``trainer.train_test_reg`` and
``hest.utils.get_k_genes``):

- targets: ``log1p`` of the raw counts, without depth normalisation (``st_dataset.normalize_adata``);
- genes: the 50 highly variable genes of the task, chosen once on **all** its samples, held-out
  ones included: genes detected in at least 10 % of the spots of every sample, without names
  containing ``BLANK`` or ``Control``, counts of all samples stacked, ``log1p``, then scanpy's
  ``highly_variable_genes(n_top_genes=50)`` (Seurat flavour), in alphabetical order;
- folds: one patient held out at a time (patients grouped by data set and patient);
- probe: :class:`~histo2expr.models.HESTProbeMethod` (``"hest_ridge"``);
- score: per fold, the Pearson correlation of each gene over all held-out spots of the fold pooled,
  averaged over genes; then the mean (and standard deviation) over folds;
- patches: 224 px at 0.5 µm per pixel (112 µm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._keys import Key, write_fields
from .metrics import gene_pcc

if TYPE_CHECKING:
    from anndata import AnnData

#: Benchmark protocols of ``histo2expr benchmark --protocol``.
PROTOCOLS = ("histo2expr", "hest")
#: HEST-Benchmark's number of genes, patch side and pixel size.
HEST_GENES = 50
HEST_PATCH_SIZE = 224
HEST_MPP = 0.5
#: Fraction of spots of every sample a gene must be detected in (HEST's ``min_cells_pct``).
_MIN_SPOT_FRACTION = 0.10


def _counts(adata: AnnData, counts_layer: str) -> sp.csr_matrix:
    from ._validation import check_counts

    counts = adata.layers[counts_layer] if counts_layer in adata.layers else adata.X
    check_counts(
        counts, where=f"`adata.layers[{counts_layer!r}]`" if counts_layer in adata.layers else "`adata.X`"
    )
    return sp.csr_matrix(counts, dtype=np.float32)


def hest_log_expression(adata: AnnData, *, counts_layer: str = Key.layers.counts) -> None:
    """Make ``X`` HEST-Benchmark's targets: ``log1p`` of the raw counts, without depth normalisation.

    Sets ``.layers[counts_layer]`` (the raw counts), ``.X`` (``log1p(counts)``, float32 CSR) and
    ``.uns["log1p"]`` (``{"base": None}``, scanpy's mark of logged data).
    """
    counts = _counts(adata, counts_layer)
    write_fields(adata, X=counts.log1p(), layers={counts_layer: counts}, uns={Key.uns.log1p: {"base": None}})


def hest_genes(
    adata: AnnData,
    n_top: int = HEST_GENES,
    *,
    slide_key: str = "slide",
    counts_layer: str = Key.layers.counts,
) -> list[str]:
    """HEST-Benchmark's genes of a task: the ``n_top`` highly variable genes over all its samples.

    Parameters
    ----------
    adata
        Spots of every sample of the task, raw counts in ``layers[counts_layer]`` (else ``X``).
    n_top
        Genes to choose (HEST: 50).
    slide_key
        Column of ``obs`` with the sample of each spot.
    counts_layer
        Layer with the raw counts.

    Returns
    -------
    The genes, in alphabetical order (HEST keeps the highly variable ones in that order).
    """
    import scanpy as sc
    from anndata import AnnData as _AnnData

    from ._validation import check_obs_key

    counts = _counts(adata, counts_layer)
    slides = check_obs_key(adata, slide_key).to_numpy()
    detected = np.ones(adata.n_vars, dtype=bool)
    for slide in pd.unique(slides):
        rows = counts[slides == slide]
        spots_with_gene = np.asarray((rows > 0).sum(axis=0)).ravel()
        detected &= spots_with_gene >= np.ceil(_MIN_SPOT_FRACTION * rows.shape[0])
    names = adata.var_names.to_numpy().astype(str)
    controls = np.array(["BLANK" in name or "Control" in name for name in names], dtype=bool)
    keep = detected & ~controls
    order = np.flatnonzero(keep)[np.argsort(names[keep], kind="stable")]
    if len(order) < n_top:
        msg = (
            f"Only {len(order)} genes are detected in at least {_MIN_SPOT_FRACTION:.0%} of the spots of every sample "
            f"(HEST's rule); {n_top} were asked. Lower `genes`, or drop the sample with the fewest genes."
        )
        raise ValueError(msg)
    stacked = _AnnData(counts[:, order].astype(np.float32))
    stacked.var_names = names[order]
    sc.pp.log1p(stacked)
    sc.pp.highly_variable_genes(stacked, n_top_genes=n_top)
    return list(stacked.var_names[stacked.var["highly_variable"].to_numpy()][:n_top])


def hest_fold_pearson(adata: AnnData, key: str, genes: list[str]) -> pd.DataFrame:
    """HEST-Benchmark's score of the cross-validated predictions of ``fit_histo2expr(..., key_added=key)``.

    Returns
    -------
    One row per fold: ``fold``, ``n_spots``, ``pearson_mean`` (per-gene Pearson over all held-out
    spots of the fold pooled, averaged over the genes that are not constant) and ``n_nan_genes``.
    """
    from .get import predictions as stored_predictions

    columns = adata.var_names.get_indexer(genes)
    predictions = stored_predictions(adata, key)[list(genes)].to_numpy()
    truth = adata.X[:, columns]
    truth = truth.toarray() if sp.issparse(truth) else np.asarray(truth)
    folds = adata.obs[Key.obs.fold(key)]
    rows = []
    for fold in folds.cat.categories:
        held_out = np.flatnonzero(folds.to_numpy() == fold)
        pcc = gene_pcc(truth[held_out], predictions[held_out])
        rows.append(
            {
                "fold": str(fold),
                "n_spots": len(held_out),
                "pearson_mean": float(np.nanmean(pcc)) if np.isfinite(pcc).any() else np.nan,
                "n_nan_genes": int(np.isnan(pcc).sum()),
            }
        )
    return pd.DataFrame(rows)
