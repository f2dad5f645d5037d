"""``OnnxPredictor``: ``SamPredictor``'s API on ONNX Runtime, with numpy, Pillow and nothing else.

Needs an export made by ``tinysam export`` (a directory with ``tinysam_onnx.json``). Inputs go
through the same checks as ``SamPredictor`` (``tinysam.checks``). ``predict_torch`` takes and
returns torch tensors when given them, numpy arrays otherwise, so the everything generators run
on this backend unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import NOT_A_POINT, check_prompt_batch
from ..formats import FormatError, field, is_int, numbers, plain_file_name
from ..perf import usable_cores
from ..predictor_base import (
    DEFAULT_MANY_PROMPTS,
    MANY_PROMPT_CHUNK,
    PredictorBase,
    release_encoder_memory,
)
from .contract import FORMAT_VERSION, MANIFEST

BOX_LABELS = (2.0, 3.0)
# Batches of one-point prompts of at least ``many_prompts`` asking for low-res masks only go
# through decoder_many.onnx (1.8x faster per prompt), MANY_PROMPT_CHUNK prompts per run.


class OnnxModelError(ValueError):
    """A missing, partial or foreign ONNX export directory (one line saying what to do)."""


# x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply u8 x s8 in pairs that saturate at
# int16: an activation near its range times weights near +-127 comes out wrong (the embedding of
# a W8A8 TinySAM moved by 17% on an AVX2 EPYC). This setting makes ONNX Runtime use its u8 x u8
# kernels there (about 8% slower on the encoder). It is set only there (``perf.
# int8_products_saturate``): with VNNI or AMX the u8 x s8 kernels are exact, and the setting
# still forced the u8 x u8 ones, 1.3x slower on a Sapphire Rapids.
X64_QUANT_PRECISION = "session.x64quantprecision"


def session_options(threads: int | None = None, quantized: bool = False, shared_arena: bool = True):
    """ONNX Runtime options for a CPU: all graph optimisations, one thread per core.
    ``quantized``: an int8 graph (see ``X64_QUANT_PRECISION``). ``shared_arena``: see
    ``use_shared_arena``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if shared_arena:
        use_shared_arena(options)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise
    # Idle pool threads would spin after each run, stealing the cores from whatever the caller
    # does next (numpy post-processing, torch); the encoder is no slower without it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quantized:
        from ..perf import int8_products_saturate

        if int8_products_saturate():
            options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return options


_SHARED_ARENA_REGISTERED = False


def use_shared_arena(options) -> None:
    """Make a session allocate from one CPU arena shared by the process's sessions, grown by
    what is asked (not by powers of two), without per-graph memory patterns.

    A session's own arena keeps its peak while the session lives, and grows in doublings:
    the encoder's activations (about 300 MB at 1024x1024) stayed reserved while the
    many-prompt decoder grew its own 700 MB, and everything mode peaked at 1.46 GB on an
    1800x1200 photo. Shared, the decoders reuse the encoder's blocks: 0.76 GB
    (benchmarks/everything.py --memory-image), for an encoder about 3% slower (no memory
    pattern) and a decoder as fast. The shared arena lives as long as the process.
    """
    global _SHARED_ARENA_REGISTERED
    import onnxruntime as ort

    if not _SHARED_ARENA_REGISTERED:
        same_as_requested = 1  # OrtArenaExtendStrategy::kSameAsRequested
        config = ort.OrtArenaCfg(0, same_as_requested, -1, -1)
        cpu = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        try:
            ort.create_and_register_allocator(cpu, config)
        except Exception:  # some versions refuse a second one (the caller's): share that
            pass
        _SHARED_ARENA_REGISTERED = True
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = False


# ONNX Runtime fuses MatMul + bias Add into a float Gemm before its QDQ fusions look at the
# MatMul, which then never becomes an integer product: int8 graphs run with that fusion off.
# Its QDQ propagation copies a quantized convolution's Q/DQ pair across every Reshape and
# Transpose after it, where the float value goes on to a LayerNorm and a residual Add: in our
# W8A8 encoder it added 20 QuantizeLinear, 33 DequantizeLinear and 7 Transpose passes over
# full activations, for no integer kernel more; off, the same integer kernels run, the
# outputs are bit for bit equal, and the encoder was 3-4% faster (AMD EPYC, AVX2, 2 threads).
INT8_DISABLED_OPTIMIZERS = ["MatMulAddFusion", "QDQPropagationTransformer"]


