"""Mask bookkeeping for the everything mode: grids, crops, scores, boxes, NMS and RLE.

Semantics follow segment-anything's ``utils/amg.py`` (the records our users compare against);
RLE compression is pycocotools'.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import product
from typing import Any

import numpy as np
import torch

from ..masks import (  # noqa: F401  (their home; imported here for the generators)
    area_from_rle,
    batched_mask_to_box,
    box_area,
    box_xyxy_to_xywh,
    calculate_stability_score,
    coco_encode_rle,
    mask_to_rle,
    rle_to_mask,
)


class MaskData:
    """Columns of per-mask data (tensors, arrays or lists) filtered and concatenated together."""

    def __init__(self, **columns: Any) -> None:
        self._columns: dict[str, Any] = {}
        for key, value in columns.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(value, (list, np.ndarray, torch.Tensor)):
            raise TypeError(f"MaskData column {key!r} must be a list, array or tensor")
        self._columns[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._columns[key]

    def __delitem__(self, key: str) -> None:
        del self._columns[key]

    def __contains__(self, key: str) -> bool:
        return key in self._columns

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def items(self):
        return self._columns.items()

    def filter(self, keep: torch.Tensor | np.ndarray) -> None:
        """Keep rows by boolean mask or by index (indices also reorder)."""
        keep = torch.as_tensor(keep)
        index = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.long()
        for key, value in self._columns.items():
            if isinstance(value, torch.Tensor):
                self._columns[key] = value[index.to(value.device)]
            elif isinstance(value, np.ndarray):
                self._columns[key] = value[index.numpy()]
            else:
                self._columns[key] = [value[i] for i in index.tolist()]

    def cat(self, other: MaskData) -> None:
        for key, value in other.items():
            if key not in self._columns:
                self._columns[key] = value
            elif isinstance(value, torch.Tensor):
                self._columns[key] = torch.cat([self._columns[key], value])
            elif isinstance(value, np.ndarray):
                self._columns[key] = np.concatenate([self._columns[key], value])
            else:
                self._columns[key] = self._columns[key] + list(value)

    def to_numpy(self) -> None:
        for key, value in self._columns.items():
            if isinstance(value, torch.Tensor):
                self._columns[key] = value.cpu().numpy()


# --------------------------------------------------------------------------- point grids, crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """n x n points at the centres of an even grid over [0, 1]^2, row by row, as (x, y)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One grid per crop layer; layer i has n_per_side / scale_per_layer**i points per side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes: the whole image, then (2**i)**2 overlapping crops for layer i."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = crop_len(im_w, per_side, overlap)
        crop_h = crop_len(im_h, per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer + 1)
    return boxes, layers


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    x0, y0 = crop_box[:2]
    return points + torch.tensor([x0, y0], device=points.device)


def uncrop_masks(
    masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int
) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Masks cut by a crop's edge (but not by the image's edge) are partial: flag them."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def batch_iterator(batch_size: int, *arrays) -> Iterator[list]:
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        yield [a[start : start + batch_size] for a in arrays]


# --------------------------------------------------------------------------- scores and boxes


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; indices kept, by decreasing score.

    Same rule as torchvision's ``nms``: a box is dropped when its IoU with a kept,
    higher-scoring box exceeds ``iou_threshold``; areas are (x1 - x0) * (y1 - y0).
    Ties keep the earlier box first (a stable sort).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes = boxes.double().cpu()
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    b = boxes[order]
    area = box_area(b)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode='holes'``) or drop islands (``'islands'``) smaller than ``area_thresh``.

    8-connected components, as segment-anything (which uses OpenCV); here scipy. Returns the
    mask and whether it changed.
    """
    try:
        from scipy import ndimage
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("min_mask_region_area > 0 needs scipy: pip install scipy") from err
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = holes ^ mask
    regions, n_labels = ndimage.label(working, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=n_labels + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels + 1) if i not in fill]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
