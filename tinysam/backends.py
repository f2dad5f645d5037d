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
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .predictor_base import DEFAULT_MANY_PROMPTS, PredictorBase

BACKENDS = ("auto", "torch", "onnx", "openvino")
ONNX_DIR_ENV = "TINYSAM_ONNX_DIR"
BACKEND_ENV = "TINYSAM_BACKEND"
THREADS_ENV = "TINYSAM_THREADS"
PRECISION_ENV = "TINYSAM_PRECISION"
CHECKPOINT_ENV = "TINYSAM_CHECKPOINT"  # also read by checkpoint.resolve_checkpoint (vit_t)


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
    from .build import sam_from_state_dict
    from .checkpoint import read_checkpoint

    contents = read_checkpoint(model_type, checkpoint, download=download, progress=progress)
    if contents.quantized:
        from .quant.store import load_quantized  # needs the quant code

        sam = load_quantized(contents.resolved.path, device, model_type)
    elif contents.published_layers:
        from .quant.published import load_published

        source = str(contents.resolved.path)
        sam = load_published(
            contents.state_dict, contents.published_layers, contents.model_type, source, device
        )
    else:
        source = str(contents.resolved.path)
        sam = sam_from_state_dict(contents.state_dict, contents.model_type, source).to(device)
    return sam, contents.resolved


