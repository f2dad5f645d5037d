"""Pictures for people: a mask drawn over its image, with the prompts that made it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MASK_COLOR = (30, 144, 255)  # dodger blue
POSITIVE_COLOR = (0, 200, 0)
NEGATIVE_COLOR = (230, 0, 0)
BOX_COLOR = (255, 215, 0)


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The image with the mask tinted and outlined, points as dots and the box as a frame."""
    mask = mask.astype(bool)
    tinted = image.astype(np.float32)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * np.array(MASK_COLOR, np.float32)
    canvas = Image.fromarray(tinted.round().astype(np.uint8))

    mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
    width = max(1, round(max(image.shape[:2]) / 400))
    grown = mask_img.filter(ImageFilter.MaxFilter(2 * width + 1))
    edge = np.asarray(grown, dtype=bool) & ~mask
    outline = np.asarray(canvas).copy()
    outline[edge] = MASK_COLOR
    canvas = Image.fromarray(outline)

    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(max(image.shape[:2]) / 120))
    if box is not None:
        x0, y0, x1, y1 = np.asarray(box, dtype=float).reshape(4)
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=max(2, width))
    if point_coords is not None:
        for (x, y), label in zip(np.asarray(point_coords), np.asarray(point_labels)):
            color = POSITIVE_COLOR if label == 1 else NEGATIVE_COLOR
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius), fill=color, outline="white"
            )
    return np.asarray(canvas)


def draw_masks(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """Every mask in its own colour (largest underneath, so small ones stay visible)."""
    out = image.astype(np.float32)
    rng = np.random.default_rng(0)
    colors = rng.integers(40, 256, size=(len(masks), 3)).astype(np.float32)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        mask = masks[i].astype(bool)
        out[mask] = (1 - alpha) * out[mask] + alpha * colors[i]
    return out.round().astype(np.uint8)
