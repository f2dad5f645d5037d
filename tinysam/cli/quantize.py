"""``tinysam quantize``: calibrate, search the scales, write the quantized model (tensors +
JSON), the int8 ONNX export and a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

EPILOG = """\
examples:
  tinysam quantize --checkpoint tinysam_42.3.pth --calib sa1b_8/ --out q-tinysam/
  tinysam quantize --checkpoint tinysam_42.3.pth --calib imgs/ --out w6a6/ --bits 6
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
            "errors, mask agreement with the float model)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--checkpoint", type=Path, help="float checkpoint (default: as `segment`)")
    q.add_argument("--model", choices=("vit_t", "vit_b", "vit_l", "vit_h"), help="model type")
    q.add_argument("--calib", type=Path, required=True, help="folder of calibration images")
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
        "--rows", type=int, default=512, help="sampled output positions per layer and image (512)"
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
    q.add_argument("--threads", type=int, help="torch CPU threads")

    q.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ..backends import load_model
    from ..io import atomic_write, load_image
    from ..predictor import SamPredictor
    from ..quant.calibrate import collect
    from ..quant.model import prepare, set_deploy
    from ..quant.report import agreement_table, layer_table, mask_agreement
    from ..quant.search import SearchConfig, search_scales
    from ..quant.store import load_quantized, save_quantized
    from .common import UsageError, image_folder

    weight_bits = args.weight_bits or args.bits
    act_bits = args.act_bits or args.bits
    for name, value in (("--images", args.images), ("--prompts", args.prompts)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if args.rows < 1:
        raise UsageError("--rows must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SearchConfig(
        args.theta_low, args.theta_high, args.candidates, args.rounds, twin=not args.no_twin
    )
    calib_paths = image_folder(args.calib, args.images, "--calib")
    test_paths = image_folder(args.test, None, "--test") if args.test else calib_paths
    show = sys.stderr.isatty()
    sam, resolved = load_model(args.model, args.checkpoint, progress=show)
    model_type = args.model or _model_type(sam)
    qmodel = prepare(sam, weight_bits, act_bits)

    start = time.perf_counter()
    calib_images = [load_image(p) for p in calib_paths]
    records = collect(
        qmodel,
        calib_images,
        prompts_per_image=args.prompts,
        rows=args.rows,
        seed=args.seed,
        progress=lambda it: tqdm(it, desc="calibrate", unit="image", disable=not show),
    )
    collected = time.perf_counter() - start
    results = search_scales(
        qmodel,
        records,
        config,
        progress=lambda it: tqdm(it, desc="search", unit="layer", disable=not show),
    )
    del records
    searched = time.perf_counter() - start - collected
    info = {
        "source_checkpoint": str(resolved.path),
        "calibration": {
            "images": [p.name for p in calib_paths],
            "prompts_per_image": args.prompts,
            "prompts": "one-point prompts from the everything grid (32x32)",
            "rows_per_layer_and_image": args.rows,
            "seed": args.seed,
        },
        "search": asdict(config),
        "seconds": {"calibration": round(collected, 1), "search": round(searched, 1)},
    }
    save_quantized(qmodel, args.out, model_type, **info)
    summary = {"out": str(args.out), "layers": len(results), **info["seconds"]}

    onnx_dir = None
    if not args.no_onnx and weight_bits == 8 and act_bits == 8:
        from ..quant.export import export_quantized_onnx

        onnx_dir = args.out / "onnx"
        export_quantized_onnx(qmodel, onnx_dir, model_type, activations=args.activations)
        summary["onnx"] = str(onnx_dir)

    # Report: the model as saved and reloaded (what users get), against the float model.
    reloaded = load_quantized(args.out)
    candidates = {f"W{weight_bits}A{act_bits} simulated": SamPredictor(reloaded)}
    deploy = load_quantized(args.out)
    set_deploy(deploy)
    candidates["deploy mode (as the int8 ONNX model)"] = SamPredictor(deploy)
    if onnx_dir is not None:
        from ..runtime.predictor import OnnxPredictor

        candidates["int8 ONNX Runtime"] = OnnxPredictor(onnx_dir)
    test_images = [load_image(p) for p in test_paths]
    agreement = mask_agreement(
        SamPredictor(sam), candidates, test_images, args.test_prompts, seed=args.seed
    )
    report = {
        "agreement": {
            name: {kind: asdict(a) for kind, a in kinds.items()}
            for name, kinds in agreement.items()
        },
        "test_images": [p.name for p in test_paths],
        "test_is_calibration_set": args.test is None,
        "layers": [r.as_dict() for r in results],
    }
    improved = sum(r.searched_distance < r.minmax_distance for r in results)
    markdown = "\n\n".join(
        [
            f"# Quantization report: {model_type}, W{weight_bits}A{act_bits}",
            "## Masks against the float model\n\n" + agreement_table(agreement),
            f"Test images: {', '.join(report['test_images'])}"
            + (" (the calibration images)" if args.test is None else ""),
            f"## Per layer\n\nThe search beat min-max scales on its objective in {improved} of "
            f"{len(results)} layers (never worse by construction).\n\n" + layer_table(results),
        ]
    )
    with atomic_write(args.out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_write(args.out / "report.md", "w") as f:
        f.write(markdown + "\n")
    summary["agreement"] = {
        name: {kind: round(a.mean_iou, 4) for kind, a in kinds.items()}
        for name, kinds in agreement.items()
    }
    return summary


def _model_type(sam) -> str:
    from ..build import detect_model_type

    return detect_model_type(sam.state_dict()) or "vit_t"
