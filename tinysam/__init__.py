"""TinySAM: fast promptable segmentation, compatible with segment-anything's API.

Names are imported on first use, so ``import tinysam.runtime`` (the ONNX Runtime backend) works
where torch is not installed.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401  (public)

# Same input, same output: MKL (torch's BLAS on x86) may pick a product's code path by its
# buffers' alignment, which depends on what the process allocated before, so one image's masks
# could differ between a whole run and a resumed one. Strict conditional numerical
# reproducibility fixes the path per CPU. MKL reads this once, at its first product: importing
# tinysam before any torch work is enough (the CLI and the workers do). A user's setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

_HOMES = {
    "SamAutomaticMaskGenerator": "everything",
    "SamHierarchicalMaskGenerator": "everything",
    "SamPredictor": "predictor",
    "OnnxPredictor": "runtime",
    "build_sam": "backends",
    "build_sam_vit_b": "backends",
    "build_sam_vit_h": "backends",
    "build_sam_vit_l": "backends",
    "build_sam_vit_t": "backends",
    "load_model": "backends",
    "load_predictor": "backends",
    "sam_model_registry": "backends",
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
    from .backends import (
        build_sam,
        build_sam_vit_b,
        build_sam_vit_h,
        build_sam_vit_l,
        build_sam_vit_t,
        load_model,
        load_predictor,
        sam_model_registry,
    )
    from .everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from .predictor import SamPredictor
    from .runtime import OnnxPredictor
