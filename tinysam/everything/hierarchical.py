"""TinySAM's hierarchical everything mode: prompt densely only where nothing is segmented yet.

Round 1 prompts a sparse grid (``points_per_side // 4`` per side). The kept masks' pixels whose
logits exceed ``high_score_thresh`` form the covered area. Round 2 prompts each sparse point's
neighbourhood on the dense lattice, skipping points in the covered area. Both rounds' masks are
merged and de-duplicated by box NMS. About half the decoder work of the dense grid when
confident masks cover half the image, with nearly the same masks.

Differences from the authors' ``hierarchical_mask_generator.py``, all at the edges:

* its neighbourhood walk indexes the covered-area map at lattice points without bounds checks,
  so with grids that do not divide the image (or tiny images) it can read the opposite edge
  (negative indices wrap) or raise; points outside the image are skipped here;
* when the image is smaller than ``points_per_side`` the lattice stride is 0 and its walk
  re-prompts the sparse point itself up to 15 times; those repeats are skipped here;
* it silently ignores crop layers; here ``crop_n_layers > 0`` is an error;
* its records lack ``crop_box``; here they carry the whole image's, like the dense generator's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..checks import as_rgb_uint8
from .automatic import GenerationStats, SamAutomaticMaskGenerator
from .mask_ops import MaskData, build_point_grid, nms


class SamHierarchicalMaskGenerator(SamAutomaticMaskGenerator):
    """The hierarchical everything mode. Takes ``SamAutomaticMaskGenerator``'s parameters (by
    keyword after the first five, which follow the authors' order) plus ``high_score_thresh``;
    ``generate(image)`` runs both rounds and returns segment-anything's records.

    The authors' step-by-step methods are here too (``set_image``, ``set_points_per_side``,
    ``set_point_grids``, ``generate(image, need_high)``, ``post_process``, ``reset_image``), so
    code written against their ``hierarchical_mask_generator`` runs unchanged.
    """

    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        high_score_thresh: float = 8.5,
        **options: Any,
    ) -> None:
        if options.get("crop_n_layers", 0):
            raise ValueError("the hierarchical mode works on the whole image: use crop_n_layers=0")
        if options.get("point_grids") is not None or points_per_side is None or points_per_side < 4:
            raise ValueError(
                "the hierarchical mode needs points_per_side >= 4 (and no point_grids)"
            )
        super().__init__(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            **options,
        )
        self.high_score_thresh = high_score_thresh

    @torch.no_grad()
    def hierarchical_generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for the whole image in two rounds (see the module docstring)."""
        self.stats = GenerationStats()
        h, w = image.shape[:2]
        whole = [0, 0, w, h]
        self._set_image(image)
        sparse = build_point_grid(self.points_per_side // 4) * np.array([w, h])
        covered = torch.zeros((h, w), dtype=torch.bool)
        first = self._predict_points(sparse, whole, (h, w), covered, self.high_score_thresh)
        self.stats.covered_fraction = float(covered.float().mean())
        dense = self.dense_points(sparse, covered.numpy(), self.points_per_side)
        second = self._predict_points(dense, whole, (h, w)) if len(dense) else MaskData(rles=[])
        second.cat(first)
        return self._records(self._merge(second, whole))

    def _merge(self, data: MaskData, whole: list[int]) -> MaskData:
        """Both rounds' masks de-duplicated by box NMS, with the whole image as crop box."""
        if len(data):
            data.filter(nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["crop_boxes"] = torch.tensor([whole] * len(data), dtype=torch.long).reshape(-1, 4)
        return data

    def generate(self, image: np.ndarray, need_high: bool | None = None):
        """``generate(image)``: both rounds, segment-anything's records.

        ``generate(image, need_high)`` is the authors' single round: prompt ``point_grids[0]``
        on the image already set (``set_image``) and return the kept masks as ``MaskData``;
        with ``need_high``, also the covered area (logits above ``high_score_thresh``) as a
        WxH bool tensor, indexed [x, y] as theirs.
        """
        image = as_rgb_uint8(image)
        if need_high is None:
            return self.hierarchical_generate(image)
        if not getattr(self.predictor, "is_image_set", True):
            raise RuntimeError("no image set: call set_image(image) before generate(image, ...)")
        h, w = image.shape[:2]
        points = np.asarray(self.point_grids[0], dtype=np.float64) * np.array([w, h])
        covered = torch.zeros((h, w), dtype=torch.bool) if need_high else None
        with torch.no_grad():
            data = self._predict_points(
                points, [0, 0, w, h], (h, w), covered, self.high_score_thresh
            )
        return (data, covered.T) if need_high else data

    # The authors' step-by-step API.

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def reset_image(self) -> None:
        self.predictor.reset_image()

    def set_point_grids(self, point_grids: list[np.ndarray]) -> None:
        self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]

    def set_points_per_side(self, points_per_side: int) -> None:
        self.point_grids = [build_point_grid(points_per_side)]

    def post_process(self, image: np.ndarray, data: MaskData) -> list[dict[str, Any]]:
        """Rounds' masks merged (``MaskData.cat``) -> NMS -> records, as the authors'."""
        h, w = image.shape[:2]
        return self._records(self._merge(data, [0, 0, w, h]))

    @staticmethod
    def dense_points(sparse: np.ndarray, covered: np.ndarray, points_per_side: int) -> np.ndarray:
        """Round-2 prompts: each sparse point's lattice neighbours outside the covered area.

        The lattice step is (W // points_per_side, H // points_per_side) pixels; a sparse point
        owns the offsets {-1, 0, 1, 2} x {-1, 0, 1, 2} steps minus itself, the +2 column and
        row only while they stay inside the image; visited in the authors' order.
        """
        h, w = covered.shape
        x_step, y_step = w // points_per_side, h // points_per_side
        points = []
        for x, y in sparse:
            right, below = x + 2 * x_step < w, y + 2 * y_step < h
            offsets = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
            offsets += [(2, dy) for dy in (-1, 0, 1)] if right else []
            offsets += [(dx, 2) for dx in (-1, 0, 1)] if below else []
            offsets += [(2, 2)] if right and below else []
            for dx, dy in offsets:
                cx, cy = x + x_step * dx, y + y_step * dy
                if not (0 <= cx < w and 0 <= cy < h) or (cx, cy) == (x, y):
                    continue
                if covered[int(cy), int(cx)]:
                    continue
                points.append((cx, cy))
        return np.array(points, dtype=np.float64).reshape(-1, 2)
