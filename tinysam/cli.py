"""The ``tinysam`` command.

Every failure a user can cause (a bad argument, a missing or wrong checkpoint, an unreadable
image, a full disk) ends with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .distill.cli import add_distill_parser, run_distill
from .evaluation.cli import add_bench_parser, add_eval_parser, run_bench, run_eval
from .quant.cli import add_quantize_parser, run_quantize
from .serve.cli import add_serve_parser, run_serve

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _numbers(text: str, what: str, counts: Sequence[int]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {_FORMATS[what]}, got {text!r}")
    return values


_FORMATS = {"point": "X,Y or X,Y,LABEL", "box": "X0,Y0,X1,Y1"}


def _point(text: str) -> list[float]:
    values = _numbers(text, "point", (2, 3))
    return values if len(values) == 3 else [*values, 1.0]


def _box(text: str) -> list[float]:
    return _numbers(text, "box", (4,))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinysam",
        description="TinySAM: promptable segmentation that runs fast on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"tinysam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment an object in an image from points and/or a box",
        description=(
            "Segment an object from point and box prompts. Writes the best mask as a PNG "
            "(white = object), optionally an overlay to look at, and prints one JSON line."
        ),
        epilog=(
            "example: tinysam segment photo.jpg --point 365,225 --out mask.png "
            "--overlay overlay.png"
        ),
    )
    seg.add_argument("image", type=Path, help="input image (any format Pillow reads)")
    seg.add_argument(
        "--point",
        type=_point,
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a point in image pixels; LABEL 1 = object (default), 0 = background. Repeatable.",
    )
    seg.add_argument("--box", type=_box, metavar="X0,Y0,X1,Y1", help="a box around the object")
    seg.add_argument("--out", type=Path, required=True, help="where to write the mask PNG")
    seg.add_argument("--overlay", type=Path, help="also write the image with the mask drawn on it")
    seg.add_argument(
        "--single-mask",
        action="store_true",
        help="ask for one mask instead of three candidates (better for unambiguous prompts)",
    )
    seg.add_argument(
        "--all-masks",
        action="store_true",
        help="write every candidate mask, as OUT with a _0, _1, _2 suffix",
    )
    _add_model_args(seg, backend=True)

    info = sub.add_parser(
        "info",
        help="show the model, its size and where its checkpoint came from",
        description="Show the model type, parameter count and where the checkpoint came from.",
    )
    _add_model_args(info)

    every = sub.add_parser(
        "everything",
        help="segment everything in an image or a folder of images",
        description=(
            "Segment everything: one COCO-RLE JSON per image (and an overlay PNG with "
            "--overlay) in OUT. A folder is processed with a progress bar; images whose "
            "outputs exist are skipped, so an interrupted run picks up where it stopped."
        ),
        epilog="example: tinysam everything photos/ --out masks/ --overlay",
    )
    every.add_argument("input", type=Path, help="an image, or a folder of images")
    every.add_argument("--out", type=Path, required=True, help="output folder")
    every.add_argument(
        "--mode",
        choices=("hierarchical", "dense"),
        default="hierarchical",
        help="hierarchical (TinySAM's, ~2x fewer prompts) or dense grid (default: hierarchical)",
    )
    every.add_argument("--points-per-side", type=int, default=32, help="dense grid size (32)")
    every.add_argument(
        "--pred-iou-thresh", type=float, default=0.88, help="keep masks above this IoU (0.88)"
    )
    every.add_argument(
        "--stability-thresh", type=float, default=0.95, help="stability score cutoff (0.95)"
    )
    every.add_argument("--overlay", action="store_true", help="also write an overlay PNG")
    every.add_argument("--force", action="store_true", help="redo images already done")
    _add_model_args(every, backend=True)

    export = sub.add_parser(
        "export",
        help="export the model to ONNX (encoder, decoders, manifest) for torch-free inference",
        description=(
            "Write encoder.onnx, decoder.onnx (3 masks), decoder_single.onnx (1 mask), "
            "decoder_many.onnx and decoder_many_masks.onnx (bulk one-point prompts, for the "
            "everything mode) and "
            "tinysam_onnx.json to OUT_DIR. decoder.onnx and decoder_single.onnx keep "
            "segment-anything's web-demo inputs and outputs. Run them with --backend onnx or "
            "tinysam.runtime.OnnxPredictor (needs only numpy, Pillow and onnxruntime)."
        ),
        epilog="example: tinysam export --out-dir tinysam-onnx/",
    )
    export.add_argument("--out-dir", type=Path, required=True, help="folder to write into")
    export.add_argument(
        "--opset",
        type=int,
        default=20,
        help="ONNX opset, at least 18 (default 20: GELU stays one op, 1.25x faster encoder)",
    )
    _add_model_args(export, backend=False)
    add_distill_parser(sub, _Parser)
    add_quantize_parser(sub)
    add_eval_parser(sub, _Parser, _add_model_args)
    add_bench_parser(sub, _add_model_args)
    add_serve_parser(sub, _add_model_args)
    return parser


def _add_model_args(parser: argparse.ArgumentParser, backend: bool = False) -> None:
    if backend:
        parser.add_argument(
            "--backend",
            choices=("torch", "onnx", "openvino"),
            default="torch",
            help="torch (default); onnx: ONNX Runtime on an export made by `tinysam export` "
            "(see --onnx-dir); openvino: the same with OpenVINO running the image encoder",
        )
        parser.add_argument(
            "--onnx-dir",
            type=Path,
            help="with --backend onnx: the export folder (default: $TINYSAM_ONNX_DIR)",
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


def _load(args: argparse.Namespace):
    import torch

    from .build import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = torch_device(args.device)
    return load_model(args.model, args.checkpoint, device=device, progress=sys.stderr.isatty())


def torch_device(name: str, local_rank: int = 0):
    """``--device``: a torch device that exists here; ``auto`` is this rank's GPU if any."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but this torch build sees no CUDA GPU")
    return device


