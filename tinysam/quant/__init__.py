"""Post-training quantization (Q-TinySAM): fake-quantized models, the scale search, quantized
checkpoints and int8 ONNX export. Needs torch; attributes load lazily, so importing the package
(as the ``tinysam`` command does) stays torch-free."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "model",
    "set_quantization": "model",
    "set_deploy": "model",
    "quant_layers": "model",
    "collect": "calibrate",
    "SearchConfig": "search",
    "search_scales": "search",
    "save_quantized": "store",
    "load_quantized": "store",
    "export_quantized_onnx": "onnx_int8",
    "mask_agreement": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinysam.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
