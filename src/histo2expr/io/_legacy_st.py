"""Read legacy Spatial Transcriptomics (1k spot array) data: the her2st and STUtility layouts."""

from __future__ import annotations

import gzip
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from histo2expr._validation import MPP_FIX, check_counts, check_microns_per_pixel, check_slide_id, one_of
from histo2expr.io._image import read_image_size
from histo2expr.io._slides import check_spots_inside, downscale_image, spatial_entry

logger = logging.getLogger(__name__)

#: Legacy ST arrays: spots of 100 µm diameter, 200 µm centre to centre.
SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0

HER2ST_LAYOUT = (
    "the her2st layout: data/ST-cnts/{S}.tsv.gz (counts), data/ST-spotfiles/{S}_selection.tsv (spots) "
    "and data/ST-imgs/{patient}/{S}/*.jpg (image)"
)
STUTILITY_LAYOUT = (
    "the STUtility layout: {S}.tsv or {S}.tsv.gz (counts), alignment_table_{S}.tsv (spots) and {S}.jpg "
    "(image) side by side in one folder"
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_SPOT_ID = re.compile(r"^\d+(\.\d+)?x\d+(\.\d+)?$")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


@dataclass(frozen=True)
class _Section:
    """The files of one section; a missing file is None, with the pattern it was looked for under."""

    slide: str
    patient: str
    counts: Path | None
    spots: Path | None
    image: Path | None
    expected: dict[str, str]

    @property
    def missing(self) -> list[str]:
        return [
            f"{what} ({self.expected[what]})"
            for what in ("counts", "spots", "image")
            if getattr(self, what) is None
        ]

    def complete(self) -> _SectionFiles | None:
        """The section's files, or None when one is missing."""
        if self.counts is None or self.spots is None or self.image is None:
            return None
        return _SectionFiles(self.slide, self.patient, self.counts, self.spots, self.image)


@dataclass(frozen=True)
class _SectionFiles:
    """The files of a section that has them all."""

    slide: str
    patient: str
    counts: Path
    spots: Path
    image: Path


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".tsv")


