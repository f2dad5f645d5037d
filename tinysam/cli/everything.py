"""``tinysam everything``: every object in an image or a folder of images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    UsageError,
    add_mask_filter_args,
    add_model_args,
    predictor_from_args,
)


def register(sub) -> None:
    every = sub.add_parser(
        "everything",
        help="segment everything in an image or a folder of images",
        description=(
            "Segment everything: one COCO-RLE JSON per image (and an overlay PNG with "
            "--overlay) in OUT. A folder is processed with a progress bar; images whose "
            "outputs exist are skipped, so an interrupted run picks up where it stopped."
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
    add_model_args(every, backend=True)
    every.set_defaults(run=run_everything, show=show_everything)


def run_everything(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from ..everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from ..everything.export import everything_outputs, write_everything

    if args.input.is_dir():
        images = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
    elif args.input.is_file():
        images = [args.input]
    else:
        raise UsageError(f"input not found: {args.input}")
    if args.points_per_side < 4:
        raise UsageError("--points-per-side must be at least 4")

    def done(image: Path) -> bool:
        return all(p.exists() for p in everything_outputs(image, args.out, args.overlay))

    todo = [image for image in images if args.force or not done(image)]
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
    bar = tqdm(todo, unit="image", disable=len(todo) == 1 or not sys.stderr.isatty())
    failed = []
    for image_path in bar:
        bar.set_postfix_str(image_path.name)
        try:
            written = write_everything(generator, image_path, args.out, args.mode, args.overlay)
        except ValueError as err:
            if len(todo) == 1:
                raise
            # One unreadable image should not stop a folder; it is reported at the end.
            failed.append(image_path.name)
            tqdm.write(f"tinysam everything: skipped {image_path.name}: {err}", file=sys.stderr)
            continue
        summary["masks"] += written["masks"]
        if len(todo) == 1:
            summary.update(written)
    if failed:
        summary["failed"] = failed
    if summary["masks"] == 0 and len(failed) < len(todo):
        print(
            f"tinysam everything: 0 masks passed --pred-iou-thresh {args.pred_iou_thresh:g} "
            f"and --stability-thresh {args.stability_thresh:g}; try lower values",
            file=sys.stderr,
        )
    return summary


def show_everything(summary: dict) -> None:
    """The summary line; images that could not be read make the exit status 2."""
    print(json.dumps(summary))
    if summary.get("failed"):
        raise UsageError(
            f"{len(summary['failed'])} image(s) could not be read: " + ", ".join(summary["failed"])
        )
