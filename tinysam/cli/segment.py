"""``tinysam segment``: one object from points and/or a box."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import (
    UsageError,
    add_max_pixels_arg,
    add_model_args,
    box_arg,
    check_max_pixels,
    point_arg,
    predictor_from_args,
)


def register(sub) -> None:
    seg = sub.add_parser(
        "segment",
        help="segment an object in an image from points and/or a box",
        description=(
            "Segment an object from point and box prompts. Writes the best mask as a PNG "
            "(white = object), optionally an overlay to look at, and prints one JSON line."
        ),
        epilog=(
            "example: tinysam segment photo.jpg --point 365,225 --out mask.png "
            "--overlay overlay.png"
        ),
    )
    seg.add_argument("image", type=Path, help="input image (any format Pillow reads)")
    seg.add_argument(
        "--point",
        type=point_arg,
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a point in image pixels; LABEL 1 = object (default), 0 = background. Repeatable.",
    )
    seg.add_argument("--box", type=box_arg, metavar="X0,Y0,X1,Y1", help="a box around the object")
    seg.add_argument("--out", type=Path, required=True, help="where to write the mask PNG")
    seg.add_argument("--overlay", type=Path, help="also write the image with the mask drawn on it")
    seg.add_argument(
        "--single-mask",
        action="store_true",
        help="ask for one mask instead of three candidates (better for unambiguous prompts)",
    )
    seg.add_argument(
        "--all-masks",
        action="store_true",
        help="write every candidate mask, as OUT with a _0, _1, _2 suffix",
    )
    add_max_pixels_arg(seg)
    add_model_args(seg, backend=True)
    seg.set_defaults(run=run_segment)


def _suffixed(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}_{index}{path.suffix or '.png'}")


def run_segment(args: argparse.Namespace) -> dict:
    from ..checks import check_inside
    from ..io import load_image, save_png
    from ..visualize import draw_overlay

    if not args.point and args.box is None:
        raise UsageError("give at least one --point or a --box")
    check_max_pixels(args)
    image = load_image(args.image, max_pixels=args.max_pixels)
    h, w = image.shape[:2]
    check_inside([p[:2] for p in args.point], w, h)
    predictor = predictor_from_args(args)
    predictor.set_image(image)
    coords = np.array([p[:2] for p in args.point]) if args.point else None
    labels = np.array([p[2] for p in args.point]) if args.point else None
    box = np.array(args.box) if args.box is not None else None
    masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=not args.single_mask)
    best = int(np.argmax(scores))
    if args.all_masks:
        written = [_suffixed(args.out, i) for i in range(len(masks))]
        for mask, path in zip(masks, written):
            save_png(mask, path)
    else:
        written = [args.out]
        save_png(masks[best], args.out)
    result = {
        "image": str(args.image),
        "size": [h, w],
        "scores": [round(float(s), 6) for s in scores],
        "best": best,
        "area": [int(m.sum()) for m in masks],
        "masks": [str(p) for p in written],
    }
    if args.overlay is not None:
        save_png(draw_overlay(image, masks[best], coords, labels, box), args.overlay)
        result["overlay"] = str(args.overlay)
    return result
