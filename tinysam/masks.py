"""Masks in every form the project writes or compares: boxes, IoU, RLE (segment-anything's
uncompressed runs and COCO's compressed ones, through pycocotools), and the rule by which a
predictor answers a prompt, used wherever two models' answers are compared.

The one home for these: the everything mode, the evaluations, the web demo, distillation and
quantization all import them from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- boxes


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY pixel boxes of boolean masks ...xHxW; [0, 0, 0, 0] for an empty mask."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.long, device=masks.device)
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)  # ... x H
    cols = masks.any(dim=-2)  # ... x W
    row_idx = torch.arange(h, device=masks.device)
    col_idx = torch.arange(w, device=masks.device)
    bottom = torch.where(rows, row_idx, -1).amax(-1)
    top = torch.where(rows, row_idx, h).amin(-1)
    right = torch.where(cols, col_idx, -1).amax(-1)
    left = torch.where(cols, col_idx, w).amin(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(-1)
    return boxes.masked_fill(empty[..., None], 0)


def box_xyxy_to_xywh(box: torch.Tensor | np.ndarray) -> Any:
    out = box.clone() if isinstance(box, torch.Tensor) else box.copy()
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# --------------------------------------------------------------------------- IoU


def binary_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims; two empty masks count as 1."""
    a, b = a.bool(), b.bool()
    intersection = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW boolean arrays; two empty masks count as 1."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------- scores


def calculate_stability_score(
    logits: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold`` +- ``threshold_offset``.

    The high-threshold mask lies inside the low one, so the IoU is a ratio of pixel counts.
    """
    inner = (logits > mask_threshold + threshold_offset).sum((-1, -2), dtype=torch.int32)
    outer = (logits > mask_threshold - threshold_offset).sum((-1, -2), dtype=torch.int32)
    return inner / outer


# --------------------------------------------------------------------------- RLE


def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed RLEs (column-major runs, starting with a background run) of BxHxW masks."""
    b, h, w = masks.shape
    flat = masks.permute(0, 2, 1).reshape(b, h * w).cpu().numpy()
    out = []
    for row in flat:
        change = np.flatnonzero(row[1:] != row[:-1]) + 1
        bounds = np.concatenate([[0], change, [h * w]])
        counts = np.diff(bounds).tolist()
        if row[0]:
            counts = [0, *counts]
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE to an HxW boolean mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


class RleMasks(Sequence):
    """Uncompressed RLEs read as HxW bool masks, each decoded when it is read: N masks of a
    large image never sit in memory together."""

    def __init__(self, rles: list[dict[str, Any]]) -> None:
        self.rles = rles

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, index: int) -> np.ndarray:
        return rle_to_mask(self.rles[index])


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Compress an uncompressed RLE with pycocotools; counts as a JSON-ready string."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    encoded = mask_utils.frPyObjects(rle, h, w)
    encoded["counts"] = encoded["counts"].decode("utf-8")
    return encoded


def encode_masks(masks: np.ndarray, chunk: int = 16) -> list[dict[str, Any]]:
    """COCO compressed RLEs (counts as JSON strings) of NxHxW boolean masks, ``chunk`` masks
    at a time (pycocotools wants them column-major: one copy of a chunk, not of all N)."""
    from pycocotools import mask as mask_utils

    out = []
    for start in range(0, len(masks), chunk):
        part = np.asarray(masks[start : start + chunk], dtype=bool).view(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(part.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        out.extend(rles)
    return out


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """One HxW boolean mask as a COCO compressed RLE (counts as a JSON string)."""
    return encode_masks(mask[None])[0]


def decodable_rle(rle: dict) -> dict:
    """A JSON-read COCO RLE (counts as str) in the form pycocotools decodes (bytes)."""
    return {"size": rle["size"], "counts": rle["counts"].encode()}


# --------------------------------------------------------------------------- agreement

PROMPT_KINDS = ("point", "box")


def mask_candidates(points_per_prompt: int) -> slice:
    """The masks a prompt is answered with, as SAM trains and predicts: the three multimask
    outputs for one point (ambiguous), the single-mask output for anything more specific."""
    return slice(1, None) if points_per_prompt == 1 else slice(0, 1)


def chosen_masks(masks: torch.Tensor, iou: torch.Tensor, candidates: slice) -> torch.Tensor:
    """Each prompt's answer (B x H x W bool): of its ``candidates`` masks (all four tokens'
    logits or masks), the one with the best predicted IoU, as ``SamPredictor`` returns it first."""
    best = iou[:, candidates].argmax(dim=1) + (candidates.start or 0)
    return masks[torch.arange(len(masks)), best] > 0


@dataclass
class Agreement:
    """Mean IoU between pairs of answers, per prompt kind (``PROMPT_KINDS``): the one
    evaluator behind the quantization report and the distillation demo."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROMPT_KINDS, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROMPT_KINDS, 0))

    def add(self, kind: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add the IoUs of the B answers ``a`` and ``b`` (B x H x W) to ``kind``."""
        self.sums[kind] += float(binary_iou(a, b).double().sum())
        self.counts[kind] += len(a)

    def mean(self, kind: str) -> float:
        return self.sums[kind] / max(1, self.counts[kind])


# Prompts answered at once (their full-size masks are the report's largest tensors).
ANSWER_GROUP = 4


def answer(predictor, points=None, boxes=None) -> torch.Tensor:
    """Each prompt's answer as ``SamPredictor`` gives it (``masks.chosen_masks``): a point,
    the best of three masks; a box, the single-mask output."""
    multimask = boxes is None
    prompts = points if boxes is None else boxes
    answers = []
    for first in range(0, len(prompts), ANSWER_GROUP):
        group = slice(first, first + ANSWER_GROUP)
        group_points = None if points is None else points[group]
        labels = None if points is None else torch.ones(group_points.shape[:2], dtype=torch.int)
        masks, scores, _ = predictor.predict_torch(
            group_points,
            labels,
            boxes=None if boxes is None else boxes[group],
            multimask_output=multimask,
        )
        masks, scores = torch.as_tensor(masks), torch.as_tensor(scores)
        answers.append(chosen_masks(masks, scores, slice(None)))  # of the masks asked for
    return torch.cat(answers)
