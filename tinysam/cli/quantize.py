"""``tinysam quantize``: calibrate, search the scales, write the quantized model (tensors +
JSON), the int8 ONNX export and a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, add_model_args, image_folder, model_from_args

EPILOG = """\
examples:
  tinysam quantize --checkpoint tinysam_42.3.pth --calib sa1b_8/ --out q-tinysam/
  tinysam quantize --checkpoint tinysam_42.3.pth --calib imgs/ --out w6a6/ --bits 6
  tinysam quantize --from tinysam_w8a8.pth --out q-published/ --test imgs/ \
      --checkpoint tinysam_42.3.pth    # the authors' Q-TinySAM: convert, int8 ONNX, report
  tinysam segment photo.jpg --checkpoint q-tinysam/ --point 400,300 --out mask.png
  tinysam segment photo.jpg --backend onnx --onnx-dir q-tinysam/onnx --point 400,300 \
      --out mask.png
"""


def register(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="post-training quantization (Q-TinySAM, W8A8): search scales, export int8 ONNX",
        description=(
            "Search the two scales of every matrix multiplication of the image encoder and the "
            "mask decoder on a few calibration images (alternating grid search, Hessian-guided "
            "distance on the task loss KL(masks) + KL(IoUs)), then write OUT/quantized.pt + "
            "OUT/quant.json (the fake-quantized model, int8 weights), OUT/onnx/ (int8 QDQ "
            "model for ONNX Runtime; 8 bits only) and OUT/report.md + report.json (per-layer "
            "errors, mask agreement with the float model). With --from, the authors' published "
            "Q-TinySAM is converted instead: nothing is calibrated."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--calib", type=Path, help="folder of calibration images (unless --from)")
    q.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE",
        help="convert the authors' published Q-TinySAM (tinysam_w8a8.pth) instead of "
        "quantizing: no calibration; OUT gets quant.json + quantized.pt (no pickle), onnx/ "
        "(int8) and, with --test, a report (against the float model when --checkpoint is "
        "given)",
    )
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument("--images", type=int, default=8, help="calibration images used (8, paper)")
    q.add_argument("--bits", type=int, default=8, help="weight and activation bits (8; 2-8)")
    q.add_argument("--weight-bits", type=int, help="weight bits (default: --bits)")
    q.add_argument("--act-bits", type=int, help="activation bits (default: --bits)")
    q.add_argument("--candidates", type=int, default=100, help="grid points per search (100)")
    q.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    q.add_argument("--theta-low", type=float, default=0.01, help="lowest range factor (0.01)")
    q.add_argument("--theta-high", type=float, default=1.2, help="highest range factor (1.2)")
    q.add_argument("--prompts", type=int, default=16, help="grid prompts per image (16)")
    q.add_argument(
        "--rows",
        type=int,
        default=1024,
        help="sampled output positions per layer, shared out over the calibration images "
        "(1024); the search's time grows with it",
    )
    q.add_argument(
        "--no-twin",
        action="store_true",
        help="one scale for post-softmax / post-GELU inputs too (default: two groups, as "
        "the paper)",
    )
    q.add_argument("--test", type=Path, help="images for the report (default: the calibration set)")
    q.add_argument("--test-prompts", type=int, default=16, help="report prompts per image (16)")
    q.add_argument("--no-onnx", action="store_true", help="skip the int8 ONNX export")
    q.add_argument(
        "--activations",
        choices=("uint8", "int8"),
        default="uint8",
        help="ONNX activation type: uint8 (zero point 128, the fast x86 kernels) or int8",
    )
    q.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    add_model_args(q)

    q.set_defaults(run=run_quantize)


UNITS = {"calibrate": "image", "search": "layer"}


def run_quantize(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from ..quant.pipeline import QuantizeSettings, quantize
    from ..quant.search import SearchConfig

    if args.device != "cpu":
        raise UsageError("tinysam quantize runs on the CPU: leave out --device")
    if args.from_file is not None:
        return run_convert(args)
    if args.calib is None:
        raise UsageError(
            "--calib is required: a folder of calibration images (or --from FILE to convert "
            "the authors' Q-TinySAM)"
        )
    for name, value in (("--images", args.images), ("--prompts", args.prompts)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if args.rows < 1:
        raise UsageError("--rows must be at least 1")
    settings = QuantizeSettings(
        weight_bits=args.weight_bits or args.bits,
        act_bits=args.act_bits or args.bits,
        prompts=args.prompts,
        rows=args.rows,
        seed=args.seed,
        search=SearchConfig(
            args.theta_low, args.theta_high, args.candidates, args.rounds, twin=not args.no_twin
        ),
        onnx=not args.no_onnx,
        activations=args.activations,
        test_prompts=args.test_prompts,
    )
    calib_paths = image_folder(args.calib, args.images, "--calib")
    test_paths = image_folder(args.test, None, "--test") if args.test else None
    sam, resolved = model_from_args(args)
    show = sys.stderr.isatty()
    return quantize(
        sam,
        calib_paths,
        args.out,
        settings,
        source=str(resolved.path),
        model_type=args.model,
        test_paths=test_paths,
        progress=lambda it, what: tqdm(it, desc=what, unit=UNITS[what], disable=not show),
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )


def run_convert(args: argparse.Namespace) -> dict:
    """``--from FILE``: the authors' Q-TinySAM converted (``quant.pipeline.convert_published``)."""
    from ..quant.pipeline import convert_published

    if args.calib is not None:
        raise UsageError("--calib has no use with --from: the file holds its own intervals")
    if not args.from_file.is_file():
        raise UsageError(f"--from {args.from_file}: no such file")
    if args.test_prompts < 1:
        raise UsageError("--test-prompts must be at least 1")
    test_paths = image_folder(args.test, None, "--test") if args.test else ()
    float_sam = None
    if args.checkpoint is not None:
        float_sam, _ = model_from_args(args)
        if hasattr(float_sam, "published_layers") or hasattr(float_sam, "quant_config"):
            raise UsageError(
                f"--checkpoint {args.checkpoint} is quantized: give the float model to compare with"
            )
    return convert_published(
        args.from_file,
        args.out,
        float_sam=float_sam,
        test_paths=test_paths,
        test_prompts=args.test_prompts,
        seed=args.seed,
        onnx=not args.no_onnx,
        activations=args.activations,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
