"""TinySAM: fast promptable segmentation, compatible with segment-anything's API."""

from .build import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    load_model,
    sam_model_registry,
)
from .everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
from .predictor import SamPredictor

__version__ = "0.1.0"

__all__ = [
    "SamAutomaticMaskGenerator",
    "SamHierarchicalMaskGenerator",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "load_model",
    "sam_model_registry",
]
