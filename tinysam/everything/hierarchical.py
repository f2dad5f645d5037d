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

from .automatic import GenerationStats, SamAutomaticMaskGenerator
from .masks import MaskData, build_point_grid, nms


class SamHierarchicalMaskGenerator(SamAutomaticMaskGenerator):
    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        high_score_thresh: float = 8.5,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if crop_n_layers:
            raise ValueError("the hierarchical mode works on the whole image: use crop_n_layers=0")
        if point_grids is not None or points_per_side is None or points_per_side < 4:
            raise ValueError(
                "the hierarchical mode needs points_per_side >= 4 (and no point_grids)"
            )
        super().__init__(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
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
        first, covered = self._predict_points(sparse, whole, (h, w), self.high_score_thresh)
        self.stats.covered_fraction = float(covered.float().mean())
        dense = self.dense_points(sparse, covered.numpy(), self.points_per_side)
        second = self._predict_points(dense, whole, (h, w)) if len(dense) else MaskData(rles=[])
        second.cat(first)
        data = second
        if len(data):
            data.filter(nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["crop_boxes"] = torch.tensor([whole] * len(data), dtype=torch.long).reshape(-1, 4)
        return self._records(data)

    generate = hierarchical_generate

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
