"""Everything mode, dense grid against TinySAM's hierarchical strategy, image by image.

Both modes see the same image embedding (computed once per image, outside the timings): the
times are of the prompting, filtering and post-processing that differ. "Recovered" is the share
of the dense masks that some hierarchical mask matches at mask IoU >= ``match_iou``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..io import load_image

MATCH_IOU = 0.9


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


def recovered_masks(dense: list[dict], hierarchical: list[dict], match_iou: float) -> int:
    """How many of the ``dense`` records (coco_rle) a ``hierarchical`` record matches."""
    from pycocotools import mask as mask_utils

    if not dense or not hierarchical:
        return 0
    dt = [r["segmentation"] for r in dense]
    gt = [r["segmentation"] for r in hierarchical]
    ious = np.asarray(mask_utils.iou(dt, gt, [0] * len(gt)))
    return int((ious.max(axis=1) >= match_iou).sum())


def compare_everything(
    predictor,
    images: list[Path],
    points_per_side: int = 32,
    match_iou: float = MATCH_IOU,
    progress: bool | None = None,
    **filters: float,
) -> list[ImageComparison]:
    """One row per image; ``filters``: the generators' thresholds (``pred_iou_thresh``...)."""
    from tqdm.auto import tqdm

    from ..everything import (
        SamAutomaticMaskGenerator,
        SamHierarchicalMaskGenerator,
        SharedEmbedding,
    )

    shared = SharedEmbedding(predictor)
    options = {"points_per_side": points_per_side, "output_mode": "coco_rle", **filters}
    dense_gen = SamAutomaticMaskGenerator(shared, **options)
    hier_gen = SamHierarchicalMaskGenerator(shared, **options)
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
        rows.append(
            ImageComparison(
                Path(path).name,
                dense_s,
                hier_s,
                dense_gen.stats.prompts,
                hier_gen.stats.prompts,
                len(dense),
                len(hier),
                recovered_masks(dense, hier, match_iou),
            )
        )
    return rows


def everything_table(rows: list[ImageComparison]) -> str:
    lines = [
        "| image | dense s | hierarchical s | dense prompts | hierarchical prompts "
        "| dense masks | hierarchical masks | dense recovered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if len(rows) > 1:
        numbers = [f.name for f in fields(ImageComparison)][1:]
        rows = [*rows, ImageComparison("all", *(sum(getattr(r, n) for r in rows) for n in numbers))]
    for r in rows:
        share = f" ({r.recovered / r.dense_masks:.1%})" if r.dense_masks else ""
        lines.append(
            f"| {r.image} | {r.dense_seconds:.2f} | {r.hierarchical_seconds:.2f} "
            f"| {r.dense_prompts} | {r.hierarchical_prompts} | {r.dense_masks} "
            f"| {r.hierarchical_masks} | {r.recovered}{share} |"
        )
    return "\n".join(lines) + "\n"