def disabled_optimizers(quantized: bool) -> list[str]:
    return list(INT8_DISABLED_OPTIMIZERS) if quantized else []


def load_manifest(model_dir: str | os.PathLike) -> dict:
    """Read and check ``tinysam_onnx.json``; every file it names must be there."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise OnnxModelError(
            f"ONNX model directory not found: {model_dir}; create one with "
            f"`tinysam export --out-dir {model_dir}`"
        )
    if not path.is_file():
        raise OnnxModelError(
            f"{model_dir} is not a tinysam ONNX export (no {MANIFEST}); "
            f"create one with `tinysam export --out-dir {model_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxModelError(f"{path} is unreadable ({err}); export again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "tinysam-onnx":
        raise OnnxModelError(f"{path} is not a tinysam ONNX manifest; export again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise OnnxModelError(
            f"{model_dir} was exported by an older tinysam (format version "
            f"{manifest.get('format_version')}, this one reads {FORMAT_VERSION}: its decoders "
            "now follow segment-anything's ONNX contract); export again with `tinysam export`"
        )
    try:
        files = _manifest_files(manifest, str(path))
    except FormatError as err:
        raise OnnxModelError(f"{err}; export again with `tinysam export`") from None
    missing = [name for name in files if not (model_dir / name).is_file()]
    if missing:
        raise OnnxModelError(
            f"{model_dir} lacks {', '.join(missing)}; export again with `tinysam export`"
        )
    return manifest


def _manifest_files(manifest: dict, where: str) -> list[str]:
    """Check every field the predictor reads; return the files the manifest names."""
    field(manifest, "image_size", "an integer", where)
    if field(manifest, "image_format", "a string", where) not in ("RGB", "BGR"):
        raise FormatError(f"{where}: image_format must be RGB or BGR")
    field(manifest, "mask_threshold", "a finite number", where)
    numbers(field(manifest, "pixel_mean", "a list", where), 3, where, "pixel_mean")
    numbers(field(manifest, "pixel_std", "a list", where), 3, where, "pixel_std")
    files = [
        plain_file_name(
            field(manifest, "encoder", "an object", where).get("file"), where, "encoder.file"
        )
    ]
    decoders = field(manifest, "decoders", "an object", where)
    field(decoders, "multimask", "an object", where, "decoders.")
    for name in decoders:
        files.append(
            plain_file_name(
                field(decoders, name, "an object", where, "decoders.").get("file"),
                where,
                f"decoders.{name}.file",
            )
        )
    inputs = field(decoders["multimask"], "inputs", "an object", where, "decoders.multimask.")
    mask_input = field(inputs, "mask_input", "a list", where, "decoders.multimask.inputs.")
    if len(mask_input) != 4 or not all(is_int(v) for v in mask_input[2:]):
        raise FormatError(f"{where}: decoders.multimask.inputs.mask_input must be [B, 1, H, W]")
    upscale = field(manifest, "upscale", "an object", where)
    files.append(plain_file_name(upscale.get("file"), where, "upscale.file"))
    many = field(manifest, "many_prompt_decoder", "an object", where, default=None)
    if many is not None:
        files.append(plain_file_name(many.get("file"), where, "many_prompt_decoder.file"))
        files.append(
            plain_file_name(many.get("masks_file"), where, "many_prompt_decoder.masks_file")
        )
    return files


ENCODER_ENGINES = ("onnxruntime", "openvino")


class OnnxPredictor(PredictorBase):
    """Encode an image once with ``encoder.onnx``, then answer prompts with the decoders.

    ``encoder_engine="openvino"`` runs the encoder with OpenVINO in float32 instead (about 10%
    faster on AVX-512 CPUs; ``pip install openvino``); the decoders stay on ONNX Runtime.
    ``predict`` and ``predict_torch`` answer as ``SamPredictor`` does (3 masks, or mask token 0
    for ``multimask_output=False``) through ``decoder.onnx``, which returns all four tokens.
    """

    device = "cpu"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        threads: int | None = None,
        providers: list[str] | None = None,
        encoder_engine: str = "onnxruntime",
        many_prompts: int = DEFAULT_MANY_PROMPTS,
        precision: str = "fp32",
    ) -> None:
        _check_engine(encoder_engine)
        _require_onnxruntime()
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.precision = precision
        if precision == "int8" and "quantization" not in self.manifest:
            raise OnnxModelError(
                f"--precision int8 needs an int8 export; {self.model_dir} is float (make one "
                "with tinysam quantize)"
            )
        if precision == "bf16" and "quantization" in self.manifest:
            raise OnnxModelError(
                f"{self.model_dir} is an int8 export: it runs in int8, not bf16; leave out "
                "--precision bf16"
            )
        self.image_size = int(self.manifest["image_size"])
        self.image_format = self.manifest["image_format"]
        self.mask_threshold = float(self.manifest["mask_threshold"])
        self.mask_input_size = tuple(
            self.manifest["decoders"]["multimask"]["inputs"]["mask_input"][2:]
        )
        self._mean = np.asarray(self.manifest["pixel_mean"], np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.manifest["pixel_std"], np.float32).reshape(3, 1, 1)

        def session(name: str):
            return load_session(self.model_dir / name, self.manifest, threads, providers)

        self.encoder = load_encoder(
            self.model_dir, self.manifest, encoder_engine, threads, precision
        )
        # All four mask tokens: both of SamPredictor's answers are slices of them.
        self.decoder = session(self.manifest["decoders"]["multimask"]["file"])
        self.upscaler = session(self.manifest["upscale"]["file"])
        many = self.manifest.get("many_prompt_decoder")  # int8 exports lack it
        self.many_prompt_decoder = session(many["file"]) if many else None
        self.many_prompt_masks = session(many["masks_file"]) if many else None
        super().__init__(self.image_size, many_prompts)

    # ------------------------------------------------------------------ image

    def _encode(self, resized: np.ndarray, original_size: tuple[int, int]) -> None:
        self.reset_image()
        self.features = self.encoder.run(None, {"image": self.preprocess(resized)})[0]
        self.original_size = tuple(int(v) for v in original_size)
        self.input_size = tuple(resized.shape[:2])
        self.is_image_set = True

    def preprocess(self, resized: np.ndarray) -> np.ndarray:
        """Resized HxWx3 uint8 -> the encoder's input: normalised, zero-padded 1x3xSxS."""
        h, w = resized.shape[:2]
        size = self.image_size
        x = (resized.transpose(2, 0, 1).astype(np.float32) - self._mean) / self._std
        padded = np.zeros((1, 3, size, size), np.float32)
        padded[0, :, :h, :w] = x
        return padded

    # ------------------------------------------------------------------ prompts

    def _prompt_arrays(self, coords, labels, boxes, mask) -> tuple:
        return coords, labels, boxes, mask

    @staticmethod
    def _numpy(value) -> np.ndarray:
        return value

    def predict_torch(
        self,
        point_coords,
        point_labels,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        upscale: bool = True,
        min_iou: float | None = None,
    ) -> tuple[Any, Any, Any]:
        """``PredictorBase.predict_torch``: torch tensors in, torch tensors out; numpy
        otherwise (torch is imported only when given torch tensors)."""
        self._require_image()
        as_torch = any(
            type(a).__module__.split(".")[0] == "torch"
            for a in (point_coords, point_labels, boxes, mask_input)
        )
        coords, labels, mask = self._decoder_prompts(point_coords, point_labels, boxes, mask_input)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        if self._use_many_prompt_decoder(coords, boxes, mask, upscale):
            scores, low_res = self._many_prompts(coords, labels, selected, min_iou)
            return _same_kind(as_torch, (None, scores, low_res))
        feeds = {
            "image_embeddings": self.features,
            "point_coords": coords,
            "point_labels": labels,
            "orig_im_size": np.asarray(self.original_size, np.float32),
        }
        results = []
        # One mask input is shared by a whole batch: prompt sets with their own run one by one.
        # Without "masks" among the outputs, ONNX Runtime skips the graph's upscaling nodes.
        for rows, (mask_rows, has_mask) in _mask_groups(
            mask, coords.shape[0], self.mask_input_size
        ):
            feeds.update(
                point_coords=coords[rows],
                point_labels=labels[rows],
                mask_input=mask_rows,
                has_mask_input=has_mask,
            )
            results.append(self.decoder.run(["iou_predictions", "low_res_masks"], feeds))
        scores, low_res = (np.concatenate(parts)[:, selected] for parts in zip(*results))
        low_res = np.ascontiguousarray(low_res)
        masks = self.upscale_masks(low_res, return_logits) if upscale else None
        return _same_kind(as_torch, (masks, scores, low_res))

    @property
    def embedding_shape(self) -> tuple[int, ...] | None:
        """The decoder's image-embedding input shape (1 x C x H x W), if the export fixes it."""
        for node in self.decoder.get_inputs():
            if node.name == "image_embeddings" and all(isinstance(d, int) for d in node.shape):
                return tuple(node.shape)
        return None

    def _upscale(self, low_res: np.ndarray) -> np.ndarray:
        size = np.asarray(self.original_size, np.float32)
        feeds = {"low_res_masks": np.ascontiguousarray(low_res), "orig_im_size": size}
        return self.upscaler.run(None, feeds)[0]

    def _empty(self, shape: tuple[int, ...], logits: bool) -> np.ndarray:
        return np.empty(shape, np.float32 if logits else bool)

    def _use_many_prompt_decoder(self, coords, boxes, mask, upscale: bool) -> bool:
        one_point = coords.shape[1] == 2 and boxes is None  # the point and the padding
        return (
            self.many_prompt_decoder is not None
            and not upscale
            and mask is None
            and one_point
            and coords.shape[0] >= self.many_prompts
        )

    def _many_prompts(self, coords, labels, selected: slice, min_iou: float | None):
        """IoU predictions and low-res logits through decoder_many*.onnx, in chunks; with
        ``min_iou``, masks only for prompts with a selected score above it (others NaN)."""
        release_encoder_memory(self.encoder)
        size = self.mask_input_size
        scores = np.empty((coords.shape[0], 3 if selected.start else 1), np.float32)
        low_res = np.full((*scores.shape, *size), np.nan, np.float32)
        for start in range(0, coords.shape[0], MANY_PROMPT_CHUNK):
            rows = slice(start, start + MANY_PROMPT_CHUNK)
            iou, *state = self.many_prompt_decoder.run(
                None,
                {
                    "image_embeddings": self.features,
                    "point_coords": coords[rows],
                    "point_labels": labels[rows],
                },
            )
            scores[rows] = iou[:, selected]
            wanted = np.arange(len(iou))
            if min_iou is not None:
                wanted = np.flatnonzero((iou[:, selected] > min_iou).any(axis=1))
                if len(wanted) == 0:
                    continue
            # coeffs, basis and scale are per prompt; the last two state tensors are shared.
            state = [a[wanted] for a in state[:4]] + state[4:]
            names = [i.name for i in self.many_prompt_masks.get_inputs()]
            (logits,) = self.many_prompt_masks.run(None, dict(zip(names, state)))
            low_res[start + wanted] = logits[:, selected]
        return scores, low_res

    def _decoder_prompts(self, point_coords, point_labels, boxes, mask_input):
        """Points and box corners as the decoder's point list (float32), and the mask input."""
        arrays = [
            None if a is None else _as_float32(a)
            for a in (point_coords, point_labels, boxes, mask_input)
        ]
        point_coords, point_labels, boxes, mask_input = arrays
        check_prompt_batch(*arrays, self.mask_input_size, lambda x: bool(np.isfinite(x).all()))
        parts_xy, parts_label = [], []
        if point_coords is not None:
            parts_xy.append(point_coords)
            parts_label.append(point_labels)
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            parts_xy.append(corners)
            parts_label.append(np.broadcast_to(np.float32(BOX_LABELS), corners.shape[:2]))
        if not parts_xy:
            raise ValueError("the ONNX decoder needs at least one point or a box per prompt")
        if boxes is None:
            # Without a box, a padding point ends the list (as SamPredictor's prompt encoder).
            b = point_coords.shape[0]
            parts_xy.append(np.zeros((b, 1, 2), np.float32))
            parts_label.append(np.full((b, 1), NOT_A_POINT, np.float32))
        coords = np.concatenate(parts_xy, axis=1)
        labels = np.concatenate(parts_label, axis=1)
        return coords, labels, mask_input