@dataclass(frozen=True)
class PredictorSpec:
    """Which predictor to make, as plain picklable settings, and every backend's rules.

    The command line (``from_args``), the integrations (``from_env``), the web demo and the Ray
    workers all make their predictors from one of these; ``load()`` makes it. ``resolve()``
    does the once-per-job work first (finding or downloading the checkpoint, ``auto``'s
    choice) so that workers only load. Errors name the command-line flags; the fields have the
    same names (``onnx_dir`` for ``--onnx-dir``, ``model_type`` for ``--model``).
    """

    backend: str = "torch"
    checkpoint: str | os.PathLike | None = None
    model_type: str | None = None
    onnx_dir: str | os.PathLike | None = None
    device: str = "cpu"
    threads: int | None = None
    many_prompts: int = DEFAULT_MANY_PROMPTS
    progress: bool = False
    remeasure: bool = False  # auto: time the backends again instead of reading the cache
    # fp32 (exact, the default); bf16 (the image encoder on torch autocast or OpenVINO's bf16);
    # int8 (a quantized folder or int8 export, refused for a float model). ``perf.
    # precision_note`` says where one runs slowly or in another precision.
    precision: str = "fp32"

    @classmethod
    def from_args(cls, args, **settings) -> PredictorSpec:
        """The model arguments of a command (``cli.common.add_model_args``), checked."""
        return cls(
            backend=getattr(args, "backend", "torch"),
            checkpoint=args.checkpoint,
            model_type=args.model,
            onnx_dir=getattr(args, "onnx_dir", None),
            device=args.device,
            threads=args.threads,
            progress=sys.stderr.isatty(),
            precision=getattr(args, "precision", None) or "fp32",
            **settings,
        ).checked()

    @classmethod
    def from_env(cls, **settings) -> PredictorSpec:
        """A server's settings from its environment, checked: ``TINYSAM_BACKEND`` (torch),
        ``TINYSAM_CHECKPOINT``, ``TINYSAM_ONNX_DIR`` (for onnx, openvino and auto),
        ``TINYSAM_THREADS``, ``TINYSAM_PRECISION`` (fp32)."""
        from .io import positive_int_env

        backend = os.environ.get(BACKEND_ENV) or "torch"
        return cls(
            backend=backend,
            checkpoint=os.environ.get(CHECKPOINT_ENV) or None,
            onnx_dir=None if backend == "torch" else os.environ.get(ONNX_DIR_ENV) or None,
            threads=positive_int_env(THREADS_ENV, 0) or None,
            precision=os.environ.get(PRECISION_ENV) or "fp32",
            **settings,
        ).checked()

    def checked(self) -> PredictorSpec:
        """This spec with ``auto`` settled where nothing can compete (no export folder: torch),
        or a BackendError naming what does not fit the backend."""
        if self.backend not in BACKENDS:
            raise BackendError(
                f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.threads is not None and self.threads < 1:
            raise BackendError("--threads must be at least 1")
        from .perf import PRECISIONS

        if self.precision not in PRECISIONS:
            raise BackendError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.backend == "auto" and self.precision == "bf16":
            from .perf import bf16_is_fast

            if not bf16_is_fast():  # auto never picks what runs slower than fp32
                return replace(self, precision="fp32").checked()
        if self.backend == "auto":
            named = self.checkpoint is not None or self.model_type is not None
            onnx_dir = self.onnx_dir or (None if named else os.environ.get(ONNX_DIR_ENV) or None)
            if onnx_dir is None:
                return replace(self, backend="torch").checked()  # nothing to compare torch with
            if str(self.device) != "cpu":
                raise BackendError(
                    "--device is for the torch backend; an export (--onnx-dir) runs on the "
                    "CPU: give --backend torch, or leave --device out"
                )
            if self.model_type is not None and self.checkpoint is None:
                raise BackendError(
                    "a model type with an export folder: give the checkpoint too (to compare "
                    "torch with the export), or leave the model type out"
                )
            return replace(self, onnx_dir=onnx_dir)
        if self.backend in ("onnx", "openvino"):
            if self.checkpoint is not None or self.model_type is not None:
                raise BackendError(
                    "--checkpoint, --model and --device are for the torch backend; "
                    f"--backend {self.backend} runs the export in --onnx-dir on the CPU"
                )
            if str(self.device) != "cpu":
                raise BackendError(
                    "--checkpoint, --model and --device are for the torch backend; "
                    f"--backend {self.backend} runs the export in --onnx-dir on the CPU"
                )
            onnx_dir = self.onnx_dir or os.environ.get(ONNX_DIR_ENV) or None
            if onnx_dir is None:
                raise BackendError(
                    f"--backend {self.backend} needs --onnx-dir DIR (or ${ONNX_DIR_ENV}), "
                    "a folder written by `tinysam export --out-dir DIR`"
                )
            return replace(self, onnx_dir=onnx_dir)
        if self.onnx_dir is not None:
            raise BackendError("--onnx-dir is for --backend auto, onnx or openvino")
        if str(self.device) != "cpu":
            _checked_device(str(self.device))  # a device this torch has, or one line
        return self

    def resolve(self) -> PredictorSpec:
        """The spec that Ray workers load: paths made absolute, the checkpoint found (or
        downloaded) now, once, and ``auto``'s choice made here (the workers then load the
        winner, or read the choice just cached when torch runs an export's encoder)."""
        spec = self.checked()
        absolute = {
            name: Path(value).resolve()
            for name in ("checkpoint", "onnx_dir")
            if (value := getattr(spec, name)) is not None
        }
        spec = replace(spec, **absolute)
        if spec.backend == "torch" and spec.checkpoint is None:
            from .checkpoint import resolve_checkpoint

            found = resolve_checkpoint(spec.model_type or "vit_t", progress=spec.progress)
            return replace(spec, checkpoint=found.path.resolve())
        if spec.backend != "auto":
            return spec
        from .backend_choice import choose_backend

        factories, model_key = spec._auto_candidates()
        _, choice = choose_backend(
            factories, model_key, _threads(spec.threads), remeasure=spec.remeasure, build=False
        )
        if choice.backend == "torch":
            return replace(spec, backend="torch", onnx_dir=None).resolve()
        if "torch" in factories:
            return spec  # an export's encoder with torch's prompts: both files are needed
        return replace(spec, backend=choice.backend)

    def load(self) -> PredictorBase:
        """The predictor: SamPredictor for torch, OnnxPredictor (no torch needed) for onnx and
        openvino, the fastest of those that can run what was given for auto."""
        spec = self.checked()
        if self.backend == "auto" and spec.precision != self.precision:
            import warnings

            from .perf import PrecisionWarning

            warnings.warn(
                f"--backend auto runs fp32: {self.precision} on this CPU (no AVX512-BF16 or "
                "AMX) would be emulated, slower than fp32; name a backend to run it anyway",
                PrecisionWarning,
                stacklevel=2,
            )
        if spec.backend == "auto":
            from .backend_choice import choose_backend

            factories, model_key = spec._auto_candidates()
            predictor, _ = choose_backend(
                factories, model_key, _threads(spec.threads), remeasure=spec.remeasure
            )
            return predictor
        if spec.backend in ("onnx", "openvino"):
            from .runtime import OnnxPredictor

            engine = "openvino" if spec.backend == "openvino" else "onnxruntime"
            predictor = OnnxPredictor(
                Path(spec.onnx_dir),
                threads=spec.threads,
                encoder_engine=engine,
                many_prompts=spec.many_prompts,
                precision=spec.precision,
            )
        else:
            from .predictor import SamPredictor

            sam, _ = spec.load_model()
            spec.check_precision(sam)
            engine = "torch"
            predictor = SamPredictor(sam, many_prompts=spec.many_prompts, precision=spec.precision)
        spec.note_precision(engine)
        return predictor

    def check_precision(self, sam) -> None:
        """int8 needs a quantized model; a quantized model runs its own grids (not bf16)."""
        quantized = hasattr(sam, "quant_config") or hasattr(sam, "published_layers")
        if self.precision == "int8" and not quantized:
            raise BackendError(
                "--precision int8 needs a quantized model: a folder written by tinysam "
                "quantize, the authors' Q-TinySAM, or its int8 export (--onnx-dir)"
            )
        if self.precision == "bf16" and quantized:
            raise BackendError(
                "this model is quantized: it runs on its 8-bit grids, not in bf16; leave out "
                "--precision bf16"
            )

    def note_precision(self, engine: str) -> None:
        """Warn (``perf.PrecisionWarning``, one line) where the precision runs slowly here."""
        import warnings

        from .perf import PrecisionWarning, precision_note

        note = precision_note(self.precision, engine)
        if note:
            warnings.warn(note, PrecisionWarning, stacklevel=3)

    def load_model(self) -> tuple:
        """The torch model alone (``load_model``), for the commands that export, quantize or
        describe it; ``threads`` becomes torch's global setting."""
        spec = self.checked()
        if spec.backend != "torch":
            raise BackendError(f"a torch model was asked for, not the {spec.backend} backend")
        import torch

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        device = _checked_device(str(spec.device))
        return load_model(spec.model_type, spec.checkpoint, device=device, progress=spec.progress)

    def _auto_candidates(self) -> tuple[dict, str]:
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "backend"}
        return auto_candidates(**settings)


