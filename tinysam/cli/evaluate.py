"""``tinysam eval instances|clicks|everything``: the paper's protocols."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import Parser, add_mask_filter_args, add_model_args, out_file, predictor_from_args


def register(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="the paper's evaluations: box-prompted AP, clicks mIoU, everything mode",
        description="Evaluate a model with the paper's protocols.",
    )
    protocols = ev.add_subparsers(dest="protocol", required=True, parser_class=Parser)

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
    add_mask_filter_args(every)
    every.add_argument("--limit", type=int, help="only the first N images")
    add_model_args(every, backend=True)

    ev.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> dict:
    from .common import UsageError, check_grid, image_folder

    for name in ("limit", "max_masks"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.protocol == "instances":
        return _instances(args)
    if args.protocol == "clicks":
        if args.clicks < 1:
            raise UsageError("--clicks must be at least 1")
        return _clicks(args)
    images = image_folder(args.images, args.limit, "images")
    check_grid(args.points_per_side, "--points-per-side")
    from ..evaluation.hierarchical_vs_dense import compare_everything, everything_table

    rows = compare_everything(
        predictor_from_args(args),
        images,
        args.points_per_side,
        args.match_iou,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
    )
    table = everything_table(rows)
    out_file(args.out / "everything.md", table)
    out_file(args.out / "everything.json", json.dumps([asdict(r) for r in rows], indent=1))
    print(table)
    return {"images": len(rows), "out": str(args.out)}


def _instances(args) -> dict:
    from ..evaluation.instances import (
        coco_mask_ap,
        ground_truth,
        image_files,
        is_lvis,
        lvis_mask_ap,
        segment_detections,
    )

    if not args.images.is_dir():
        from .common import UsageError

        raise UsageError(f"images {args.images} is not a folder")
    gt = ground_truth(args.annotations)  # a bad file fails before a model is loaded
    lvis = is_lvis(gt) if args.dataset == "auto" else args.dataset == "lvis"
    results = segment_detections(
        lambda: predictor_from_args(args),  # made once the files are checked
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
    out_file(args.out / "metrics.json", json.dumps(summary, indent=1))
    return summary


def _clicks(args) -> dict:
    from ..evaluation.clicks import plot_curves, point_miou
    from ..evaluation.instances import ground_truth

    gt = ground_truth(args.annotations)  # a bad file fails before a model is loaded
    if not args.images.is_dir():
        from .common import UsageError

        raise UsageError(f"images {args.images} is not a folder")
    curve = point_miou(
        predictor_from_args(args),
        gt,
        args.images,
        clicks=args.clicks,
        max_masks=args.max_masks,
        min_area=args.min_area,
    )
    out_file(args.out / "clicks.md", curve.table())
    out_file(args.out / "clicks.json", json.dumps(asdict(curve), indent=1))
    plot_curves({"model": curve}, args.out / "clicks.png")
    print(curve.table())
    return {"masks": curve.masks, "miou": [round(v, 4) for v in curve.miou], "out": str(args.out)}
