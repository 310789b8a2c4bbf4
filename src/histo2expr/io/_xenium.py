"""Read a 10x Genomics Xenium run with its post-run H&E: transcripts pooled into pseudo-spots on the H&E.

Xenium measures single transcripts in micrometres of its own frame; the H&E stained after the run
is registered to that frame by a 3 x 3 alignment matrix (Xenium Explorer's "Image alignment" export,
``*_he_imagealignment.csv``), which maps H&E pixels to Xenium morphology-image pixels
(``pixel_size`` µm each, from ``experiment.xenium``). Each transcript is placed on the H&E by the
inverse of that matrix and counted in the pseudo-spot whose circle contains it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import check_microns_per_pixel, non_negative_number
from ._slides import spatial_entry, spot_table
from ._wsi import slide_thumbnail
from ._wsi_image import open_slide_image

#: Prefixes of Xenium's control features (not genes), for runs whose transcripts lack ``is_gene``.
CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_",
    "antisense_",
)
#: Transcripts whose H&E position falls outside the image, above this fraction, mean a wrong alignment.
_MAX_OUTSIDE = 0.5
_COLUMNS = ("x_location", "y_location", "feature_name", "qv")
#: Relative difference tolerated between the H&E pixel size of its file and of the alignment.
_SCALE_TOLERANCE = 0.1


def _alignment(alignment: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(alignment, str | Path):
        path = Path(alignment)
        if not path.is_file():
            msg = f"Alignment file {path} does not exist; export it from Xenium Explorer (Image alignment)."
            raise FileNotFoundError(msg)
        matrix = pd.read_csv(path, header=None).to_numpy(dtype=float)
        where = str(path)
    else:
        matrix, where = np.asarray(alignment, dtype=float), "`alignment`"
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        msg = (
            f"{where} must be a finite 3 x 3 matrix (H&E pixels to Xenium pixels), got shape {matrix.shape}."
        )
        raise ValueError(msg)
    if not np.allclose(matrix[2], [0, 0, 1]):
        msg = f"{where} is not an affine transformation: its last row is {matrix[2].tolist()}, not [0, 0, 1]."
        raise ValueError(msg)
    if abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        msg = f"{where} cannot be inverted (its 2 x 2 part has determinant 0); export the alignment again."
        raise ValueError(msg)
    return matrix


def _xenium_pixel_size(path: Path) -> float:
    specs = path / "experiment.xenium"
    if not specs.is_file():
        msg = f"{specs} is missing; pass the Xenium output folder (with experiment.xenium and transcripts.parquet)."
        raise FileNotFoundError(msg)
    value = json.loads(specs.read_text()).get("pixel_size")
    return check_microns_per_pixel(
        value,
        where=f"{specs} field 'pixel_size'",
        fix="It is 0.2125 for the Xenium Analyzer; correct the file.",
    )


def _check_he_scale(path: Path, he_mpp: float) -> None:
    """Refuse an alignment whose scale contradicts the pixel size the H&E file records (when it records one)."""
    from ._wsi import _file_mpp

    recorded, fields = _file_mpp(path)
    if recorded is None:
        return
    file_mpp = float(np.mean(recorded))
    if abs(file_mpp / he_mpp - 1) > _SCALE_TOLERANCE:
        msg = (
            f"The alignment matrix implies {he_mpp:.4g} µm per H&E pixel, but {path.name} records {file_mpp:.4g} µm "
            f"({fields}). Pass the matrix that maps this image's pixels to Xenium pixels (Xenium Explorer's export), "
            "not its inverse or another image's."
        )
        raise ValueError(msg)


def _gene_mask(batch: pd.DataFrame) -> np.ndarray:
    if "is_gene" in batch:
        return batch["is_gene"].to_numpy(dtype=bool)
    return ~batch["feature_name"].str.startswith(CONTROL_PREFIXES).to_numpy(dtype=bool)


def _pool(
    transcripts: Path,
    to_he: np.ndarray,
    *,
    xenium_mpp: float,
    pitch: float,
    radius: float,
    grid: tuple[int, int],
    size: tuple[int, int],
    min_qv: float,
) -> tuple[sparse.csr_matrix, list[str], int, int]:
    """Counts (grid pseudo-spots x genes), gene names, transcripts kept by quality, transcripts off the image."""
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(transcripts)
    names = set(handle.schema_arrow.names)
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        msg = f"{transcripts} lacks the columns {missing} of Xenium transcripts."
        raise KeyError(msg)
    columns = [*_COLUMNS, *(["is_gene"] if "is_gene" in names else [])]
    genes: dict[str, int] = {}
    pieces, kept, outside, seen = [], 0, 0, 0
    n_cols, n_rows = grid
    for record_batch in handle.iter_batches(columns=columns, batch_size=1_000_000):
        batch = record_batch.to_pandas()
        if (
            batch["feature_name"].dtype == object
            and len(batch)
            and isinstance(batch["feature_name"].iloc[0], bytes)
        ):
            batch["feature_name"] = batch["feature_name"].str.decode("utf-8")
        batch = batch[(batch["qv"].to_numpy() >= min_qv) & _gene_mask(batch)]
        xenium_px = batch[["x_location", "y_location"]].to_numpy(dtype=float) / xenium_mpp
        he = xenium_px @ to_he[:2, :2].T + to_he[:2, 2]
        col, row = np.floor(he[:, 0] / pitch).astype(np.int64), np.floor(he[:, 1] / pitch).astype(np.int64)
        in_grid = (col >= 0) & (col < n_cols) & (row >= 0) & (row < n_rows)
        on_image = (he[:, 0] >= 0) & (he[:, 1] >= 0) & (he[:, 0] < size[1]) & (he[:, 1] < size[0])
        outside += int((~on_image).sum())
        centre = (np.column_stack([col, row]) + 0.5) * pitch
        in_spot = in_grid & (((he - centre) ** 2).sum(axis=1) <= radius**2)
        codes = pd.Categorical(batch["feature_name"].to_numpy()[in_spot])
        for name in codes.categories:
            genes.setdefault(str(name), len(genes))
        gene_index = np.asarray([genes[str(c)] for c in codes.categories], dtype=np.int64)[codes.codes]
        spot_index = row[in_spot] * n_cols + col[in_spot]
        pieces.append((spot_index, gene_index))
        kept += int(in_spot.sum())
        seen += len(batch)
    spots = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
    gene_ids = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
    counts = sparse.coo_matrix(
        (np.ones(len(spots), dtype=np.float32), (spots, gene_ids)), shape=(n_cols * n_rows, len(genes))
    ).tocsr()
    counts.sum_duplicates()
    return counts, list(genes), seen, outside


def read_xenium_he(
    path: str | Path,
    he_image: str | Path,
    alignment: str | Path | np.ndarray,
    *,
    spot_diameter_um: float = 55.0,
    spot_spacing_um: float | None = None,
    min_qv: float = 20.0,
    min_transcripts: int = 1,
    slide: str | None = None,
    patient: str | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read a Xenium run with its post-run H&E as pseudo-spots: transcripts pooled in circles on the H&E.

    Pseudo-spots are circles of ``spot_diameter_um`` centred on a square grid of pitch
    ``spot_spacing_um`` over the H&E; each counts the transcripts (quality ``qv >= min_qv``, genes
    only: control probes and codewords are dropped) whose aligned H&E position lies in it; the grid
    covers whole pseudo-spots of the image (a margin narrower than the spacing is left out). The
    H&E is read lazily (any format of :func:`~histo2expr.io.read_wsi`); its pixel size follows from
    the alignment, Xenium's ``pixel_size`` times the scale of the matrix, and must agree with the
    pixel size the H&E file records, when it records one.

    Parameters
    ----------
    path
        Xenium output folder with ``transcripts.parquet`` and ``experiment.xenium``.
    he_image
        The H&E stained after the run (e.g. the OME-TIFF aligned in Xenium Explorer).
    alignment
        The 3 x 3 affine matrix mapping H&E pixels (x, y, 1) to Xenium pixels, as Xenium Explorer
        exports it (a CSV of three rows, no header), or the matrix itself.
    spot_diameter_um
        Pseudo-spot diameter; 55 µm mimics Visium.
    spot_spacing_um
        Distance between pseudo-spot centres; default ``spot_diameter_um`` (touching circles). Must
        be at least the diameter (pseudo-spots do not overlap).
    min_qv
        Lowest transcript quality kept (Xenium's own matrices use 20).
    min_transcripts
        Pseudo-spots with fewer transcripts are dropped (the grid also covers glass).
    slide, patient
        Ids; default the name of ``path`` (and the slide id for the patient).
    hires_max_px
        Largest side of the stored ``"hires"`` image.

    Returns
    -------
    AnnData with one row per pseudo-spot kept (``obs_names`` ``"{slide}_r{row}_c{col}"``):

    ``X``
        Transcript counts, float32 CSR.
    ``obs['slide']``, ``obs['patient']``, ``obs['array_row']``, ``obs['array_col']``, ``obs['n_transcripts']``
        Ids, the grid position and the number of transcripts.
    ``obsm['spatial']``
        Pseudo-spot centres (x, y) in H&E pixels.
    ``uns['spatial'][slide]``
        ``images['hires']``, ``scalefactors`` (``microns_per_pixel`` of the H&E,
        ``spot_diameter_fullres``, ``spot_spacing_fullres``) and ``metadata``
        (``source_image_path``, ``alignment``, ``xenium_pixel_size``, ``min_qv``).
    """
    path = Path(path)
    transcripts = path / "transcripts.parquet"
    if not transcripts.is_file():
        msg = f"{transcripts} is missing; pass the Xenium output folder (with transcripts.parquet)."
        raise FileNotFoundError(msg)
    xenium_mpp = _xenium_pixel_size(path)
    matrix = _alignment(alignment)
    he_mpp = check_microns_per_pixel(
        xenium_mpp * np.sqrt(abs(np.linalg.det(matrix[:2, :2]))),
        where="the H&E implied by the alignment matrix",
        fix="Check that the matrix maps H&E pixels to Xenium pixels (Xenium Explorer's export), not the reverse.",
    )
    diameter = non_negative_number(spot_diameter_um, "spot_diameter_um", positive=True)
    spacing = diameter if spot_spacing_um is None else non_negative_number(spot_spacing_um, "spot_spacing_um")
    if spacing < diameter:
        msg = f"`spot_spacing_um` ({spacing}) must be at least `spot_diameter_um` ({diameter}): pseudo-spots do not overlap."
        raise ValueError(msg)
    image = open_slide_image(he_image)
    height, width = image.shape
    _check_he_scale(Path(he_image), he_mpp)
    pitch, radius = spacing / he_mpp, diameter / 2 / he_mpp
    grid = (int(width // pitch), int(height // pitch))
    if min(grid) < 1:
        msg = (
            f"The H&E ({width} x {height} px at {he_mpp:.3g} µm) is smaller than one pseudo-spot of {spacing} µm; "
            "check that `alignment` maps H&E pixels to Xenium pixels (Xenium Explorer's export), not the reverse."
        )
        raise ValueError(msg)
    counts, genes, total, outside = _pool(
        transcripts,
        np.linalg.inv(matrix),
        xenium_mpp=xenium_mpp,
        pitch=pitch,
        radius=radius,
        grid=grid,
        size=(height, width),
        min_qv=min_qv,
    )
    if total == 0 or outside > _MAX_OUTSIDE * total:
        msg = (
            f"{outside} of {total} transcripts fall outside the H&E {Path(he_image).name} ({width} x {height} px) "
            "once aligned: the image and the transcripts do not overlap. Check that `alignment` maps H&E pixels to "
            "Xenium pixels (Xenium Explorer's export; not its inverse), that it belongs to this image, and that "
            "experiment.xenium's pixel_size is the run's."
        )
        raise ValueError(msg)
    if outside:
        warnings.warn(
            f"{outside} of {total} transcripts ({outside / total:.1%}) fall outside the H&E and are not counted.",
            UserWarning,
            stacklevel=2,
        )
    n_transcripts = np.asarray(counts.sum(axis=1)).ravel()
    keep = np.flatnonzero(n_transcripts >= max(int(min_transcripts), 1))
    if len(keep) == 0:
        msg = f"No pseudo-spot holds {min_transcripts} transcript(s); lower `min_transcripts` or `min_qv`."
        raise ValueError(msg)
    row, col = np.divmod(keep, grid[0])
    slide = str(slide) if slide is not None else path.name
    hires, hires_scalef = slide_thumbnail(image, max_px=hires_max_px)
    entry = spatial_entry(
        hires,
        hires_scalef=hires_scalef,
        microns_per_pixel=he_mpp,
        microns_per_pixel_source="Xenium pixel_size and alignment matrix",
        spot_diameter_fullres=2 * radius,
        spot_spacing_fullres=pitch,
        source_image_path=he_image,
        source_image_level=0,
    )
    entry["metadata"].update(
        alignment=matrix.tolist(), xenium_pixel_size=xenium_mpp, min_qv=float(min_qv), pseudo_spots="xenium"
    )
    obs = pd.DataFrame(
        {"array_row": row, "array_col": col, "n_transcripts": n_transcripts[keep].astype(np.int64)},
        index=[f"r{r}_c{c}" for r, c in zip(row, col, strict=True)],
    )
    return spot_table(
        counts[keep],
        var=pd.DataFrame(index=genes),
        obs=obs,
        slide=slide,
        patient=str(patient if patient is not None else slide),
        coords=(np.column_stack([col, row]) + 0.5) * pitch,
        entry=entry,
        source=transcripts,
    )