def build_sam_model(model_type: str, checkpoint: str | os.PathLike | None = None):
    """segment-anything's builder: ``model_type`` with fresh weights, or loaded from any
    checkpoint ``load_model`` reads (a state dict, a ``tinysam quantize`` folder, the authors'
    pickled Q-TinySAM); never downloads."""
    if checkpoint is None:
        from .build import build_sam_model as fresh

        return fresh(model_type)
    sam, _ = load_model(model_type, checkpoint, download=False, progress=False)
    return sam


def build_sam_vit_t(checkpoint: str | os.PathLike | None = None):
    return build_sam_model("vit_t", checkpoint)


def build_sam_vit_b(checkpoint: str | os.PathLike | None = None):
    return build_sam_model("vit_b", checkpoint)


def build_sam_vit_l(checkpoint: str | os.PathLike | None = None):
    return build_sam_model("vit_l", checkpoint)


def build_sam_vit_h(checkpoint: str | os.PathLike | None = None):
    return build_sam_model("vit_h", checkpoint)


build_sam = build_sam_vit_h

sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}


def load_predictor(backend: str = "torch", **settings) -> PredictorBase:
    """A predictor for ``backend`` (``PredictorSpec(backend, **settings).load()``): ``torch``
    (``checkpoint`` / ``model_type`` / ``device``, as ``load_model``), ``onnx`` or ``openvino``
    (an export made by ``tinysam export`` in ``onnx_dir``, default ``$TINYSAM_ONNX_DIR``; CPU
    only, no torch needed). ``threads``: CPU threads (torch's global setting for the torch
    backend).

    ``auto`` picks among the backends installed that can run what was given: an export folder
    runs on ONNX Runtime or OpenVINO, a checkpoint on torch. The fastest image encoder wins,
    timed once per machine and model and cached (``remeasure`` times again). With both given
    explicitly (one model), the winning engine encodes the images and torch answers the
    prompts."""
    return PredictorSpec(backend, **settings).load()


