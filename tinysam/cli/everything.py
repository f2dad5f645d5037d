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
    check_max_pixels,
    one_line,
    predictor_from_args,
    strict_json,
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
    every.set_defaults(run=run_everything, show=show_everything)


def run_everything(args: argparse.Namespace) -> dict:
    from ..everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from ..everything.export import (
        check_no_clobber,
        everything_outputs,
        our_overlays,
        output_names,
    )
    from ..io import remove_stale_parts

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
    if args.points_per_side < 4:
        raise UsageError("--points-per-side must be at least 4")
    check_max_pixels(args)
    names = output_names(images)
    plan = {image: everything_outputs(names[image], args.out, args.overlay) for image in images}
    try:
        check_no_clobber(plan)
    except ValueError as err:
        raise UsageError(f"{err}; choose another --out") from None
    remove_stale_parts(args.out, {p.name for outputs in plan.values() for p in outputs})

    todo = [image for image in images if args.force or not all(p.exists() for p in plan[image])]
    summary = {"images": len(images), "skipped": len(images) - len(todo), "masks": 0}
    if not todo:
        return summary
    predictor = predictor_from_args(args)
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
    if len(todo) == 1:  # one image: say what runs, it can take a while on a CPU
        print(
            f"tinysam everything: {todo[0].name}: {args.mode} mode, "
            f"{args.points_per_side}x{args.points_per_side} grid...",
            file=sys.stderr,
        )
    if len(images) == 1 and len(todo) == 1:
        written = _run_one(generator, todo[0], plan[todo[0]], args, summary)
        return summary if written is None else {**summary, **written}
    _run_folder(generator, todo, plan, args, summary)
    return summary


def _run_one(generator, image: Path, outputs: list[Path], args, summary: dict) -> dict | None:
    from ..everything.export import write_everything

    written = write_everything(generator, image, outputs, args.mode, args.max_pixels)
    summary["masks"] += written["masks"]
    _warn_if_nothing_passed(summary, args)
    return written


def _run_folder(generator, todo: list[Path], plan, args, summary: dict) -> None:
    """Every image in turn. A bad image (unreadable, too large, a directory, a broken link) is
    reported and skipped; a failed write (disk full) stops the run; the summary says both."""
    from tqdm.auto import tqdm

    from ..everything.export import write_everything
    from ..io import ImageError

    failed = []
    bar = tqdm(todo, unit="image", disable=not sys.stderr.isatty())
    try:
        for image_path in bar:
            bar.set_postfix_str(image_path.name)
            try:
                written = write_everything(
                    generator, image_path, plan[image_path], args.mode, args.max_pixels
                )
            except (ImageError, FileNotFoundError) as err:
                failed.append(image_path.name)
                tqdm.write(
                    f"tinysam everything: skipped {image_path.name}: {one_line(err)}",
                    file=sys.stderr,
                )
                continue
            summary["masks"] += written["masks"]
    except OSError as err:
        summary["stopped"] = one_line(err)
    finally:
        bar.close()
        if failed:
            summary["failed"] = failed
    if len(failed) < len(todo):
        _warn_if_nothing_passed(summary, args)


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
