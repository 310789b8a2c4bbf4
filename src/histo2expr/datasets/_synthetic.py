"""The embedded synthetic cohort: H&E-like images and counts driven by the same latent tissue."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import ndimage

from .._cache import atomic_path, cache_dir
from ..io import ArrayImage

#: Bump when the generator changes, so cached images are not reused.
_VERSION = 2

#: Microns per pixel of the synthetic images, spot diameter and pitch (Visium-like, in um).
MICRONS_PER_PIXEL = 1.0
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0

#: Optical densities of haematoxylin and eosin per RGB channel (Ruifrok & Johnston 2001).
_STAIN_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])

_PROGRAMMES = ("epithelial", "stromal", "immune", "adipose")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A standardised smooth random field, made at 1/8 resolution and upsampled."""
    low = (max(2, shape[0] // 8), max(2, shape[1] // 8))
    field = ndimage.gaussian_filter(rng.standard_normal(low, dtype=np.float32), sigma / 8, mode="reflect")
    field = ndimage.zoom(field, (shape[0] / low[0], shape[1] / low[1]), order=1)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + np.float32(1e-12))


def _nuclei(rng: np.random.Generator, rate: np.ndarray, radius: float) -> np.ndarray:
    """Haematoxylin density of round nuclei placed at Poisson points with a spatial ``rate``."""
    points = rng.random(rate.shape) < rate
    density = ndimage.gaussian_filter(points.astype(np.float32), radius / 2.0)
    return density * (2.0 * np.pi * (radius / 2.0) ** 2)


def _render_slide(
    rng: np.random.Generator, programmes: np.ndarray, tissue: np.ndarray, stain_shift: np.ndarray
) -> np.ndarray:
    """RGB image from programme fields (K, H, W) through a Beer-Lambert H&E model."""
    epithelial, stromal, immune, adipose = (
        1.0 / (1.0 + np.exp(-1.5 * p)) for p in programmes.astype(np.float32)
    )
    height, width = tissue.shape
    haem = 1.1 * _nuclei(rng, 0.004 * epithelial * tissue, radius=7.0)
    haem += 1.3 * _nuclei(rng, 0.006 * immune * tissue, radius=4.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fibres = 0.5 + 0.5 * np.sin((xx * 0.8 + yy * 0.6) / 3.0 + 2.0 * programmes[1])
    eosin = tissue * (0.25 + 0.45 * stromal * (0.6 + 0.4 * fibres) + 0.1 * epithelial)
    holes = _nuclei(rng, 0.0004 * adipose**2 * tissue, radius=22.0) > 0.5
    eosin = np.where(holes, np.float32(0.03), eosin)
    haem = np.where(holes, np.float32(0.0), haem)
    stains = (_STAIN_OD * stain_shift[:, None]).astype(np.float32)
    optical_density = haem[..., None] * stains[0] + eosin[..., None] * stains[1]
    optical_density += 0.02 * rng.standard_normal(optical_density.shape, dtype=np.float32)
    rgb = 245.0 * np.exp(-np.clip(optical_density, 0.0, None))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _spot_grid(n_side: int, margin: float, pitch: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexagonal (Visium-like) spot grid: array rows, columns and centres (x, y) in pixels."""
    rows, cols = np.mgrid[0:n_side, 0:n_side]
    rows, cols = rows.ravel(), cols.ravel()
    x = margin + (cols + 0.5 * (rows % 2)) * pitch
    y = margin + rows * pitch * np.sqrt(3) / 2
    return rows, cols, np.column_stack([x, y])


def _gene_model(rng: np.random.Generator, n_genes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Baseline log-means and programme loadings of every gene (some genes load on nothing)."""
    base = rng.normal(-1.0, 1.3, size=n_genes)
    loadings = rng.normal(0.0, 0.8, size=(n_genes, len(_PROGRAMMES)))
    loadings *= rng.random(loadings.shape) < 0.5
    loadings[rng.random(n_genes) < 0.15] = 0.0
    names = [f"SYN{i:04d}" for i in range(n_genes)]
    return base, loadings, names


def synthetic(
    n_slides: int = 4,
    seed: int = 0,
    *,
    spots_per_side: int = 18,
    n_genes: int = 200,
    path: str | Path | None = None,
) -> AnnData:
    """A small synthetic spatial transcriptomics cohort with H&E-like images.

    Latent tissue programmes (epithelial, stromal, immune, adipose) are smooth random
    fields over each slide. They drive both the image — nuclei density and size,
    eosin intensity and fibre texture, fat vacuoles, rendered through a
    Beer-Lambert haematoxylin & eosin model — and the counts, negative binomial with
    log-means linear in the programmes at each spot. Each slide gets its own stain
    shift and sequencing depth (up to about 7x), as real cohorts do; slides are paired
    into patients. A method that reads morphology can beat the mean predictor here.

    The images are written as uncompressed TIFFs (1 um per pixel) into ``path`` and
    the AnnData follows the histo2expr data model exactly, so every code path is the
    one real data takes.

    Parameters
    ----------
    n_slides
        Number of slides (two per patient).
    seed
        Seed of everything random; the same seed gives the same cohort.
    spots_per_side
        Side of the hexagonal spot grid; spots off the tissue are dropped, leaving
        about 75 % of ``spots_per_side**2`` per slide.
    n_genes
        Number of genes.
    path
        Folder for the images; default: the histo2expr cache
        (``$HISTO2EXPR_CACHE_DIR`` or ``~/.cache/histo2expr``).

    Returns
    -------
    AnnData with raw counts in ``X`` and

    ``.obs["slide"]``, ``.obs["patient"]``, ``.obs["array_row"]``, ``.obs["array_col"]``
        Slide, patient and array position of each spot.
    ``.obsm["spatial"]``
        Spot centres in full-resolution pixels.
    ``.uns["spatial"][slide]``
        Downscaled image, scale factors and the full-resolution image path.
    """
    if n_slides < 1 or spots_per_side < 4 or n_genes < 2:
        msg = "`n_slides` must be >= 1, `spots_per_side` >= 4 and `n_genes` >= 2."
        raise ValueError(msg)
    params = {"n_slides": n_slides, "seed": seed, "side": spots_per_side, "genes": n_genes, "v": _VERSION}
    token = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(path) if path is not None else cache_dir("synthetic") / token
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base, loadings, genes = _gene_model(rng, n_genes)
    pitch = SPOT_PITCH_UM / MICRONS_PER_PIXEL
    margin = 1.5 * pitch
    rows, cols, centres = _spot_grid(spots_per_side, margin, pitch)
    size = int(np.ceil(centres.max() + margin))
    tables, spatial = [], {}
    for index in range(n_slides):
        slide = f"S{index + 1}"
        slide_rng = np.random.default_rng([seed, index])
        programmes = np.stack([_smooth_field(slide_rng, (size, size), sigma=250.0) for _ in _PROGRAMMES])
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        wobble = 0.04 * _smooth_field(slide_rng, (size, size), sigma=200.0)
        tissue = ((xx / 0.47) ** 2 + (yy / 0.44) ** 2 + wobble < 1.0).astype(np.float32)
        stain_shift = np.exp(slide_rng.normal(0.0, 0.12, size=2))
        pixels = _render_slide(slide_rng, programmes, tissue, stain_shift)
        ix, iy = np.rint(centres).astype(int).T
        on_tissue = tissue[iy, ix] > 0
        latent = programmes[:, iy[on_tissue], ix[on_tissue]].T
        depth = np.exp(slide_rng.uniform(-1.0, 1.0))
        size_factor = depth * np.exp(slide_rng.normal(0.0, 0.2, size=len(latent)))
        mean = 20.0 * size_factor[:, None] * np.exp(base + latent @ loadings.T)
        dispersion = 5.0
        counts = slide_rng.poisson(slide_rng.gamma(dispersion, mean / dispersion)).astype(np.float32)
        image_path = folder / f"{slide}.tif"
        if not image_path.exists():
            import tifffile

            with atomic_path(image_path) as tmp:
                tifffile.imwrite(tmp, pixels, photometric="rgb")
        hires, scalef = ArrayImage(pixels).downscaled(max_px=2000)
        obs = pd.DataFrame(
            {
                "slide": slide,
                "patient": f"P{index // 2 + 1}",
                "array_row": rows[on_tissue],
                "array_col": cols[on_tissue],
            },
            index=[f"{slide}_{r}x{c}" for r, c in zip(rows[on_tissue], cols[on_tissue], strict=True)],
        )
        table = AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
        table.obsm["spatial"] = centres[on_tissue].astype(np.float64)
        tables.append(table)
        spatial[slide] = {
            "images": {"hires": hires},
            "scalefactors": {
                "tissue_hires_scalef": scalef,
                "spot_diameter_fullres": SPOT_DIAMETER_UM / MICRONS_PER_PIXEL,
                "spot_spacing_fullres": pitch,
                "microns_per_pixel": MICRONS_PER_PIXEL,
            },
            "metadata": {"source_image_path": str(image_path.resolve()), "microns_per_pixel_source": "file"},
        }
    import anndata as ad

    adata = ad.concat(tables, merge="same")
    for key in ("slide", "patient"):
        adata.obs[key] = pd.Categorical(adata.obs[key])
    adata.uns["spatial"] = spatial
    return adata
