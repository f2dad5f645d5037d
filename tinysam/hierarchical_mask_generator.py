"""The authors' module path for ``SamHierarchicalMaskGenerator`` (``tinysam.everything``)."""

from .everything.hierarchical import SamHierarchicalMaskGenerator

__all__ = ["SamHierarchicalMaskGenerator"]
