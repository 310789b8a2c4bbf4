"""Readers into the histo2expr data model: legacy ST (her2st, STUtility), Visium, Visium HD, Xenium, HEST-1k, whole-slide images.

Also the lazily read slide images, and the data model as a SpatialData.
"""

from histo2expr.io._hest import read_hest
from histo2expr.io._image import ArrayImage
from histo2expr.io._legacy_st import read_legacy_st
from histo2expr.io._slides import SlideImage, slide_images
from histo2expr.io._spatialdata import to_spatialdata
from histo2expr.io._visium import read_visium
from histo2expr.io._visium_hd import read_visium_hd
from histo2expr.io._wsi import read_wsi
from histo2expr.io._wsi_image import open_slide_image
from histo2expr.io._xenium import read_xenium_he

__all__ = [
    "ArrayImage",
    "SlideImage",
    "open_slide_image",
    "read_hest",
    "read_legacy_st",
    "read_visium",
    "read_visium_hd",
    "read_wsi",
    "read_xenium_he",
    "slide_images",
    "to_spatialdata",
]
