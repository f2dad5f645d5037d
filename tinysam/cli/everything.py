"""``tinysam everything``: every object in an image or a folder of images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    UsageError,
    add_mask_filter_args,
    add_max_pixels_arg,
    add_model_args,
    add_ray_args,
    check_grid,
    check_max_pixels,
    predictor_spec,
    run_batch,
    strict_json,
    uses_ray,
)


def register(sub) -> None:
    every = sub.add_parser(
        "everything",
        help="segment everything in an image or a folder of images",
        description=(
            "Segment everything: one COCO-RLE JSON per image, NAME.json (and an overlay, "
            "NAME.overlay.png, with --overlay) in OUT; images sharing a name (a.jpg, a.png) "
            "keep their extension (a.jpg.json). A folder is processed with a progress bar; "
            "images whose outputs exist are skipped, so an interrupted run picks up where it "
            "stopped; unreadable images are reported and skipped. Outputs never overwrite an "
            "input, so OUT may be the input folder."
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
    add_mask_filter_args(every)
    every.add_argument("--overlay", action="store_true", help="also write an overlay PNG")
    every.add_argument("--force", action="store_true", help="redo images already done")
    add_max_pixels_arg(every)
    add_model_args(every, backend=True)
    add_ray_args(every)
    every.set_defaults(run=run_everything, show=show_everything)


def run_everything(args: argparse.Namespace) -> dict:
    from ..batch.runner import pending
    from ..everything.outputs import (
        EverythingJob,
        check_no_clobber,
        everything_outputs,
        our_overlays,
        output_names,
    )
    from ..io import ForeignFileError, remove_stale_parts

    on_ray = uses_ray(args)
    if args.input.is_dir():
        images = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if args.out.resolve() == args.input.resolve():
            images = [p for p in images if p not in our_overlays(images)]
        if not images:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
    elif args.input.is_file():
        images = [args.input]
    else:
        raise UsageError(f"input not found: {args.input}")
    check_grid(args.points_per_side, "--points-per-side")
    check_max_pixels(args)
    names = output_names(images)
    plan = {image: everything_outputs(names[image], args.out, args.overlay) for image in images}
    try:
        check_no_clobber(plan)
    except ValueError as err:
        raise UsageError(f"{err}; choose another --out") from None
    remove_stale_parts(args.out, {p.name for outputs in plan.values() for p in outputs})
    job = EverythingJob(
        predictor_spec(args, resolve=on_ray).load,
        {str(image): [str(p) for p in outputs] for image, outputs in plan.items()},
        mode=args.mode,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        max_pixels=args.max_pixels,
    )
    try:
        todo, broken = pending(job, list(job.plan), args.force)
    except ForeignFileError as err:
        raise UsageError(str(err)) from None
    if len(images) == 1 and not on_ray:
        return _run_one(job, images[0], args, todo, broken)
    if on_ray and todo:
        job.make_predictor()  # a bad checkpoint or export fails here, once, not in every worker
    batch = run_batch(job, [str(image) for image in images], args)
    summary = batch.report(
        timing=on_ray,
        per_worker=on_ray,
        masks=sum(result["masks"] for result in batch.results),
    )
    if batch.done:
        _warn_if_nothing_passed(summary, args)
    return summary


def _run_one(job, image: Path, args, todo: list[str], broken: list[str]) -> dict:
    """One image here: its outputs named in the summary; a bad image is the error itself."""
    summary = {"images": 1, "skipped": 0, "masks": 0}
    if not todo:
        return {**summary, "skipped": 1}
    if broken:
        summary["redone"] = [image.name]
        print(
            f"tinysam everything: redoing {image.name}: its earlier output was cut short",
            file=sys.stderr,
        )
    print(
        f"tinysam everything: {image.name}: {args.mode} mode, "
        f"{args.points_per_side}x{args.points_per_side} grid...",
        file=sys.stderr,
    )
    job.setup()
    written = job.run(str(image))
    summary["masks"] = written["masks"]
    _warn_if_nothing_passed(summary, args)
    return {**summary, **written}


def _warn_if_nothing_passed(summary: dict, args) -> None:
    if summary["masks"] == 0 and "stopped" not in summary:
        print(
            f"tinysam everything: 0 masks passed --pred-iou-thresh {args.pred_iou_thresh:g} "
            f"and --stability-thresh {args.stability_thresh:g}; try lower values",
            file=sys.stderr,
        )


def show_everything(summary: dict) -> None:
    """The summary line; images that could not be read, or a stopped run, exit with 2."""
    print(strict_json(summary))
    if summary.get("stopped"):
        raise UsageError(f"stopped: {summary['stopped']}; the images done so far are kept")
    if summary.get("failed"):
        raise UsageError(
            f"{len(summary['failed'])} image(s) could not be read: " + ", ".join(summary["failed"])
        )