def _check_engine(engine: str) -> None:
    if engine not in ENCODER_ENGINES:
        raise ValueError(
            f"encoder_engine must be one of {', '.join(ENCODER_ENGINES)}, got {engine!r}"
        )


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError("OnnxPredictor needs onnxruntime: pip install 'tinysam[onnx]'") from err


def load_session(path: Path, manifest: dict, threads: int | None = None, providers=None):
    """An ONNX Runtime session for one graph of the export ``manifest`` describes."""
    import onnxruntime as ort

    quantized = "quantization" in manifest
    try:
        return ort.InferenceSession(
            str(path),
            session_options(threads, quantized),
            providers=providers or ["CPUExecutionProvider"],
            disabled_optimizers=disabled_optimizers(quantized),
        )
    except Exception as err:  # onnxruntime raises its own untyped errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OnnxModelError(f"cannot load {path}: {first}; export again") from err


def load_encoder(
    model_dir: str | os.PathLike,
    manifest: dict | None = None,
    engine: str = "onnxruntime",
    threads: int | None = None,
    precision: str = "fp32",
):
    """The export's image encoder alone, on ``engine``: ``run(None, {"image": x})`` ->
    [embedding]. For a torch model that encodes with an export (``SamPredictor``'s
    ``image_encoder``) without loading the export's decoders. ``precision="bf16"`` compiles
    OpenVINO's encoder in bf16; ONNX Runtime has no bf16 CPU kernels and runs fp32."""
    _check_engine(engine)
    _require_onnxruntime()
    manifest = manifest if manifest is not None else load_manifest(model_dir)
    path = Path(model_dir) / manifest["encoder"]["file"]
    if engine == "openvino":
        quantized = "quantization" in manifest
        return OpenVinoEncoder(path, threads or usable_cores(), quantized, bf16=precision == "bf16")
    return load_session(path, manifest, threads)


