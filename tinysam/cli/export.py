"""``tinysam export``: ONNX graphs and their manifest, for torch-free inference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, add_model_args, load_from_args


def register(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export the model to ONNX (encoder, decoders, manifest) for torch-free inference",
        description=(
            "Write encoder.onnx, decoder.onnx (all 4 mask tokens), decoder_single.onnx (1 mask), "
            "upscale_masks.onnx, decoder_many.onnx and decoder_many_masks.onnx (bulk one-point "
            "prompts, for the everything mode) and tinysam_onnx.json to OUT_DIR. decoder.onnx "
            "and decoder_single.onnx behave as segment-anything's ONNX export (without and with "
            "--return-single-mask). Run them with --backend onnx or "
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
    add_model_args(export, backend=False)
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from ..build import detect_model_type
    from ..runtime.export import (
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
    sam, resolved = load_from_args(args)
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
