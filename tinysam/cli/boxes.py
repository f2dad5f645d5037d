"""``tinysam boxes``: a mask for every box of a COCO detections or annotations file."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    UsageError,
    add_max_pixels_arg,
    add_model_args,
    add_ray_args,
    check_max_pixels,
    predictor_spec,
    run_batch,
    uses_ray,
)


def register(sub) -> None:
    boxes = sub.add_parser(
        "boxes",
        help="masks for the boxes of a COCO detections or annotations file (auto-annotation)",
        description=(
            "Prompt the model with every box of BOXES (a COCO results list of detections, "
            "or a COCO annotations file whose annotations have a bbox) and write the COCO "
            "results with masks to OUT/results.json (one OUT/parts/<image_id>.json per "
            "image first, so an interrupted run resumes). The best of the three masks by "
            "predicted IoU, or --single-mask."
        ),
        epilog=(
            "example: tinysam boxes detections.json --annotations instances_val2017.json "
            "--images val2017/ --out masks/ --ray --workers 4"
        ),
    )
    boxes.add_argument("boxes", type=Path, help="COCO detections (a list) or annotations file")
    boxes.add_argument(
        "--annotations",
        type=Path,
        help="the COCO annotations file naming the images (not needed if BOXES is one)",
    )
    boxes.add_argument("--images", type=Path, required=True, help="the images folder")
    boxes.add_argument("--out", type=Path, required=True, help="output folder")
    boxes.add_argument("--single-mask", action="store_true", help="the single-mask output")
    boxes.add_argument("--min-score", type=float, default=0.0, help="skip weaker detections")
    boxes.add_argument("--force", action="store_true", help="redo images already done")
    add_max_pixels_arg(boxes)
    add_model_args(boxes, backend=True)
    add_ray_args(boxes)
    boxes.set_defaults(run=run_boxes, show=show_boxes)


def run_boxes(args: argparse.Namespace) -> dict:

    from ..evaluation.instances import (
        PARTS,
        BoxesJob,
        check_detection_images,
        check_run_settings,
        detections_from_annotations,
        ground_truth,
        image_files,
        load_detections,
        merge_parts,
    )
    from ..io import DONE, output_state, remove_stale_parts

    on_ray = uses_ray(args)
    check_max_pixels(args)
    if not args.images.is_dir():
        raise UsageError(f"images {args.images} is not a folder")
    try:
        first = args.boxes.open("rb").read(1) if args.boxes.is_file() else b""
    except OSError as err:
        raise UsageError(f"cannot read {args.boxes}: {err.strerror}") from None
    if first.strip() == b"{" or (args.annotations is None and first != b"["):
        gt = ground_truth(args.boxes)  # an annotations file: its boxes, its images
        detections = detections_from_annotations(gt)
    else:
        if args.annotations is None:
            raise UsageError("BOXES is a detections list: give --annotations to name the images")
        gt = ground_truth(args.annotations)
        detections = load_detections(args.boxes, args.min_score)
    files = image_files(gt)
    check_detection_images(detections, files, args.boxes.name)
    ids = sorted(files)
    check_run_settings(args.out, {"boxes": args.boxes.name, "single_mask": args.single_mask})
    job = BoxesJob(
        predictor_spec(args, resolve=on_ray).load,
        str(args.images.resolve() if on_ray else args.images),
        {i: files[i] for i in ids},
        {i: detections.get(i, []) for i in ids},
        str(args.out.resolve() if on_ray else args.out),
        args.single_mask,
        args.max_pixels,
    )
    remove_stale_parts(args.out / PARTS, {job.outputs(str(i))[0].name for i in ids})
    if on_ray:
        job.make_predictor()  # a bad checkpoint or export fails here, once
    batch = run_batch(job, [str(i) for i in ids], args)
    summary = batch.report(
        lambda item: files[int(item)],
        per_worker=on_ray,
        masks=sum(r["masks"] for r in batch.results),
    )
    done = [i for i in ids if output_state(job.outputs(str(i))[0]) == DONE]
    summary["results"] = str(merge_parts(args.out, done))
    summary["results_images"] = len(done)
    return summary


def show_boxes(summary: dict) -> None:
    from .everything import show_everything

    show_everything(summary)
