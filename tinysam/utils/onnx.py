"""segment-anything's ``utils/onnx.py`` path: ``SamOnnxModel``, the module its export script
traces (``tinysam.runtime.export.SamOnnxModel``)."""

from ..runtime.export import SamOnnxModel

__all__ = ["SamOnnxModel"]
