"""What every ``tinysam`` command shares: the one-line error (exit status 2), argument types,
the model and backend arguments, and turning those arguments into a model or a predictor
(through ``tinysam.backends``). Torch-free, so ``tinysam --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..perf import PRECISIONS

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _numbers(text: str, what: str, counts: Sequence[int]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {FORMATS[what]}, got {text!r}")
    return values


FORMATS = {"point": "X,Y or X,Y,LABEL", "box": "X0,Y0,X1,Y1"}


def point_arg(text: str) -> list[float]:
    values = _numbers(text, "point", (2, 3))
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(
            f"a point's LABEL must be 1 (object) or 0 (background), got {text!r}"
        )
    return values if len(values) == 3 else [*values, 1.0]


def box_arg(text: str) -> list[float]:
    return _numbers(text, "box", (4,))


def add_model_args(parser: argparse.ArgumentParser, backend: bool = False) -> None:
    if backend:
        parser.add_argument(
            "--backend",
            choices=("auto", "torch", "onnx", "openvino"),
            default=default_backend(),
            help="auto (the default where onnxruntime is installed, else torch): an export "
            "folder (--onnx-dir) runs on ONNX Runtime or OpenVINO, whichever encodes faster "
            "here, timed once per machine and cached; a checkpoint runs on torch; both given "
            "compares all three. torch; onnx: ONNX Runtime on an export made by `tinysam "
            "export`; openvino: the same with OpenVINO running the image encoder",
        )
        parser.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="fp32",
            help="fp32 (exact, the default); bf16: the image encoder in bf16 on torch or "
            "OpenVINO (fast on CPUs with AVX512-BF16 or AMX, emulated elsewhere); int8: a "
            "quantized model (a tinysam quantize folder or its int8 --onnx-dir). A note says "
            "where the CPU runs it slowly",
        )
        parser.add_argument(
            "--onnx-dir",
            type=Path,
            help="an export folder, for --backend auto, onnx or openvino "
            "(default: $TINYSAM_ONNX_DIR when no --checkpoint or --model is given)",
        )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint file (default: $TINYSAM_CHECKPOINT, then the cache, then download)",
    )
    parser.add_argument(
        "--model",
        choices=("vit_t", "vit_b", "vit_l", "vit_h"),
        help="model type (default: read from the checkpoint; vit_t when downloading)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads (default: torch's, or one per core for onnx)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)"
    )


def add_mask_filter_args(parser: argparse.ArgumentParser) -> None:
    """The everything mode's two mask filters (segment-anything's defaults)."""
    parser.add_argument(
        "--pred-iou-thresh", type=float, default=0.88, help="keep masks above this IoU (0.88)"
    )
    parser.add_argument(
        "--stability-thresh", type=float, default=0.95, help="stability score cutoff (0.95)"
    )


def check_grid(value: int, flag: str) -> None:
    """An everything-mode grid option (``--points-per-side``, ``--everything-points``) in
    4..``MAX_POINTS_PER_SIDE``, or a UsageError naming the flag."""
    from ..checks import check_points_per_side

    try:
        check_points_per_side(value, flag, least=4)
    except ValueError as err:
        raise UsageError(str(err)) from None


def add_max_pixels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="refuse images with more pixels than this, before decoding them "
        "(default: $TINYSAM_MAX_PIXELS, else 100 M)",
    )


def check_max_pixels(args: argparse.Namespace) -> None:
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UsageError("--max-pixels must be at least 1")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """Running a many-image job on a Ray cluster (``tinysam[ray]``)."""
    group = parser.add_argument_group("many machines (Ray; pip install 'tinysam[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray: a local cluster, or the one $RAY_ADDRESS names",
    )
    group.add_argument(
        "--ray-address", metavar="ADDR", help="run on the Ray cluster at ADDR (e.g. HOST:6379)"
    )
    group.add_argument(
        "--workers", type=int, default=1, help="Ray actors, each holding one model (1)"
    )
    group.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray actor (0)")
    group.add_argument(
        "--ray-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="time to start or join the cluster before giving up with an error (120)",
    )


def uses_ray(args: argparse.Namespace) -> bool:
    """Whether the run goes to Ray; if so, Ray must be installed (checked before any work)."""
    if not (args.ray or args.ray_address):
        return False
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'tinysam[ray]'") from None
    if args.workers < 1 or args.gpus_per_worker < 0 or not args.ray_timeout > 0:
        raise UsageError(
            "--workers must be at least 1, --gpus-per-worker not negative and --ray-timeout "
            "positive"
        )
    return True


def run_batch(job, items: list[str], args: argparse.Namespace):
    """``job`` over ``items``: on Ray when asked (``--threads`` CPUs per worker), else here.
    An output path holding a file tinysam did not write is a UsageError before any work."""
    from ..batch import run_local, run_ray
    from ..batch.runner import ClusterError
    from ..io import ForeignFileError

    try:
        if not uses_ray(args):
            return run_local(job, items, force=args.force)
        return run_ray(
            job,
            items,
            address=args.ray_address,
            workers=args.workers,
            threads=args.threads or 1,
            gpus=args.gpus_per_worker,
            force=args.force,
            start_seconds=args.ray_timeout,
        )
    except (ForeignFileError, ClusterError) as err:
        raise UsageError(str(err)) from None


def model_from_args(args: argparse.Namespace):
    """``(Sam, ResolvedCheckpoint)`` for the model arguments (``PredictorSpec.load_model``)."""
    from ..backends import PredictorSpec

    return PredictorSpec.from_args(args).load_model()


def default_backend() -> str:
    """``auto`` where ONNX Runtime is installed (an export can then compete), else ``torch``."""
    import importlib.util

    return "auto" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def predictor_from_args(args: argparse.Namespace):
    """The predictor the arguments ask for: SamPredictor, or OnnxPredictor (no torch needed)
    for ``--backend onnx|openvino``."""
    return predictor_spec(args).load()


def predictor_spec(args: argparse.Namespace, resolve: bool = False):
    """The arguments' ``backends.PredictorSpec``, checked; its ``load`` is picklable, so Ray
    workers can each make their own predictor. With ``resolve``, the once-per-job work
    (finding the checkpoint, ``auto``'s choice) is done now and the workers only load."""
    from ..backends import PredictorSpec

    spec = PredictorSpec.from_args(args)
    return spec.resolve() if resolve else spec


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def image_folder(folder: Path, limit: int | None = None, what: str = "folder") -> list[Path]:
    """The images of a folder, sorted by name (the first ``limit``); none is an error."""
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths[:limit] if limit else paths


def one_line(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror if err.filename is None else f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return text.splitlines()[0]


# The extra that brings each optional module.
_EXTRAS = {
    "torch": "torch",
    "onnxruntime": "onnx",
    "openvino": "openvino",
    "onnx": "export",
    "onnxscript": "export",
    "yaml": "train",
    "scipy": "eval",
    "matplotlib": "eval",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "ray": "ray",
    "label_studio_sdk": "label-studio",
    "label_studio_converter": "label-studio",
}


def missing_extra(err: ImportError) -> str:
    """'needs X: pip install ...' for a missing optional dependency."""
    module = (err.name or "").split(".")[0]
    if module in _EXTRAS:
        return f"this needs {module}: pip install 'tinysam[{_EXTRAS[module]}]'"
    return one_line(err)


def print_json(result) -> None:
    if result is not None:
        print(strict_json(result))


def strict_json(result, **options) -> str:
    """JSON without NaN/Infinity (which JSON does not have): a non-finite number is an error."""
    try:
        return json.dumps(result, allow_nan=False, **options)
    except ValueError:
        raise UsageError(
            "the result holds NaN or infinite numbers, which JSON cannot carry; the model's "
            "outputs are not finite (damaged weights?)"
        ) from None


def out_file(path: Path, text: str) -> None:
    """Write a report file atomically."""
    from ..io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)
