"""Everything mode, dense grid against TinySAM's hierarchical strategy, image by image.

Both modes see the same image embedding (computed once per image, outside the timings): the
times are of the prompting, filtering and post-processing that differ. "Recovered" is the share
of the dense masks that some hierarchical mask matches at mask IoU >= ``match_iou``.

With ground truth (each image's object masks as COCO RLE), each mode is also scored as the
paper scores it: the share of objects some mask of the mode matches at IoU >= 0.5 (recall) and
each object's best IoU with any of the mode's masks, averaged.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..io import load_image

MATCH_IOU = 0.9
FOUND_IOU = 0.5  # an object is found when a mask overlaps it at this IoU (recall@0.5)


@dataclass
class ImageComparison:
    image: str
    dense_seconds: float
    hierarchical_seconds: float
    dense_prompts: int
    hierarchical_prompts: int
    dense_masks: int
    hierarchical_masks: int
    recovered: int  # dense masks matched by a hierarchical one
    # With ground truth (else 0): objects, those found at IoU >= 0.5, and their best IoUs'
    # sum, per mode (sums, so that the table's "all" row adds up).
    objects: int = 0
    dense_found: int = 0
    hierarchical_found: int = 0
    dense_best_iou: float = 0.0
    hierarchical_best_iou: float = 0.0


def best_ious(objects: list[dict], masks: list[dict]) -> np.ndarray:
    """Each of ``objects``' (COCO RLE) best IoU with any of ``masks`` (RLE; 0 when none)."""
    from pycocotools import mask as mask_utils

    if not objects or not masks:
        return np.zeros(len(objects))
    ious = np.asarray(mask_utils.iou(objects, masks, [0] * len(masks)))
    return ious.max(axis=1)


def recovered_masks(dense: list[dict], hierarchical: list[dict], match_iou: float) -> int:
    """How many of the ``dense`` records (coco_rle) a ``hierarchical`` record matches."""
    found = best_ious([r["segmentation"] for r in dense], [r["segmentation"] for r in hierarchical])
    return int((found >= match_iou).sum())


def compare_everything(
    predictor,
    images: list[Path],
    points_per_side: int = 32,
    match_iou: float = MATCH_IOU,
    progress: bool | None = None,
    ground_truth: dict[str, list[dict]] | None = None,
    high_score_thresh: float | None = None,
    **filters: float,
) -> list[ImageComparison]:
    """One row per image; ``filters``: the generators' thresholds (``pred_iou_thresh``...);
    ``ground_truth``: image path (as given) -> its objects' COCO RLE masks, to score both modes
    against; ``high_score_thresh``: the hierarchical mode's covered-area logit (default its
    8.5, made for SAM-scale logits)."""
    from tqdm.auto import tqdm

    from ..everything import (
        SamAutomaticMaskGenerator,
        SamHierarchicalMaskGenerator,
        SharedEmbedding,
    )

    shared = SharedEmbedding(predictor)
    options = {"points_per_side": points_per_side, "output_mode": "coco_rle", **filters}
    dense_gen = SamAutomaticMaskGenerator(shared, **options)
    covered = {} if high_score_thresh is None else {"high_score_thresh": high_score_thresh}
    hier_gen = SamHierarchicalMaskGenerator(shared, **options, **covered)
    show = sys.stderr.isatty() if progress is None else progress
    rows = []
    for path in tqdm(images, unit="image", desc="everything", disable=not show):
        image = load_image(path)
        shared.set_image(image)
        start = time.perf_counter()
        dense = dense_gen.generate(image)
        dense_s = time.perf_counter() - start
        start = time.perf_counter()
        hier = hier_gen.generate(image)
        hier_s = time.perf_counter() - start
        row = ImageComparison(
            Path(path).name,
            dense_s,
            hier_s,
            dense_gen.stats.prompts,
            hier_gen.stats.prompts,
            len(dense),
            len(hier),
            recovered_masks(dense, hier, match_iou),
        )
        if ground_truth is not None:
            objects = ground_truth[str(path)]
            dense_best = best_ious(objects, [r["segmentation"] for r in dense])
            hier_best = best_ious(objects, [r["segmentation"] for r in hier])
            row.objects = len(objects)
            row.dense_found = int((dense_best >= FOUND_IOU).sum())
            row.hierarchical_found = int((hier_best >= FOUND_IOU).sum())
            row.dense_best_iou = float(dense_best.sum())
            row.hierarchical_best_iou = float(hier_best.sum())
        rows.append(row)
    return rows


def total(rows: list[ImageComparison], name: str = "all") -> ImageComparison:
    """The rows added up (numbers are counts, seconds and sums of IoUs)."""
    numbers = [f.name for f in fields(ImageComparison)][1:]
    return ImageComparison(name, *(sum(getattr(r, n) for r in rows) for n in numbers))


def everything_table(rows: list[ImageComparison]) -> str:
    scored = any(r.objects for r in rows)
    head = (
        "| image | dense s | hierarchical s | dense prompts | hierarchical prompts "
        "| dense masks | hierarchical masks | dense recovered |"
    )
    if scored:
        head += " objects | dense recall@0.5 | hierarchical recall@0.5 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    if len(rows) > 1:
        rows = [*rows, total(rows)]
    for r in rows:
        share = f" ({r.recovered / r.dense_masks:.1%})" if r.dense_masks else ""
        line = (
            f"| {r.image} | {r.dense_seconds:.2f} | {r.hierarchical_seconds:.2f} "
            f"| {r.dense_prompts} | {r.hierarchical_prompts} | {r.dense_masks} "
            f"| {r.hierarchical_masks} | {r.recovered}{share} |"
        )
        if scored:
            line += (
                f" {r.objects} | {_share(r.dense_found, r.objects)} "
                f"| {_share(r.hierarchical_found, r.objects)} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _share(part: float, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def modes_table(results: dict[str, list[ImageComparison]]) -> str:
    """Dense against hierarchical per model (name -> its images' rows), as the paper reports
    it: decoder prompts and time beside recall@0.5 and the objects' mean best IoU."""
    lines = [
        "| model | mode | decoder prompts | seconds | masks | recall@0.5 | mean best IoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        t = total(rows)
        for mode, prompts, seconds, masks, found, best in (
            (
                "dense",
                t.dense_prompts,
                t.dense_seconds,
                t.dense_masks,
                t.dense_found,
                t.dense_best_iou,
            ),
            (
                "hierarchical",
                t.hierarchical_prompts,
                t.hierarchical_seconds,
                t.hierarchical_masks,
                t.hierarchical_found,
                t.hierarchical_best_iou,
            ),
        ):
            ratio = f" ({prompts / t.dense_prompts:.0%})" if t.dense_prompts else ""
            lines.append(
                f"| {name} | {mode} | {prompts}{ratio} | {seconds:.2f} | {masks} "
                f"| {_share(found, t.objects)} | {_share(best, t.objects)} |"
            )
    return "\n".join(lines) + "\n"
