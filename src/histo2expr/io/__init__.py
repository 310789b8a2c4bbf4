"""Readers into the histo2expr data model: legacy ST (her2st, STUtility), Visium, HEST-1k, H&E whole-slide images.

Also the lazily read slide images, and the data model as a SpatialData.
"""

from histo2expr.io._hest import read_hest
from histo2expr.io._legacy_st import read_legacy_st
from histo2expr.io._slides import SlideImage, slide_images
from histo2expr.io._spatialdata import to_spatialdata
from histo2expr.io._visium import read_visium
from histo2expr.io._wsi import read_wsi

__all__ = [
    "SlideImage",
    "read_hest",
    "read_legacy_st",
    "read_visium",
    "read_wsi",
    "slide_images",
    "to_spatialdata",
]