def _predictor(args: argparse.Namespace):
    """The predictor the arguments ask for: SamPredictor, or OnnxPredictor (no torch needed)."""
    if args.backend in ("onnx", "openvino"):
        import os

        if args.checkpoint is not None or args.model is not None or args.device != "cpu":
            raise UsageError(
                "--checkpoint, --model and --device are for the torch backend; "
                f"--backend {args.backend} runs the export in --onnx-dir on the CPU"
            )
        if args.threads is not None and args.threads < 1:
            raise UsageError("--threads must be at least 1")
        onnx_dir = args.onnx_dir or os.environ.get("TINYSAM_ONNX_DIR")
        if not onnx_dir:
            raise UsageError(
                f"--backend {args.backend} needs --onnx-dir DIR (or $TINYSAM_ONNX_DIR), "
                "a folder written by `tinysam export --out-dir DIR`"
            )
        from .runtime import OnnxPredictor

        engine = "openvino" if args.backend == "openvino" else "onnxruntime"
        return OnnxPredictor(onnx_dir, threads=args.threads, encoder_engine=engine)
    if args.onnx_dir is not None:
        raise UsageError("--onnx-dir is for --backend onnx or openvino")
    from .predictor import SamPredictor

    sam, _ = _load(args)
    return SamPredictor(sam)


def _suffixed(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}_{index}{path.suffix or '.png'}")


