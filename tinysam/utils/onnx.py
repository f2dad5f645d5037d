"""segment-anything's ``utils/onnx.py`` path: ``SamOnnxModel``, the module its export script
traces (``tinysam.runtime.graphs.SamOnnxModel``)."""

from ..runtime.graphs import SamOnnxModel

__all__ = ["SamOnnxModel"]
