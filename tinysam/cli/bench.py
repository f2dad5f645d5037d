"""``tinysam bench``: parameters, FLOPs and encoder/decoder latency per backend."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .common import add_model_args, model_from_args


def register(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="parameters, FLOPs and encoder/decoder latency per backend",
        description=(
            "Count parameters and FLOPs (torch.utils.flop_counter) and time the image encoder "
            "and a one-point decode on torch and, with --onnx-dir, ONNX Runtime (and OpenVINO "
            "if installed), runs alternating between backends. --limits measures the machine "
            "first (GEMM rates, memory bandwidth) and rates each row against it."
        ),
    )
    bench.add_argument(
        "--image", type=Path, help="image to time on (default: a 1024x768 noise image)"
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per backend (5)")
    bench.add_argument("--onnx-dir", type=Path, help="an export made by `tinysam export`")
    bench.add_argument(
        "--limits",
        action="store_true",
        help="first measure the machine (fp32 and int8 GEMM rates, memory bandwidth) and give "
        "each encoder row its percentage of the best fp32 GEMM rate",
    )
    bench.add_argument(
        "--limits-only", action="store_true", help="measure the machine's limits and stop"
    )
    bench.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default), or bf16 rows beside the fp32 ones (torch autocast, OpenVINO's "
        "bf16); with --limits each row is rated against its own precision's GEMM rate. For "
        "int8, give an int8 export as --onnx-dir",
    )
    add_model_args(bench, backend=False)
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> dict:
    from ..evaluation.bench import bench_table, count_costs, measure_latency
    from ..io import load_image
    from ..predictor import SamPredictor
    from .common import UsageError

    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    limits = None
    if args.limits or args.limits_only:
        from ..evaluation.limits import limits_table, measure_limits

        limits = measure_limits(threads=args.threads, repeats=args.repeats)
        print(limits_table(limits))
        if args.limits_only:
            return {"limits": asdict(limits)}
    if args.image is not None:
        image = load_image(args.image)
    else:  # timings do not depend on the content
        image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    sam, _ = model_from_args(args)
    predictors = {"torch": SamPredictor(sam)}
    precisions = {"torch": "fp32"}
    if args.precision == "bf16":
        predictors["torch bf16"] = SamPredictor(sam, precision="bf16")
        precisions["torch bf16"] = "bf16"
    if args.onnx_dir is not None:
        from ..runtime import OnnxPredictor
        from ..runtime.predictor import OnnxModelError, load_manifest

        int8 = "quantization" in load_manifest(args.onnx_dir)
        export = "int8" if int8 else "fp32"
        predictors["onnxruntime"] = OnnxPredictor(args.onnx_dir, threads=args.threads)
        precisions["onnxruntime"] = export
        engines = {"openvino": export}
        if args.precision == "bf16" and not int8:
            engines["openvino bf16"] = "bf16"
        for name, precision in engines.items():
            try:
                predictors[name] = OnnxPredictor(
                    args.onnx_dir, threads=args.threads, encoder_engine="openvino",
                    precision="bf16" if precision == "bf16" else "fp32",
                )  # fmt: skip
                precisions[name] = precision
            except ImportError:
                pass
            except OnnxModelError as err:  # int8 where OpenVINO's int8 is inexact
                print(f"{name} skipped: {err}")
    cost = count_costs(sam)
    latencies = measure_latency(predictors, image, args.repeats, precisions)
    ceilings = None
    if limits is not None:
        ceilings = {p: limits.ceiling(p) for p in ("fp32", "bf16", "int8")}
    print(bench_table(cost, latencies, limits.best_fp32() if limits else None, ceilings))
    result = {"costs": asdict(cost), "latency": [asdict(r) for r in latencies]}
    if limits is not None:
        result["limits"] = asdict(limits)
    return result
