"""Loading a model, or a ready predictor, for a backend: the one place that knows how.

``load_model`` resolves a checkpoint (``tinysam.checkpoint``) and builds the model
(``tinysam.build``), or loads a folder written by ``tinysam quantize``; ``load_predictor``
returns a ``PredictorBase`` for ``torch``, ``onnx`` (ONNX Runtime) or ``openvino`` (OpenVINO
for the image encoder), or ``auto``: the fastest of those that can run what was given, measured
once per machine (``tinysam.backend_choice``). The command line, the web demo and the
evaluations get their predictors here. Torch is imported only for the torch backend and
checkpoints, so the ONNX backends load without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from .predictor_base import DEFAULT_MANY_PROMPTS, PredictorBase

BACKENDS = ("auto", "torch", "onnx", "openvino")
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
    remeasure: bool = False,
) -> PredictorBase:
    """A predictor for ``backend``: ``torch`` (``checkpoint`` / ``model_type`` / ``device``, as
    ``load_model``), ``onnx`` or ``openvino`` (an export made by ``tinysam export`` in
    ``onnx_dir``, default ``$TINYSAM_ONNX_DIR``; CPU only, no torch needed). ``threads``: CPU
    threads (torch's global setting for the torch backend).

    ``auto`` picks among the backends installed that can run what was given: an export folder
    runs on ONNX Runtime or OpenVINO, a checkpoint on torch. The fastest image encoder wins,
    timed once per machine and model and cached (``remeasure`` times again). With both given
    explicitly (one model), the winning engine encodes the images and torch answers the
    prompts."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise BackendError("threads must be at least 1")
    if backend == "auto":
        from .backend_choice import choose_backend

        factories, model_key = auto_candidates(
            checkpoint=checkpoint, model_type=model_type, onnx_dir=onnx_dir, device=device,
            threads=threads, many_prompts=many_prompts, progress=progress,
        )  # fmt: skip
        predictor, choice = choose_backend(
            factories, model_key, _threads(threads), remeasure=remeasure
        )
        return predictor
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


def auto_candidates(
    *,
    checkpoint: str | os.PathLike | None = None,
    model_type: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    device="cpu",
    threads: int | None = None,
    many_prompts: int = DEFAULT_MANY_PROMPTS,
    progress: bool = False,
) -> tuple[dict, str]:
    """``backend="auto"``'s candidates (name -> a function making the predictor) and the cache
    key of the model they run. ``$TINYSAM_ONNX_DIR`` counts only when no checkpoint or model
    type was named: a checkpoint asked for by name is never swapped for another export."""
    if onnx_dir is None and checkpoint is None and model_type is None:
        onnx_dir = os.environ.get(ONNX_DIR_ENV) or None
    on_cpu = str(device) == "cpu"
    if onnx_dir is not None and not on_cpu:
        raise BackendError(
            f"an ONNX export runs on the CPU; device {device!r} is for the torch backend "
            "(give a checkpoint without an export folder)"
        )
    if onnx_dir is not None and model_type is not None and checkpoint is None:
        raise BackendError(
            "a model type with an export folder: give the checkpoint too (to compare torch "
            "with the export), or leave the model type out"
        )
    load = functools.partial(
        load_predictor, onnx_dir=onnx_dir, threads=threads, many_prompts=many_prompts
    )
    factories = {}
    if _installed("torch") and (onnx_dir is None or checkpoint is not None):
        factories["torch"] = functools.partial(
            load_predictor, "torch", checkpoint=checkpoint, model_type=model_type,
            device=device, threads=threads, many_prompts=many_prompts, progress=progress,
        )  # fmt: skip
    if onnx_dir is not None:
        from .perf import int8_products_saturate
        from .runtime.predictor import load_manifest

        manifest = load_manifest(onnx_dir)  # a missing or foreign folder says so now
        engines = [("onnx", "onnxruntime"), ("openvino", "openvino")]
        if "quantization" in manifest and int8_products_saturate():
            engines.pop()  # OpenVinoEncoder refuses int8 graphs there
        engines = [(n, m) for n, m in engines if _installed(m) and _installed("onnxruntime")]
        if "torch" in factories:
            factories.update(
                _torch_with_export_encoders(
                    factories["torch"], onnx_dir, manifest, engines, threads
                )
            )
        else:
            factories.update({name: functools.partial(load, name) for name, _ in engines})
    if not factories:
        raise BackendError(
            "no backend can run this: pip install 'tinysam[torch]' for checkpoints, "
            "'tinysam[onnx]' for export folders"
        )
    if "torch" in factories and len(factories) > 1:
        from .backend_choice import file_identity

        model_key = f"checkpoint {file_identity(checkpoint)} + export {file_identity(onnx_dir)}"
    elif "torch" in factories:
        model_key = f"checkpoint {model_type or checkpoint or 'default'}"
    else:
        from .backend_choice import export_model_key

        model_key = export_model_key(manifest)
    return factories, model_key


def _torch_with_export_encoders(
    load_torch, onnx_dir, manifest: dict, engines: list[tuple[str, str]], threads: int | None
) -> dict:
    """With a checkpoint and its export: "torch" loads the model once, and each export
    candidate is that model with the export's image encoder on its engine (the fastest
    encoder, and torch's prompt path: its many-prompt decoder beats the ONNX graphs in the
    everything mode). The export's decoders are never loaded."""
    from .predictor import SamPredictor
    from .runtime.predictor import load_encoder

    torch_predictor = functools.cache(load_torch)
    factories = {"torch": torch_predictor}

    def hybrid(engine: str) -> PredictorBase:
        base = torch_predictor()
        encoder = load_encoder(onnx_dir, manifest, engine, threads)
        return SamPredictor(base.model, base.many_prompts, image_encoder=encoder)

    for name, engine in engines:  # (backend name, encoder engine)
        factories[name] = functools.partial(hybrid, engine)
    return factories


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _threads(threads: int | None) -> int:
    from .runtime.predictor import _physical_cores

    return threads or _physical_cores()


__all__ = [
    "auto_candidates",
    "BACKENDS",
    "BackendError",
    "load_model",
    "load_predictor",
]