def run_segment(args: argparse.Namespace) -> dict:
    from .io import load_image, save_png
    from .visualize import draw_overlay

    if not args.point and args.box is None:
        raise UsageError("give at least one --point or a --box")
    image = load_image(args.image)
    h, w = image.shape[:2]
    for x, y, _ in args.point:
        if not (0 <= x < w and 0 <= y < h):
            raise UsageError(f"point {x:g},{y:g} is outside the {w}x{h} image (X,Y order)")
    predictor = _predictor(args)
    predictor.set_image(image)
    coords = np.array([p[:2] for p in args.point]) if args.point else None
    labels = np.array([p[2] for p in args.point]) if args.point else None
    box = np.array(args.box) if args.box is not None else None
    masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=not args.single_mask)
    best = int(np.argmax(scores))
    if args.all_masks:
        written = [_suffixed(args.out, i) for i in range(len(masks))]
        for mask, path in zip(masks, written):
            save_png(mask, path)
    else:
        written = [args.out]
        save_png(masks[best], args.out)
    result = {
        "image": str(args.image),
        "size": [h, w],
        "scores": [round(float(s), 6) for s in scores],
        "best": best,
        "area": [int(m.sum()) for m in masks],
        "masks": [str(p) for p in written],
    }
    if args.overlay is not None:
        save_png(draw_overlay(image, masks[best], coords, labels, box), args.overlay)
        result["overlay"] = str(args.overlay)
    return result


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def image_folder(folder: Path, limit: int | None = None, what: str = "folder") -> list[Path]:
    """The images of a folder, sorted by name (the first ``limit``); none is an error."""
    if not folder.is_dir():
        raise UsageError(f"{what} {folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths[:limit] if limit else paths


def run_everything(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from .everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from .everything.export import everything_outputs, write_everything

    if args.input.is_dir():
        images = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
    elif args.input.is_file():
        images = [args.input]
    else:
        raise UsageError(f"input not found: {args.input}")
    if args.points_per_side < 4:
        raise UsageError("--points-per-side must be at least 4")

    def done(image: Path) -> bool:
        return all(p.exists() for p in everything_outputs(image, args.out, args.overlay))

    todo = [image for image in images if args.force or not done(image)]
    summary = {"images": len(images), "skipped": len(images) - len(todo), "masks": 0}
    if not todo:
        return summary
    predictor = _predictor(args)
    generator_class = (
        SamHierarchicalMaskGenerator if args.mode == "hierarchical" else SamAutomaticMaskGenerator
    )
    generator = generator_class(
        predictor,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        output_mode="coco_rle",
    )
    bar = tqdm(todo, unit="image", disable=len(todo) == 1 or not sys.stderr.isatty())
    failed = []
    for image_path in bar:
        bar.set_postfix_str(image_path.name)
        try:
            written = write_everything(generator, image_path, args.out, args.mode, args.overlay)
        except ValueError as err:
            if len(todo) == 1:
                raise
            # One unreadable image should not stop a folder; it is reported at the end.
            failed.append(image_path.name)
            tqdm.write(f"tinysam everything: skipped {image_path.name}: {err}", file=sys.stderr)
            continue
        summary["masks"] += written["masks"]
        if len(todo) == 1:
            summary.update(written)
    if failed:
        summary["failed"] = failed
    return summary


def run_export(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from .build import detect_model_type
    from .runtime.export import (
        DECODER_FILES,
        ENCODER_FILE,
        MANIFEST,
        MANY_PROMPT_FILE,
        MANY_PROMPT_MASKS_FILE,
        MIN_OPSET,
        export_onnx,
    )

    if args.opset < MIN_OPSET:
        raise UsageError(f"--opset must be at least {MIN_OPSET} (torch's ONNX exporter)")
    sam, resolved = _load(args)
    model_type = detect_model_type(sam.state_dict())
    files = [ENCODER_FILE, *DECODER_FILES.values(), MANY_PROMPT_FILE]
    written = [*files, MANY_PROMPT_MASKS_FILE, MANIFEST]  # masks graph: with decoder_many
    with tqdm(total=len(files), unit="file", disable=not sys.stderr.isatty()) as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)
            if name != files[0]:
                bar.update()

        export_onnx(sam, args.out_dir, model_type, args.opset, step=step)
        bar.update()
    return {
        "model": model_type,
        "checkpoint": str(resolved.path),
        "opset": args.opset,
        "out_dir": str(args.out_dir),
        "files": {name: (args.out_dir / name).stat().st_size for name in written},
    }


def run_info(args: argparse.Namespace) -> dict:
    from .build import count_parameters, detect_model_type

    sam, resolved = _load(args)
    model_type = detect_model_type(sam.state_dict())

    return {
        "model": model_type,
        "parameters": count_parameters(sam),
        "image_encoder_parameters": count_parameters(sam.image_encoder),
        "prompt_encoder_parameters": count_parameters(sam.prompt_encoder),
        "mask_decoder_parameters": count_parameters(sam.mask_decoder),
        "checkpoint": str(resolved.path),
        "checkpoint_source": resolved.source,
    }


def _print_info(info: dict) -> None:
    sources = {
        "argument": "--checkpoint",
        "environment": "$TINYSAM_CHECKPOINT",
        "cache": "the user cache",
        "download": "downloaded just now",
    }
    print(f"model:       {info['model']}")
    print(
        f"parameters:  {info['parameters'] / 1e6:.2f} M "
        f"(image encoder {info['image_encoder_parameters'] / 1e6:.2f} M, "
        f"prompt encoder {info['prompt_encoder_parameters'] / 1e3:.1f} K, "
        f"mask decoder {info['mask_decoder_parameters'] / 1e6:.2f} M)"
    )
    print(f"checkpoint:  {info['checkpoint']} (from {sources[info['checkpoint_source']]})")


def _one_line(err: Exception) -> str:
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
}


def _missing_extra(err: ImportError) -> str:
    """'needs X: pip install ...' for a missing optional dependency."""
    module = (err.name or "").split(".")[0]
    if module in _EXTRAS:
        return f"this needs {module}: pip install 'tinysam[{_EXTRAS[module]}]'"
    return _one_line(err)


def main(argv: Sequence[str] | None = None) -> int:
    from .perf import tune_allocator

    args = build_parser().parse_args(argv)
    tune_allocator()
    try:
        if args.command == "segment":
            print(json.dumps(run_segment(args)))
        elif args.command == "info":
            _print_info(run_info(args))
        elif args.command == "export":
            print(json.dumps(run_export(args)))
        elif args.command == "quantize":
            print(json.dumps(run_quantize(args)))
        elif args.command == "eval":
            print(json.dumps(run_eval(args, _predictor)))
        elif args.command == "serve":
            run_serve(args, _predictor)
        elif args.command == "bench":
            print(json.dumps(run_bench(args, _load)))
        elif args.command == "distill":
            summary = run_distill(args)
            if summary is not None:
                print(json.dumps(summary))
        elif args.command == "everything":
            summary = run_everything(args)
            print(json.dumps(summary))
            if summary.get("failed"):
                raise UsageError(
                    f"{len(summary['failed'])} image(s) could not be read: "
                    + ", ".join(summary["failed"])
                )
    except KeyboardInterrupt:
        print("tinysam: interrupted", file=sys.stderr)
        return 130
    except ImportError as err:
        print(f"tinysam {args.command}: error: {_missing_extra(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ValueError, OSError) as err:
        message = _one_line(err)
        print(f"tinysam {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