class OpenVinoEncoder:
    """``encoder.onnx`` compiled by OpenVINO for the CPU, in float32 unless ``bf16`` (OpenVINO
    would pick bf16 on CPUs that have it, which moves the embedding by ~1e-2). Runs like an ONNX
    Runtime session: ``run(None, {"image": x})`` -> [embedding].

    An int8 graph (``quantized``) is refused on x86 CPUs without VNNI: OpenVINO's int8
    kernels there saturate u8 x s8 pairs at int16 and have no exact mode (the W8A8 TinySAM
    embedding moved by 15%, against 3% on ONNX Runtime, on an AVX2 EPYC)."""

    def __init__(
        self, path: Path, threads: int, quantized: bool = False, bf16: bool = False
    ) -> None:
        from ..perf import int8_products_saturate

        if quantized and int8_products_saturate():
            raise OnnxModelError(
                f"OpenVINO's int8 kernels saturate on this CPU (x86 without VNNI) and would "
                f"move {path.name}'s results; run this int8 export with --backend onnx"
            )
        try:
            import openvino as ov
        except ImportError as err:
            raise ImportError(
                "the openvino encoder needs openvino: pip install 'tinysam[openvino]'"
            ) from err
        self.precision_hint = "bf16" if bf16 else "f32"  # OpenVINO keeps f32 without bf16 units
        config = {
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as err:  # OpenVINO raises its own untyped errors
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise OnnxModelError(f"OpenVINO cannot load {path}: {first}") from err
        self.request = self.compiled.create_infer_request()
        self._holds_activations = False

    def run(self, outputs, feeds: dict) -> list[np.ndarray]:
        result = self.request.infer({0: feeds["image"]})
        self._holds_activations = True
        return [np.array(result[self.compiled.output(0)])]

    def release_memory(self) -> None:
        """Free the activation buffers OpenVINO keeps between runs (about 145 MB at
        1024x1024): the everything mode's decoder needs the room more than the next image
        needs the speed (the next run allocates them again, about 3% slower)."""
        if self._holds_activations:
            self.compiled.release_memory()
            self._holds_activations = False


def _same_kind(as_torch: bool, arrays: tuple) -> tuple:
    """Torch tensors if the caller passed torch tensors (torch is imported only then)."""
    if not as_torch:
        return arrays
    import torch

    return tuple(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _as_float32(value) -> np.ndarray:
    """A float32 numpy view of an array or a (CPU or GPU) torch tensor."""
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _mask_groups(mask: np.ndarray | None, batch: int, size: tuple[int, int]):
    """(rows, (mask_input 1x1xHxW, has_mask_input [1])) per decoder run: prompts without a
    mask ``MANY_PROMPT_CHUNK`` at a time (the graph copies the embedding for each)."""
    if mask is None:
        empty = np.zeros((1, 1, *size), np.float32), np.zeros(1, np.float32)
        for start in range(0, batch, MANY_PROMPT_CHUNK):
            yield slice(start, start + MANY_PROMPT_CHUNK), empty
        return
    for i in range(batch):
        yield slice(i, i + 1), (mask[i : i + 1], np.ones(1, np.float32))
