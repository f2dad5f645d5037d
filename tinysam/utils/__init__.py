"""segment-anything's ``utils`` import paths (``transforms``, ``amg``, ``onnx``), as thin
aliases over their homes in tinysam, so client code that imports them by path runs unchanged."""