def auto_candidates(**settings) -> tuple[dict, str]:
    """``backend="auto"``'s candidates for these ``PredictorSpec`` settings (name -> a function
    making the predictor) and the cache key of the model they run. ``$TINYSAM_ONNX_DIR``
    counts only when no checkpoint or model type was named: a checkpoint asked for by name is
    never swapped for another export."""
    spec = PredictorSpec("auto", **settings).checked()
    onnx_dir = spec.onnx_dir if spec.backend == "auto" else None
    torch_spec = replace(spec, backend="torch", onnx_dir=None)
    factories = {}
    if _installed("torch") and (onnx_dir is None or spec.checkpoint is not None):
        factories["torch"] = torch_spec.load
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
                    factories["torch"], onnx_dir, manifest, engines, spec.threads, spec.precision
                )
            )
        else:
            export_spec = replace(spec, checkpoint=None, model_type=None)
            factories.update({name: replace(export_spec, backend=name).load for name, _ in engines})
    if not factories:
        raise BackendError(
            "no backend can run this: pip install 'tinysam[torch]' for checkpoints, "
            "'tinysam[onnx]' for export folders"
        )
    if "torch" in factories and len(factories) > 1:
        from .backend_choice import file_identity

        model_key = (
            f"checkpoint {file_identity(spec.checkpoint)} + export {file_identity(onnx_dir)}"
        )
    elif "torch" in factories:
        model_key = f"checkpoint {spec.model_type or spec.checkpoint or 'default'}"
    else:
        from .backend_choice import export_model_key

        model_key = export_model_key(manifest)
    if spec.precision != "fp32":  # each precision has its own winner
        model_key += f" precision {spec.precision}"
    return factories, model_key


def _torch_with_export_encoders(
    load_torch, onnx_dir, manifest: dict, engines: list[tuple[str, str]], threads: int | None,
    precision: str = "fp32",
) -> dict:  # fmt: skip
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
        encoder = load_encoder(onnx_dir, manifest, engine, threads, precision)
        return SamPredictor(base.model, base.many_prompts, image_encoder=encoder)

    for name, engine in engines:  # (backend name, encoder engine)
        factories[name] = functools.partial(hybrid, engine)
    return factories


def _checked_device(name: str):
    from .devices import DeviceError, torch_device

    try:
        return torch_device(name)
    except DeviceError as err:
        raise BackendError(str(err)) from None


def installed_backends() -> list[str]:
    """The backends this installation can run (besides ``auto``), in ``BACKENDS`` order."""
    engines = {
        "torch": ("torch",),
        "onnx": ("onnxruntime",),
        "openvino": ("onnxruntime", "openvino"),
    }
    return [b for b in BACKENDS[1:] if all(_installed(m) for m in engines[b])]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _threads(threads: int | None) -> int:
    from .perf import usable_cores

    return threads or usable_cores()


__all__ = [
    "auto_candidates",
    "BACKENDS",
    "BackendError",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "installed_backends",
    "load_model",
    "load_predictor",
    "PredictorSpec",
    "sam_model_registry",
]
