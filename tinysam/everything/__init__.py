"""Everything mode: masks for all objects in an image, from grids of point prompts."""

from .automatic import SamAutomaticMaskGenerator, SharedEmbedding
from .hierarchical import SamHierarchicalMaskGenerator

__all__ = ["SamAutomaticMaskGenerator", "SamHierarchicalMaskGenerator", "SharedEmbedding"]
