"""Resize-longest-side and the matching coordinate transforms (segment-anything's API).

The numpy methods are torch-free (the ONNX Runtime backend uses them without torch installed);
the ``*_torch`` ones and ``upscale_logits`` import torch when called.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


class ResizeLongestSide:
    """Resize so the longest side is ``target_length``; map points and boxes to match."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> resized uint8, with PIL's bilinear filter (what the models saw)."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Scale ...x2 (x, y) pixel coordinates from ``original_size`` (H, W)."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = deepcopy(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Scale Bx4 XYXY boxes from ``original_size`` (H, W)."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a float BxCxHxW batch (antialiased; close to, not equal to, apply_image)."""
        import torch.nn.functional as F

        size = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        import torch

        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], device=coords.device)
        return coords.to(torch.float) * scale

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """Output (H, W) for a long side of ``long_side_length``, rounded half up; a very thin
        image (e.g. 5000x1) keeps at least one pixel across."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))


def upscale_logits(
    low_res: torch.Tensor,
    input_size: tuple[int, ...],
    original_size: tuple[int, ...],
    image_size: int = 1024,
) -> torch.Tensor:
    """Low-res mask logits (...x256x256, the padded square input's frame) to the original size.

    Upscale to the padded input, crop the padding, resize to the original image, all bilinear
    as the reference does, so thresholds and stability scores see the same values.
    """
    import torch.nn.functional as F

    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
