"""The files of a Space Ranger ``outs`` folder, in every layout Space Ranger has written.

- counts: ``filtered_feature_bc_matrix.h5`` (10x HDF5) or the ``filtered_feature_bc_matrix/``
  folder (Matrix Market: ``matrix.mtx.gz``, ``features.tsv.gz`` or ``genes.tsv``, ``barcodes.tsv.gz``),
  both read with scanpy;
- spot positions: ``spatial/tissue_positions_list.csv`` (Space Ranger 1, no header) or
  ``spatial/tissue_positions.csv`` (Space Ranger 2 and later, with a header);
- ``spatial/scalefactors_json.json``, ``spatial/tissue_hires_image.png`` and ``tissue_lowres_image.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

#: Position files: Space Ranger 2+ (with a header), Space Ranger 1 (without).
POSITIONS_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def positions_file(spatial: Path) -> Path | None:
    """The tissue positions file of a ``spatial/`` folder, the newer name first."""
    return next((spatial / name for name in POSITIONS_FILES if (spatial / name).is_file()), None)


def counts_present(path: Path) -> bool:
    """Whether ``path`` is a 10x HDF5 file or a Matrix Market folder of counts."""
    if path.is_dir():
        return (path / "matrix.mtx.gz").is_file() or (path / "matrix.mtx").is_file()
    return path.is_file()


def read_counts(path: Path) -> AnnData:
    """Spots x genes raw counts of a 10x HDF5 file or a Matrix Market folder (gene symbols as names, kept as they are)."""
    import scanpy as sc

    if path.is_dir():
        return sc.read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
    return sc.read_10x_h5(path)


def read_positions(path: Path) -> pd.DataFrame:
    """Tissue positions indexed by barcode, with or without the header row of Space Ranger 2+."""
    with path.open() as handle:
        has_header = handle.readline().split(",")[0].strip().lower() == "barcode"
    positions = pd.read_csv(path, header=0 if has_header else None, index_col=0)
    if positions.shape[1] != len(_POSITION_COLUMNS):
        msg = (
            f"{path} has {positions.shape[1] + 1} columns; a Space Ranger positions file has 6 (barcode, "
            "in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres)."
        )
        raise ValueError(msg)
    positions.columns = _POSITION_COLUMNS
    positions.index = positions.index.astype(str)
    return positions


def read_space_ranger(path: Path, counts: Path, positions: Path, *, library_id: str) -> AnnData:
    """Counts, positions, scale factors and images of one Space Ranger ``outs`` folder.

    Returns
    -------
    AnnData (barcodes as ``obs_names``) with ``obs['in_tissue' | 'array_row' | 'array_col']``,
    ``obsm['spatial']`` (x, y in full-resolution pixels; NaN for barcodes without a position) and
    ``uns['spatial'][library_id]`` with ``images`` (``hires``, ``lowres``), ``scalefactors`` and
    ``metadata``.
    """
    from PIL import Image

    adata = read_counts(counts)
    adata.obs_names = adata.obs_names.astype(str)
    placed = read_positions(positions).reindex(adata.obs_names)
    adata.obs = adata.obs.join(placed[["in_tissue", "array_row", "array_col"]])
    adata.obsm["spatial"] = placed[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    spatial = path / "spatial"
    images = {}
    for name in ("hires", "lowres"):
        with Image.open(spatial / f"tissue_{name}_image.png") as image:
            images[name] = np.asarray(image)
    scalefactors = json.loads((spatial / "scalefactors_json.json").read_text())
    metadata = {key: value for key, value in _h5_attributes(counts).items() if key in _KEPT_ATTRIBUTES}
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": scalefactors, "metadata": metadata}
    }
    return adata


_KEPT_ATTRIBUTES = ("chemistry_description", "software_version")


def _h5_attributes(counts: Path) -> dict[str, str]:
    """The HDF5 attributes of a 10x count file as strings (none for a Matrix Market folder)."""
    if counts.is_dir():
        return {}
    import h5py

    with h5py.File(counts, "r") as handle:
        return {
            key: value.decode() if isinstance(value, bytes) else str(value)
            for key, value in handle.attrs.items()
            if np.ndim(value) == 0
        }


def library_id_of(counts: Path) -> str | None:
    """The first library id recorded in a 10x HDF5 count file (None for a Matrix Market folder)."""
    if counts.is_dir():
        return None
    import h5py

    with h5py.File(counts, "r") as handle:
        ids = handle.attrs.get("library_ids")
    if ids is None or len(ids) == 0:
        return None
    first = ids[0]
    return first.decode() if isinstance(first, bytes) else str(first)
