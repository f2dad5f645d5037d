"""``tinysam export``: ONNX graphs and their manifest, for torch-free inference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError, add_model_args, model_from_args


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
        epilog=(
            "examples: tinysam export --out-dir tinysam-onnx/ | tinysam export --format "
            "x-anylabeling --out-dir xal/ (then X-AnyLabeling: Load Custom Model, pick "
            "xal/tinysam_vit_t.yaml) | tinysam export --format cvat --out-dir cvat-fn/ (a "
            "nuclio function folder and CVAT's browser decoder)"
        ),
    )
    export.add_argument("--out-dir", type=Path, required=True, help="folder to write into")
    export.add_argument(
        "--format",
        choices=("tinysam", "x-anylabeling", "cvat"),
        default="tinysam",
        help="tinysam (default): our ONNX export; x-anylabeling: the encoder, decoder and model "
        "YAML X-AnyLabeling/AnyLabeling load as a Segment Anything model; cvat: a serverless "
        "interactor (function.yaml, main.py, checkpoint) and the decoder.onnx CVAT's SAM "
        "plug-in runs in the browser",
    )
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
    from ..runtime.contract import (
        DECODER_FILES,
        ENCODER_FILE,
        MANIFEST,
        MANY_PROMPT_FILE,
        MANY_PROMPT_MASKS_FILE,
    )
    from ..runtime.onnx_export import MIN_OPSET, export_onnx

    if args.opset < MIN_OPSET:
        raise UsageError(f"--opset must be at least {MIN_OPSET} (torch's ONNX exporter)")
    sam, resolved = model_from_args(args)
    if hasattr(sam, "quant_config"):  # a folder tinysam quantize wrote (or converted)
        raise UsageError(
            f"{resolved.path} is a quantized model: its int8 ONNX model is the onnx/ folder "
            "that tinysam quantize wrote beside it"
        )
    if hasattr(sam, "published_layers"):
        raise UsageError(
            f"{resolved.path} is the authors' Q-TinySAM: `tinysam quantize --from "
            f"{resolved.path} --out DIR` writes its int8 ONNX model (DIR/onnx)"
        )
    model_type = detect_model_type(sam.state_dict())
    if args.format != "tinysam":
        return _export_for_tool(args, sam, model_type, resolved.path)
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


def _export_for_tool(args: argparse.Namespace, sam, model_type: str, checkpoint) -> dict:
    if args.format == "x-anylabeling":
        from ..integrations.anylabeling import export_anylabeling

        paths = export_anylabeling(sam, args.out_dir, model_type, args.opset)
    else:
        from ..integrations.cvat import export_cvat

        paths = export_cvat(sam, args.out_dir, model_type, args.opset, checkpoint)
    return {
        "format": args.format,
        "model": model_type,
        "checkpoint": str(checkpoint),
        "out_dir": str(args.out_dir),
        "files": {path.name: path.stat().st_size for path in paths.values()},
    }
