"""segment-anything's module path for ``SamAutomaticMaskGenerator`` (``tinysam.everything``)."""

from .everything.automatic import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
