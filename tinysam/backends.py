"""Loading a model, or a ready predictor, for a backend: the one place that knows how.

``load_model`` resolves a checkpoint (``tinysam.checkpoint``) and builds the model
(``tinysam.build``), or loads a folder written by ``tinysam quantize``; ``load_predictor``
returns a ``PredictorBase`` for ``torch``, ``onnx`` (ONNX Runtime) or ``openvino`` (OpenVINO
for the image encoder). The command line, the web demo and the evaluations get their
predictors here. Torch is imported only for the torch backend and checkpoints, so the ONNX
backends load without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .predictor_base import DEFAULT_MANY_PROMPTS, PredictorBase

BACKENDS = ("torch", "onnx", "openvino")
ONNX_DIR_ENV = "TINYSAM_ONNX_DIR"


class BackendError(ValueError):
    """Arguments that do not fit the chosen backend (one line saying which)."""


def load_model(
    model_type: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    device="cpu",
    download: bool = True,
    progress: bool = True,
) -> tuple:
    """Resolve, read and load a checkpoint; the model type defaults to what the file holds.

    A folder written by ``tinysam quantize`` (or its ``quantized.pt``) loads as the
    fake-quantized model it describes. Returns ``(Sam, ResolvedCheckpoint)``."""
    from .build import load_float_model
    from .checkpoint import CheckpointError, ResolvedCheckpoint

    if checkpoint is not None:
        from .quant.store import is_quantized_checkpoint, load_quantized  # needs the quant code

        if is_quantized_checkpoint(checkpoint):
            sam = load_quantized(checkpoint, device)
            found = sam.quant_config["model_type"]
            if model_type is not None and model_type != found:
                raise CheckpointError(f"{checkpoint} is a quantized {found}, not {model_type}")
            return sam, ResolvedCheckpoint(Path(checkpoint), "argument")
    return load_float_model(
        model_type, checkpoint, device=device, download=download, progress=progress
    )


def load_predictor(
    backend: str = "torch",
    *,
    checkpoint: str | os.PathLike | None = None,
    model_type: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    device="cpu",
    threads: int | None = None,
    many_prompts: int = DEFAULT_MANY_PROMPTS,
    progress: bool = False,
) -> PredictorBase:
    """A predictor for ``backend``: ``torch`` (``checkpoint`` / ``model_type`` / ``device``, as
    ``load_model``), ``onnx`` or ``openvino`` (an export made by ``tinysam export`` in
    ``onnx_dir``, default ``$TINYSAM_ONNX_DIR``; CPU only, no torch needed). ``threads``: CPU
    threads (torch's global setting for the torch backend)."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise BackendError("threads must be at least 1")
    if backend in ("onnx", "openvino"):
        onnx_dir = onnx_dir or os.environ.get(ONNX_DIR_ENV)
        if not onnx_dir:
            raise BackendError(
                f"the {backend} backend needs an export folder (onnx_dir, or ${ONNX_DIR_ENV}) "
                "written by `tinysam export --out-dir DIR`"
            )
        from .runtime import OnnxPredictor

        engine = "openvino" if backend == "openvino" else "onnxruntime"
        return OnnxPredictor(
            Path(onnx_dir), threads=threads, encoder_engine=engine, many_prompts=many_prompts
        )
    if onnx_dir is not None:
        raise BackendError("an ONNX export folder is for the onnx and openvino backends")
    import torch

    from .predictor import SamPredictor

    if threads is not None:
        torch.set_num_threads(threads)
    sam, _ = load_model(model_type, checkpoint, device=device, progress=progress)
    return SamPredictor(sam, many_prompts=many_prompts)


__all__ = [
    "BACKENDS",
    "BackendError",
    "load_model",
    "load_predictor",
]
