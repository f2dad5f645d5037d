"""Everything mode: masks for all objects in an image, from grids of point prompts."""

from .automatic import SamAutomaticMaskGenerator
from .hierarchical import SamHierarchicalMaskGenerator

__all__ = ["SamAutomaticMaskGenerator", "SamHierarchicalMaskGenerator"]
