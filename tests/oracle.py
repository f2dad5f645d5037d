"""A synthetic predictor that knows the scene: each prompt returns the object under the point.

Objects are painted in distinct colours; the oracle reads them back from whatever image (or crop)
it is given, so it works with crops too. For each point it returns three low-res masks: the object
twice (IoU 0.95 and 0.93) and an empty one (0.2); on background, three empty masks with low IoU.
Logits are +-10, so masks, stability scores (1.0) and the >8.5 covered area are predictable.
"""

from __future__ import annotations

import numpy as np
import torch

from tinysam.transforms import ResizeLongestSide, upscale_logits

BACKGROUND = (0, 0, 0)
LOGIT = 10.0


def paint_scene(shape: tuple[int, int], objects: list[np.ndarray]) -> np.ndarray:
    image = np.zeros((*shape, 3), dtype=np.uint8)
    for k, mask in enumerate(objects, start=1):
        image[mask] = (40 * k, 255 - 30 * k, 100 + 20 * k)
    return image


def rectangles(
    shape: tuple[int, int], boxes: list[list[tuple[int, int, int, int]]]
) -> list[np.ndarray]:
    """Objects as unions of [x0, x1) x [y0, y1) rectangles."""
    objects = []
    for parts in boxes:
        mask = np.zeros(shape, dtype=bool)
        for x0, y0, x1, y1 in parts:
            mask[y0:y1, x0:x1] = True
        objects.append(mask)
    return objects


class OraclePredictor:
    """``plain=True``: the generators call it as segment-anything calls a predictor (full-size
    masks for every prompt); otherwise as our backends (low-res logits only)."""

    def __init__(self, plain: bool = False) -> None:
        self.filters_while_decoding = not plain
        self.transform = ResizeLongestSide(1024)
        self.device = torch.device("cpu")
        self.prompts = 0
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        colours, labels = np.unique(image.reshape(-1, 3), axis=0, return_inverse=True)
        background = np.flatnonzero((colours == BACKGROUND).all(axis=1))
        labels = labels.reshape(image.shape[:2]) + 1
        if len(background):
            labels[labels == background[0] + 1] = 0
        self.labels = labels
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(*self.original_size, 1024)
        # Label of every low-res cell, sampled at the cell centre in original pixels.
        scale = self.input_size[0] / self.original_size[0]
        centres = (np.arange(256) + 0.5) * 4 / scale
        ys = np.minimum(centres.astype(int), self.original_size[0] - 1)
        xs = np.minimum(centres.astype(int), self.original_size[1] - 1)
        grid = self.labels[ys[:, None], xs[None, :]]
        inside_image = (centres[:, None] < self.original_size[0]) & (
            centres[None, :] < self.original_size[1]
        )
        self.low_res_labels = np.where(inside_image, grid, -1)

    def reset_image(self) -> None:
        self.labels = None
        self.original_size = None
        self.input_size = None

    def predict_torch(
        self,
        point_coords,
        point_labels,
        boxes=None,
        mask_input=None,
        multimask_output=True,
        return_logits=False,
        upscale=True,
        min_iou=None,  # a hint: prompts below it may be skipped; every prompt is answered here
    ):
        scale = self.original_size[0] / self.input_size[0]
        points = point_coords[:, 0, :].numpy() * scale
        self.prompts += len(points)
        low_res = np.full((len(points), 3, 256, 256), -LOGIT, dtype=np.float32)
        iou = np.tile(np.array([0.3, 0.2, 0.1], dtype=np.float32), (len(points), 1))
        for i, (x, y) in enumerate(points):
            label = self.labels[int(y), int(x)]
            if label:
                obj = np.where(self.low_res_labels == label, LOGIT, -LOGIT)
                low_res[i, 0] = low_res[i, 1] = obj
                iou[i] = (0.95, 0.93, 0.2)
        low_res_t = torch.from_numpy(low_res)
        if not upscale:
            return None, torch.from_numpy(iou), low_res_t
        masks = upscale_logits(low_res_t, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > 0
        return masks, torch.from_numpy(iou), low_res_t
