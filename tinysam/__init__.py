"""TinySAM: fast promptable segmentation, compatible with segment-anything's API.

Names are imported on first use, so ``import tinysam.runtime`` (the ONNX Runtime backend) works
where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401  (public)

_HOMES = {
    "SamAutomaticMaskGenerator": "everything",
    "SamHierarchicalMaskGenerator": "everything",
    "SamPredictor": "predictor",
    "OnnxPredictor": "runtime",
    "build_sam": "build",
    "build_sam_vit_b": "build",
    "build_sam_vit_h": "build",
    "build_sam_vit_l": "build",
    "build_sam_vit_t": "build",
    "load_model": "backends",
    "load_predictor": "backends",
    "sam_model_registry": "build",
}

__all__ = [
    "OnnxPredictor",
    "SamAutomaticMaskGenerator",
    "SamHierarchicalMaskGenerator",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "load_model",
    "load_predictor",
    "sam_model_registry",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tinysam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from .backends import load_model, load_predictor
    from .build import (
        build_sam,
        build_sam_vit_b,
        build_sam_vit_h,
        build_sam_vit_l,
        build_sam_vit_t,
        sam_model_registry,
    )
    from .everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from .predictor import SamPredictor
    from .runtime import OnnxPredictor
