"""Everything mode, dense vs hierarchical, fast many-prompt decoder vs the plain decoder.

For each mode the table gives the prompts sent to the decoder, the time split into encoder /
decoder / post-processing, and the masks kept. The baseline ("plain") is the same generator
with the many-prompt decoder switched off, measured in the same run; the authors' code took
162 s for dense 32x32 on this 770x769 image on the same kind of machine.

    python benchmarks/everything.py [--checkpoint PATH] [--pred-iou-thresh 0.88]
        [--stability-thresh 0.95] [--points-per-side 32] [--threads 2] [--skip-plain]

Without --checkpoint a seeded random vit_t is used: timings do not depend on the weights, but
how many prompts pass the IoU filter (and so how many masks are made) does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tinysam import (
    SamAutomaticMaskGenerator,
    SamHierarchicalMaskGenerator,
    SamPredictor,
    build_sam_vit_t,
)
from tinysam.io import load_image
from tinysam.predictor_base import DEFAULT_MANY_PROMPTS

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "picture1.jpg"


def run(generator_class, sam, image, args, fast: bool) -> dict:
    predictor = SamPredictor(sam, many_prompts=DEFAULT_MANY_PROMPTS if fast else 1 << 30)
    extra = {}
    if generator_class is SamHierarchicalMaskGenerator:
        extra["high_score_thresh"] = args.high_score_thresh
    generator = generator_class(
        predictor,
        **extra,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        output_mode="coco_rle",
    )
    start = time.perf_counter()
    records = generator.generate(image)
    total = time.perf_counter() - start
    stats = generator.stats
    return {
        "prompts": stats.prompts,
        "rounds": stats.rounds,
        "encoder": stats.encoder_s,
        "decoder": stats.decoder_s,
        "post": total - stats.encoder_s - stats.decoder_s,
        "total": total,
        "masks": len(records),
        "covered": stats.covered_fraction,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-thresh", type=float, default=0.95)
    parser.add_argument(
        "--high-score-thresh",
        type=float,
        default=8.5,
        help="hierarchical covered-area logit cutoff (random weights rarely reach 8.5)",
    )
    parser.add_argument("--skip-plain", action="store_true", help="only the fast path")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = build_sam_vit_t(args.checkpoint)
    image = load_image(IMAGE)
    print(
        f"{IMAGE.name} {image.shape[1]}x{image.shape[0]}, {args.points_per_side} points per side, "
        f"pred_iou_thresh {args.pred_iou_thresh}, stability {args.stability_thresh}, "
        f"high_score_thresh {args.high_score_thresh}, "
        f"{args.threads} threads"
    )
    header = (
        f"{'mode':<13}{'decoder':<9}{'prompts':>9}{'encoder':>10}{'decoder':>10}"
        f"{'post':>9}{'total':>9}{'masks':>7}{'speedup':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, cls in (
        ("dense", SamAutomaticMaskGenerator),
        ("hierarchical", SamHierarchicalMaskGenerator),
    ):
        rows = {"fast": run(cls, sam, image, args, fast=True)}
        if not args.skip_plain:
            rows["plain"] = run(cls, sam, image, args, fast=False)
        for path, r in rows.items():
            speedup = rows["plain"]["total"] / r["total"] if "plain" in rows else float("nan")
            print(
                f"{name:<13}{path:<9}{r['prompts']:>9}{r['encoder']:>9.2f}s{r['decoder']:>9.2f}s"
                f"{r['post']:>8.2f}s{r['total']:>8.2f}s{r['masks']:>7}{speedup:>8.2f}x"
            )
        if name == "hierarchical":
            fast = rows["fast"]
            print(
                f"  hierarchical rounds (prompts): {fast['rounds']}, "
                f"covered by round 1: {fast['covered']:.0%}"
            )


if __name__ == "__main__":
    main()
