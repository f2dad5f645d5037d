"""Deployment without PyTorch: ONNX export (``onnx_export``, needs torch) and ``OnnxPredictor``
(needs only numpy, Pillow and onnxruntime: ``pip install 'tinysam[onnx]'``)."""

from .predictor import OnnxModelError, OnnxPredictor, load_manifest, session_options

__all__ = ["OnnxModelError", "OnnxPredictor", "load_manifest", "session_options"]