def _her2st_sections(data: Path) -> list[_Section]:
    counts = {_stem(p): p for p in (data / "ST-cnts").glob("*.tsv*") if p.name.endswith((".tsv", ".tsv.gz"))}
    spots = {
        p.name.removesuffix("_selection.tsv"): p for p in (data / "ST-spotfiles").glob("*_selection.tsv")
    }
    sections = []
    for slide in sorted(set(counts) | set(spots)):
        images = sorted(
            p for p in (data / "ST-imgs").glob(f"*/{slide}/*") if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if len(images) > 1:
            msg = (
                f"Section {slide!r} has {len(images)} images ({[str(p) for p in images]}); the her2st layout "
                f"expects one image in data/ST-imgs/{{patient}}/{slide}/. Move the others away."
            )
            raise ValueError(msg)
        image = images[0] if images else None
        expected = {
            "counts": str(data / "ST-cnts" / f"{slide}.tsv.gz"),
            "spots": str(data / "ST-spotfiles" / f"{slide}_selection.tsv"),
            "image": str(data / "ST-imgs" / "{patient}" / slide / "*.jpg"),
        }
        patient = image.parent.parent.name if image is not None else slide
        sections.append(_Section(slide, patient, counts.get(slide), spots.get(slide), image, expected))
    return sections


def _stutility_sections(folder: Path) -> list[_Section]:
    spots = {
        p.name.removeprefix("alignment_table_").removesuffix(".tsv"): p
        for p in folder.glob("alignment_table_*.tsv")
    }
    counts = {
        _stem(p): p
        for p in folder.glob("*.tsv*")
        if p.name.endswith((".tsv", ".tsv.gz")) and not p.name.startswith("alignment_table_")
    }
    sections = []
    for slide in sorted(set(counts) | set(spots)):
        images = [folder / f"{slide}{suffix}" for suffix in _IMAGE_SUFFIXES]
        image = next((p for p in images if p.is_file()), None)
        expected = {
            "counts": str(folder / f"{slide}.tsv"),
            "spots": str(folder / f"alignment_table_{slide}.tsv"),
            "image": str(folder / f"{slide}.jpg"),
        }
        sections.append(_Section(slide, slide, counts.get(slide), spots.get(slide), image, expected))
    return sections


def _find_sections(path: Path) -> tuple[str, list[_Section]]:
    """Detect the layout of ``path`` and list its sections."""
    if not path.exists():
        msg = f"{path} does not exist; pass the folder of a legacy ST dataset ({HER2ST_LAYOUT}; or {STUTILITY_LAYOUT})."
        raise FileNotFoundError(msg)
    if not path.is_dir():
        msg = f"{path} is a file; pass the folder of a legacy ST dataset ({HER2ST_LAYOUT}; or {STUTILITY_LAYOUT})."
        raise NotADirectoryError(msg)
    for data in (path / "data", path):
        if (data / "ST-cnts").is_dir():
            return "her2st", _her2st_sections(data)
    if any(path.glob("alignment_table_*.tsv")):
        return "STUtility", _stutility_sections(path)
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    found = (
        "it is empty" if not entries else f"it holds {entries[:12]}" + (" ..." if len(entries) > 12 else "")
    )
    msg = (
        f"{path} matches neither legacy ST layout ({found}). Expected {HER2ST_LAYOUT}; or {STUTILITY_LAYOUT}. "
        "Rename the files to one of these patterns."
    )
    raise FileNotFoundError(msg)


def _select_sections(
    sections: list[_Section], requested: Sequence[str] | None, layout: str
) -> list[_SectionFiles]:
    by_slide = {s.slide: s for s in sections}
    if requested is not None:
        requested = [requested] if isinstance(requested, str) else list(requested)
        unknown = [s for s in requested if s not in by_slide]
        if unknown:
            msg = f"Sections {unknown} are not in this {layout} dataset; its sections are {sorted(by_slide)}."
            raise KeyError(msg)
        chosen = []
        for slide in dict.fromkeys(requested):
            files = by_slide[slide].complete()
            if files is None:
                msg = f"Section {slide!r} lacks its {' and its '.join(by_slide[slide].missing)}."
                raise FileNotFoundError(msg)
            chosen.append(files)
        return chosen
    complete = [files for s in sections if (files := s.complete()) is not None]
    incomplete = [f"{s.slide} (no {', no '.join(s.missing)})" for s in sections if s.missing]
    if not complete:
        msg = f"No section of this {layout} dataset has counts, spots and image together: {'; '.join(incomplete)}."
        raise FileNotFoundError(msg)
    if incomplete:
        warnings.warn(f"Skipping incomplete sections: {'; '.join(incomplete)}.", UserWarning, stacklevel=3)
    return complete


def _header(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return handle.readline().rstrip("\r\n").split("\t")


def _is_spot_ids(ids: pd.Index) -> bool:
    return len(ids) > 0 and all(_SPOT_ID.match(str(i)) for i in ids)


def _read_counts(path: Path, slide: str) -> tuple[pd.Index, pd.Index, sparse.csr_matrix]:
    """Spot ids, gene names and float32 CSR counts of a counts file (spots x genes or genes x spots)."""
    frame = pd.read_csv(path, sep="\t", index_col=0)
    header = _header(path)
    # pandas renames duplicated column names ("GENE.1"); restore the names as written
    if len(header) >= frame.shape[1] > 0:
        frame.columns = header[len(header) - frame.shape[1] :]
    if not _is_spot_ids(frame.index) and _is_spot_ids(frame.columns):
        frame = frame.T
    if not _is_spot_ids(frame.index):
        msg = (
            f"Counts file {path} has no spot ids of the form '{{x}}x{{y}}' (e.g. '10x14') in its first column "
            f"or its header (first rows: {list(frame.index[:3])}); legacy ST counts are spots x genes with "
            "such row ids."
        )
        raise ValueError(msg)
    non_numeric = [str(c) for c, dtype in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if non_numeric:
        msg = f"Counts file {path} has non-numeric columns {non_numeric[:5]}; it must hold counts only."
        raise ValueError(msg)
    if frame.index.has_duplicates:
        duplicated = list(frame.index[frame.index.duplicated()].unique()[:5])
        msg = f"Counts file {path} lists spots {duplicated} more than once; each spot must be one row."
        raise ValueError(msg)
    values = frame.to_numpy(dtype=np.float32)
    check_counts(values, where=f"Counts file {path}")
    genes = pd.Index(frame.columns.astype(str))
    if genes.has_duplicates:
        from anndata.utils import make_index_unique

        duplicated = list(genes[genes.duplicated()].unique()[:5])
        warnings.warn(
            f"Section {slide!r} has duplicated gene names (e.g. {duplicated}); they are made unique by "
            "appending '-1', '-2', ... as `AnnData.var_names_make_unique` does.",
            UserWarning,
            stacklevel=4,
        )
        genes = make_index_unique(genes)
    return pd.Index(frame.index.astype(str)), genes, sparse.csr_matrix(values)


def _id_part(values: pd.Series) -> pd.Series:
    numbers = values.astype(float)
    integral = np.isclose(numbers, np.round(numbers)).all()
    return numbers.round().astype(int).astype(str) if integral else values.astype(str)


def _read_spots(path: Path) -> pd.DataFrame:
    """The spot table (x, y, pixel_x, pixel_y, optional new_x, new_y, selected), indexed by '{x}x{y}'."""
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in _SPOT_COLUMNS if c not in table.columns]
    if missing:
        msg = (
            f"Spot file {path} lacks the columns {missing} (it has {list(table.columns)}); legacy ST spot "
            "files are tab-separated with a header x, y, new_x, new_y, pixel_x, pixel_y[, selected]."
        )
        raise ValueError(msg)
    table.index = pd.Index(_id_part(table["x"]) + "x" + _id_part(table["y"]))
    if table.index.has_duplicates:
        duplicated = list(table.index[table.index.duplicated()].unique()[:5])
        msg = f"Spot file {path} lists spots {duplicated} more than once; each spot must be one row."
        raise ValueError(msg)
    return table


def _pitch_px(table: pd.DataFrame, path: Path) -> float | None:
    """Full-resolution pixels per array unit: least squares of pixel (x, y) on array (x, y)."""
    ax, ay = ("new_x", "new_y") if {"new_x", "new_y"} <= set(table.columns) else ("x", "y")
    design = np.column_stack([table[ax], table[ay], np.ones(len(table))]).astype(float)
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef = np.linalg.lstsq(design, table[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)[0]
    if abs(coef[0, 1]) > abs(coef[0, 0]) and abs(coef[1, 0]) > abs(coef[1, 1]):
        msg = (
            f"Spot file {path}: the array x coordinate runs along pixel_y and the array y along pixel_x (fitted "
            f"pixels per array unit: x -> ({coef[0, 0]:.1f}, {coef[0, 1]:.1f}), y -> ({coef[1, 0]:.1f}, "
            f"{coef[1, 1]:.1f})), so the pixel_x and pixel_y columns look swapped; spots would be cut from the "
            "wrong places. Swap the two columns in the spot file (or rotate the image back if it was rotated)."
        )
        raise ValueError(msg)
    pitch_x, pitch_y = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    if abs(pitch_x - pitch_y) > 0.05 * max(pitch_x, pitch_y):
        warnings.warn(
            f"Spot file {path}: the spot pitch is {pitch_x:.1f} px along x but {pitch_y:.1f} px along y; the "
            "image may be stretched. Their mean is used.",
            UserWarning,
            stacklevel=4,
        )
    return float((pitch_x + pitch_y) / 2)


@dataclass
class _SectionData:
    slide: str
    patient: str
    obs: pd.DataFrame
    spatial: np.ndarray
    genes: pd.Index
    counts: sparse.csr_matrix
    uns: dict
    image_size: tuple[int, int]


#: Sections read together whose estimated pixel size and image extent both differ from the others' by
#: more than this factor have scaled pixel coordinates.
_SCALE_TOLERANCE = 1.25


def _check_scales_agree(parts: list[_SectionData]) -> None:
    """Raise when a section's coordinates look scaled against its sister sections.

    Scaling the pixel coordinates of a section (e.g. taking them from a downscaled image) scales its
    estimated pixel size and, with it, the physical extent of its image by the same factor. A section
    scanned at another resolution differs in pixel size only (its image has more or fewer pixels), and
    a cropped image in extent only; both together single out scaled coordinates.
    """
    estimated = [
        p for p in parts if p.uns["metadata"]["microns_per_pixel_source"] == "estimated from spot pitch"
    ]
    if len(estimated) < 2:
        return
    mpp = np.array([p.uns["scalefactors"]["microns_per_pixel"] for p in estimated])
    extent = np.array([np.sqrt(np.prod(p.image_size)) for p in estimated]) * mpp
    mpp_ratio, extent_ratio = mpp / np.median(mpp), extent / np.median(extent)
    limit = np.log(_SCALE_TOLERANCE)
    off = (np.abs(np.log(mpp_ratio)) > limit) & (np.abs(np.log(extent_ratio)) > limit)
    off &= np.sign(np.log(mpp_ratio)) == np.sign(np.log(extent_ratio))
    if off.any():
        which = [f"{p.slide} ({r:.2f}x)" for p, r, o in zip(estimated, mpp_ratio, off, strict=True) if o]
        msg = (
            f"The spot coordinates of sections {which} imply pixel sizes (and images of a physical size) that many "
            f"times those of the other sections (median {np.median(mpp):.4g} µm/px), as when pixel_x / pixel_y "
            "are taken from a resized image. Check their spot files against their full-resolution images; if the "
            "images really differ, read those sections on their own with `microns_per_pixel=`."
        )
        raise ValueError(msg)


def _read_section(
    section: _SectionFiles, *, microns_per_pixel: float | None, hires_max_px: int
) -> _SectionData:
    spot_ids, genes, counts = _read_counts(section.counts, section.slide)
    table = _read_spots(section.spots)
    selected = table[table["selected"] == 1] if "selected" in table.columns else table
    keep = spot_ids.isin(selected.index)
    if not keep.any():
        msg = (
            f"Section {section.slide!r}: the counts file {section.counts} and the spot file {section.spots} "
            f"share no spot under tissue (counts ids e.g. {list(spot_ids[:3])}, spot file ids e.g. "
            f"{list(selected.index[:3])}). Check that both files belong to the same section."
        )
        raise ValueError(msg)
    no_counts = int((~selected.index.isin(spot_ids)).sum())
    not_selected = int((~keep).sum())
    if no_counts or not_selected:
        logger.warning(
            "Section %s: %d spots kept; dropped %d selected spots without counts and %d counted spots "
            "not selected in the spot file.",
            section.slide,
            int(keep.sum()),
            no_counts,
            not_selected,
        )
    spot_ids, counts = spot_ids[keep], counts[np.flatnonzero(keep)]
    spots = selected.loc[spot_ids]
    spatial = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if not np.isfinite(spatial).all():
        msg = f"Spot file {section.spots} has missing or infinite pixel_x / pixel_y values; fix or drop those spots."
        raise ValueError(msg)
    image_size = read_image_size(section.image)
    check_spots_inside(spatial, spot_ids, slide=section.slide, size=image_size, image=section.image)

    pitch = _pitch_px(table, section.spots)
    if microns_per_pixel is None:
        if pitch is None:
            msg = (
                f"Section {section.slide!r}: the spot file {section.spots} has too few spots to estimate the "
                "spot pitch; pass `microns_per_pixel=`."
            )
            raise ValueError(msg)
        mpp, source = SPOT_PITCH_UM / pitch, "estimated from spot pitch"
        check_microns_per_pixel(
            mpp,
            where=f"section {section.slide!r} (estimated from its spot pitch of {pitch:.4g} px)",
            fix="Check that pixel_x / pixel_y of the spot file are full-resolution image pixels, or pass "
            "`microns_per_pixel=`.",
        )
    else:
        mpp, source = float(microns_per_pixel), "argument"
        if pitch is not None and abs(SPOT_PITCH_UM / pitch - mpp) > 0.1 * mpp:
            warnings.warn(
                f"Section {section.slide!r}: `microns_per_pixel={mpp}` differs by more than 10 % from "
                f"{SPOT_PITCH_UM / pitch:.3f}, the value implied by the spot pitch of {pitch:.1f} px.",
                UserWarning,
                stacklevel=3,
            )
    hires, scalef = downscale_image(section.image, max_px=hires_max_px)
    uns = spatial_entry(
        hires,
        hires_scalef=scalef,
        microns_per_pixel=mpp,
        microns_per_pixel_source=source,
        spot_diameter_fullres=SPOT_DIAMETER_UM / mpp,
        spot_spacing_fullres=pitch if pitch is not None else SPOT_PITCH_UM / mpp,
        source_image_path=section.image,
    )
    obs = pd.DataFrame(
        {
            "array_row": spots["y"].round().astype(int).to_numpy(),
            "array_col": spots["x"].round().astype(int).to_numpy(),
        },
        index=section.slide + "_" + spot_ids,
    )
    return _SectionData(section.slide, section.patient, obs, spatial, genes, counts, uns, image_size)


def _combine_genes(parts: list[_SectionData], how: str) -> tuple[pd.Index, sparse.csr_matrix]:
    if how == "intersection":
        genes = parts[0].genes
        for part in parts[1:]:
            genes = genes[genes.isin(part.genes)]
    else:
        genes = pd.Index(dict.fromkeys(g for part in parts for g in part.genes))
    if len(genes) == 0:
        msg = "The sections share no gene; pass `genes='union'` or check the counts files."
        raise ValueError(msg)
    blocks = []
    for part in parts:
        columns = genes.get_indexer(part.genes)
        coo = part.counts.tocoo()
        kept = columns[coo.col] >= 0
        blocks.append(
            sparse.csr_matrix(
                (coo.data[kept], (coo.row[kept], columns[coo.col[kept]])),
                shape=(coo.shape[0], len(genes)),
                dtype=np.float32,
            )
        )
    return genes, sparse.vstack(blocks, format="csr", dtype=np.float32)


def read_legacy_st(
    path: str | Path,
    *,
    sections: Sequence[str] | None = None,
    genes: Literal["intersection", "union"] = "intersection",
    patients: Mapping[str, str] | None = None,
    microns_per_pixel: float | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """Read legacy Spatial Transcriptomics (1k spot array) sections with their H&E images.

    Two layouts are recognised from the files in ``path``:

    - **her2st** (Andersson et al. 2021): ``data/ST-cnts/{S}.tsv.gz`` counts,
      ``data/ST-spotfiles/{S}_selection.tsv`` spots and ``data/ST-imgs/{patient}/{S}/*.jpg``
      image of each section ``S``; the image's parent folder names the patient. ``path`` may
      be the dataset folder or its ``data`` folder.
    - **STUtility**: ``{S}.tsv`` (or ``.tsv.gz``) counts, ``alignment_table_{S}.tsv`` spots and
      ``{S}.jpg`` image side by side in one folder; the patient is unknown and set to the
      section id.

    Counts are tab-separated, spots x genes with row ids ``"{x}x{y}"`` (array coordinates);
    genes x spots is recognised and transposed. Spot files are the output of the ST Spot
    Detector (the her2st selection files and STUtility's alignment tables alike),
    tab-separated with the columns ``x``, ``y`` (array), ``new_x``, ``new_y`` (adjusted array
    coordinates, optional), ``pixel_x``, ``pixel_y`` (full-resolution image pixels) and
    ``selected`` (1 = under tissue; optional, all spots when absent). The spots kept are those
    selected and counted (an inner join; how many were dropped is logged per section).

    The pixel size is estimated from the spot pitch: a least-squares fit of pixel on array
    coordinates gives the pixels per array unit, and array units are 200 µm apart, so
    ``microns_per_pixel = 200 / pitch``; the spots are 100 µm wide.

    Parameters
    ----------
    path
        Folder of the dataset.
    sections
        Section ids to read. Default: every section that has counts, spots and image (the
        others are skipped with a warning naming them).
    genes
        ``"intersection"``: genes measured in every section; ``"union"``: all genes, with
        zero counts where a section lacks a gene.
    patients
        Patient of each section (section id -> patient id), overriding the layout's patient.
    microns_per_pixel
        Pixel size of the full-resolution images, instead of the estimate from the spot pitch.
    hires_max_px
        Largest side of the downscaled image stored in ``uns``.

    Returns
    -------
    AnnData with one row per spot (``obs_names`` ``"{slide}_{x}x{y}"``). Sets the following fields:

    ``X``
        Raw counts, float32 CSR.
    ``obs['slide']``, ``obs['patient']``
        Section and patient ids (categorical).
    ``obs['array_row']``, ``obs['array_col']``
        Array coordinates ``y`` and ``x``.
    ``obsm['spatial']``
        Spot centres (x, y) in full-resolution image pixels.
    ``uns['spatial'][slide]``
        ``images['hires']`` (long side <= ``hires_max_px``), ``scalefactors``
        (``tissue_hires_scalef``, ``spot_diameter_fullres``, ``spot_spacing_fullres``,
        ``microns_per_pixel``) and ``metadata`` (``source_image_path``,
        ``microns_per_pixel_source``: ``"estimated from spot pitch"`` or ``"argument"``).

    Examples
    --------
    >>> adata = hx.io.read_legacy_st("her2st/")  # doctest: +SKIP
    >>> adata.obs["slide"].value_counts()  # doctest: +SKIP
    """
    one_of(genes, ("intersection", "union"), "genes")
    if microns_per_pixel is not None:
        check_microns_per_pixel(microns_per_pixel, where="`microns_per_pixel`", fix=MPP_FIX)
    path = Path(path)
    layout, found = _find_sections(path)
    parts = []
    for section in _select_sections(found, sections, layout):  # one image decoded at a time
        check_slide_id(section.slide)
        parts.append(_read_section(section, microns_per_pixel=microns_per_pixel, hires_max_px=hires_max_px))
    _check_scales_agree(parts)
    var_names, counts = _combine_genes(parts, genes)
    patient_of = {part.slide: part.patient for part in parts} | dict(patients or {})
    obs = pd.concat([part.obs for part in parts])
    slides = np.repeat([part.slide for part in parts], [len(part.obs) for part in parts])
    obs.insert(0, "slide", pd.Categorical(slides, categories=sorted(set(slides))))
    patient_ids = [str(patient_of[s]) for s in slides]
    obs.insert(1, "patient", pd.Categorical(patient_ids, categories=sorted(set(patient_ids))))
    adata = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm["spatial"] = np.concatenate([part.spatial for part in parts])
    adata.uns["spatial"] = {part.slide: part.uns for part in parts}
    return adata
