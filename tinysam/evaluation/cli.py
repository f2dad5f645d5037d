"""``tinysam eval instances|clicks|everything`` and ``tinysam bench``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np


def add_eval_parser(sub, parser_class, add_model_args) -> None:
    ev = sub.add_parser(
        "eval",
        help="the paper's evaluations: box-prompted AP, clicks mIoU, everything mode",
        description="Evaluate a model with the paper's protocols.",
    )
    protocols = ev.add_subparsers(dest="protocol", required=True, parser_class=parser_class)

    inst = protocols.add_parser(
        "instances",
        help="zero-shot instance segmentation: detector boxes as prompts, mask AP",
        description=(
            "Prompt the model with every box of a detections file (COCO results format), keep "
            "the mask with the highest predicted IoU, write OUT/results.json and score it with "
            "pycocotools (COCO) or the LVIS API (LVIS ground truth). Each image's masks are "
            "saved as they are made: an interrupted run resumes where it stopped."
        ),
        epilog=(
            "example: tinysam eval instances --annotations instances_val2017.json "
            "--detections coco_instances_results_vitdet.json --images val2017/ --out eval/"
        ),
    )
    inst.add_argument("--annotations", type=Path, required=True, help="COCO or LVIS ground truth")
    inst.add_argument("--detections", type=Path, required=True, help="detector results JSON")
    inst.add_argument("--images", type=Path, required=True, help="folder of the images")
    inst.add_argument("--out", type=Path, required=True, help="output folder")
    inst.add_argument(
        "--single-mask",
        action="store_true",
        help="use the single-mask output instead of the best of three (the paper: best of three)",
    )
    inst.add_argument("--limit", type=int, help="only the first N images (by id)")
    inst.add_argument(
        "--dataset",
        choices=("auto", "coco", "lvis"),
        default="auto",
        help="how to score (default: LVIS if the ground truth has category frequencies)",
    )
    add_model_args(inst, backend=True)

    clicks = protocols.add_parser(
        "clicks",
        help="point-prompt mIoU after 1..N simulated clicks (table and PNG plot)",
        description=(
            "For each ground-truth mask, click at the point farthest from its boundary, then "
            "into the middle of the largest error (positive for missed pixels, negative for "
            "extra ones); mIoU after each click. Writes OUT/clicks.md, .json and .png."
        ),
    )
    clicks.add_argument("--annotations", type=Path, required=True, help="COCO-format masks")
    clicks.add_argument("--images", type=Path, required=True, help="folder of the images")
    clicks.add_argument("--out", type=Path, required=True, help="output folder")
    clicks.add_argument("--clicks", type=int, default=9, help="clicks per mask (9)")
    clicks.add_argument("--max-masks", type=int, help="only the first N masks")
    clicks.add_argument("--min-area", type=int, default=0, help="skip smaller masks (pixels)")
    add_model_args(clicks, backend=True)

    every = protocols.add_parser(
        "everything",
        help="dense grid vs hierarchical everything mode: time, prompts, masks recovered",
        description=(
            "Run both everything modes on each image of a folder; report their times, "
            "decoder prompts and how many dense masks a hierarchical mask matches at IoU >= "
            "--match-iou. Writes OUT/everything.md and .json."
        ),
    )
    every.add_argument("images", type=Path, help="folder of images")
    every.add_argument("--out", type=Path, required=True, help="output folder")
    every.add_argument("--points-per-side", type=int, default=32, help="grid size (32)")
    every.add_argument("--match-iou", type=float, default=0.9, help="match threshold (0.9)")
    every.add_argument(
        "--pred-iou-thresh", type=float, default=0.88, help="keep masks above this IoU (0.88)"
    )
    every.add_argument(
        "--stability-thresh", type=float, default=0.95, help="stability score cutoff (0.95)"
    )
    every.add_argument("--limit", type=int, help="only the first N images")
    add_model_args(every, backend=True)


def add_bench_parser(sub, add_model_args) -> None:
    bench = sub.add_parser(
        "bench",
        help="parameters, FLOPs and encoder/decoder latency per backend",
        description=(
            "Count parameters and FLOPs (torch.utils.flop_counter) and time the image encoder "
            "and a one-point decode on torch and, with --onnx-dir, ONNX Runtime (and OpenVINO "
            "if installed), runs alternating between backends."
        ),
    )
    bench.add_argument(
        "--image", type=Path, help="image to time on (default: a 1024x768 noise image)"
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per backend (5)")
    bench.add_argument("--onnx-dir", type=Path, help="an export made by `tinysam export`")
    add_model_args(bench, backend=False)


def _out_file(path: Path, text: str) -> None:
    from ..io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def run_eval(args: argparse.Namespace, predictor_from_args) -> dict:
    from ..cli import UsageError, image_folder

    for name in ("limit", "max_masks"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.protocol == "instances":
        return _instances(args, predictor_from_args)
    if args.protocol == "clicks":
        if args.clicks < 1:
            raise UsageError("--clicks must be at least 1")
        return _clicks(args, predictor_from_args)
    images = image_folder(args.images, args.limit, "images")
    if args.points_per_side < 4:
        raise UsageError("--points-per-side must be at least 4")
    from .everything import compare_everything, everything_table

    rows = compare_everything(
        predictor_from_args(args),
        images,
        args.points_per_side,
        args.match_iou,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
    )
    table = everything_table(rows)
    _out_file(args.out / "everything.md", table)
    _out_file(args.out / "everything.json", json.dumps([asdict(r) for r in rows], indent=1))
    print(table)
    return {"images": len(rows), "out": str(args.out)}


def _instances(args, predictor_from_args) -> dict:
    from .instances import (
        coco_mask_ap,
        ground_truth,
        image_files,
        is_lvis,
        lvis_mask_ap,
        segment_detections,
    )

    if not args.images.is_dir():
        from ..cli import UsageError

        raise UsageError(f"images {args.images} is not a folder")
    gt = ground_truth(args.annotations)  # a bad file fails before a model is loaded
    lvis = is_lvis(gt) if args.dataset == "auto" else args.dataset == "lvis"
    results = segment_detections(
        predictor_from_args(args),
        gt,
        args.detections,
        args.images,
        args.out,
        single_mask=args.single_mask,
        limit=args.limit,
    )
    ids = sorted(image_files(gt))[: args.limit] if args.limit else None
    del gt  # the scorers read the file their own way
    if lvis:
        metrics = lvis_mask_ap(args.annotations, results, ids)
    else:
        metrics = coco_mask_ap(args.annotations, results, ids)
    summary = {"dataset": "lvis" if lvis else "coco", "results": str(results), **metrics}
    _out_file(args.out / "metrics.json", json.dumps(summary, indent=1))
    return summary


def _clicks(args, predictor_from_args) -> dict:
    from .clicks import plot_curves, point_miou
    from .instances import ground_truth

    gt = ground_truth(args.annotations)  # a bad file fails before a model is loaded
    curve = point_miou(
        predictor_from_args(args),
        gt,
        args.images,
        clicks=args.clicks,
        max_masks=args.max_masks,
        min_area=args.min_area,
    )
    _out_file(args.out / "clicks.md", curve.table())
    _out_file(args.out / "clicks.json", json.dumps(asdict(curve), indent=1))
    plot_curves({"model": curve}, args.out / "clicks.png")
    print(curve.table())
    return {"masks": curve.masks, "miou": [round(v, 4) for v in curve.miou], "out": str(args.out)}


def run_bench(args: argparse.Namespace, load) -> dict:
    from ..cli import UsageError
    from ..io import load_image
    from ..predictor import SamPredictor
    from .bench import bench_table, count_costs, measure_latency

    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.image is not None:
        image = load_image(args.image)
    else:  # timings do not depend on the content
        image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    sam, _ = load(args)
    predictors = {"torch": SamPredictor(sam)}
    if args.onnx_dir is not None:
        from ..runtime import OnnxPredictor

        predictors["onnxruntime"] = OnnxPredictor(args.onnx_dir, threads=args.threads)
        try:
            import openvino  # noqa: F401
        except ImportError:
            pass
        else:
            predictors["openvino"] = OnnxPredictor(
                args.onnx_dir, threads=args.threads, encoder_engine="openvino"
            )
    cost = count_costs(sam)
    latencies = measure_latency(predictors, image, args.repeats)
    print(bench_table(cost, latencies))
    return {"costs": asdict(cost), "latency": [asdict(r) for r in latencies]}
