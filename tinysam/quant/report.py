"""How far a quantized model's masks are from the float model's, and the per-layer table.

Prompts need no annotations: one-point prompts from the everything grid, and boxes around the
float model's answers to them. Each prompt is answered as ``SamPredictor`` answers it (a point:
the best of the three masks by predicted IoU; a box: the single-mask output) and the two
models' full-size masks are compared by IoU. Any predictor with ``set_image`` and
``predict_torch`` can be compared (``SamPredictor`` on a fake-quantized model, or
``OnnxPredictor`` on the int8 export).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..masks import PROMPT_KINDS, Agreement, answer
from .calibrate import grid_prompts


@dataclass
class MaskAgreement:
    mean_iou: float
    prompts: int


def _boxes_around(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XYXY boxes of non-empty masks, and which masks they belong to."""
    keep = masks.flatten(1).any(dim=1)
    boxes = []
    for mask in masks[keep]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
    return (torch.stack(boxes) if boxes else torch.zeros(0, 4)), keep


def mask_agreement(
    reference,
    candidates: dict[str, object],
    images: Iterable[np.ndarray],
    prompts_per_image: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, MaskAgreement]]:
    """``{candidate name: {"point"|"box": MaskAgreement}}``: mean IoU of each candidate's masks
    with the reference predictor's on the same prompts."""
    generator = torch.Generator().manual_seed(seed)
    means = {name: Agreement() for name in candidates}
    for image in images:
        reference.set_image(image)
        size = reference.input_size
        points = grid_prompts(size, prompts_per_image, generator)
        ref_points = answer(reference, points=points)
        box_frame, keep = _boxes_around(ref_points)
        # into the resized frame the predictors take
        boxes = reference.transform.apply_boxes_torch(box_frame, reference.original_size)
        ref_boxes = answer(reference, boxes=boxes) if len(boxes) else None
        for name, predictor in candidates.items():
            predictor.set_image(image)
            means[name].add("point", answer(predictor, points=points), ref_points)
            if ref_boxes is not None:
                means[name].add("box", answer(predictor, boxes=boxes), ref_boxes)
    return {
        name: {
            kind: MaskAgreement(means[name].mean(kind), means[name].counts[kind])
            for kind in PROMPT_KINDS
        }
        for name in candidates
    }


def layer_table(results: Sequence) -> str:
    """A Markdown table of the per-layer search results (``search.LayerResult``)."""
    lines = [
        "| layer | kind | twin | samples | objective min-max | objective searched | "
        "rel. error min-max | rel. error searched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.kind} | {r.twin} | {r.samples} | {r.minmax_distance:.3g} | "
            f"{r.searched_distance:.3g} | {r.minmax_rel_error:.4f} | {r.searched_rel_error:.4f} |"
        )
    return "\n".join(lines)


def agreement_table(
    agreement: dict[str, dict[str, MaskAgreement]], versus: str | None = "float"
) -> str:
    against = f" vs {versus}" if versus else ""
    lines = [f"| model | point mIoU{against} | box mIoU{against} | prompts (point/box) |"]
    lines.append("|---|---|---|---|")
    for name, kinds in agreement.items():
        p, b = kinds["point"], kinds["box"]
        lines.append(f"| {name} | {p.mean_iou:.4f} | {b.mean_iou:.4f} | {p.prompts}/{b.prompts} |")
    return "\n".join(lines)
