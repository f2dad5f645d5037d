"""Checks on what users pass to a predictor, shared by ``SamPredictor`` and the ONNX predictor.

Each turns a wrong dtype, shape or a NaN into one ``ValueError`` naming the argument and what was
expected. Torch-free, so the ONNX Runtime backend can run without torch installed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Point labels: -1 padding ("not a point"), 0 background, 1 foreground, 2 and 3 the top-left and
# bottom-right corners of a box given as points (segment-anything's ONNX convention).
NOT_A_POINT = -1
POINT_LABELS = (-1, 0, 1, 2, 3)
# The everything mode's largest grid: 256 x 256 = 65,536 prompts (about 16 minutes of decoding
# on a 2-core CPU). Its points, their scores and the kept masks grow with the square; 100,000 a
# side would ask numpy for 75 GiB before the first prompt.
MAX_POINTS_PER_SIDE = 256


def check_points_per_side(value: int, name: str = "points_per_side", least: int = 1) -> int:
    """An everything-mode grid size in ``least..MAX_POINTS_PER_SIDE``, or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not least <= value <= MAX_POINTS_PER_SIDE:
        raise ValueError(f"{name} must be {least}..{MAX_POINTS_PER_SIDE}, got {value}")
    return int(value)


def as_rgb_uint8(image: np.ndarray | Image.Image, image_format: str = "RGB") -> np.ndarray:
    """Bring a user image to HxWx3 uint8 RGB, or raise a ValueError saying what was expected.

    Accepts HxWx3 (RGB or BGR per ``image_format``), HxWx4 (alpha dropped), HxW grayscale and
    PIL images (any mode; ``image_format`` does not apply to them).
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(image, Image.Image):
        from .io import image_to_rgb  # 16-bit and float images converted, not clipped

        image, image_format = image_to_rgb(image), "RGB"
    if type(image).__module__.split(".")[0] == "torch":  # no torch import: see module doc
        raise ValueError(
            "image must be a numpy array or PIL image; for a transformed 1x3xHxW tensor use "
            "set_torch_image"
        )
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must have dtype uint8 (values 0-255), got {image.dtype}; "
            "convert with np.clip(image, 0, 255).astype(np.uint8)"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"image must be HxWx3 (or HxW grayscale, HxWx4 with alpha), got shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image_format == "BGR":
        image = image[:, :, ::-1]
    # An RGB array comes back as the same object: callers (SharedEmbedding) compare identity.
    return image if image.flags.c_contiguous else np.ascontiguousarray(image)


def finite_array(value, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from err
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def check_points(point_coords, point_labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate Nx2 coordinates and N labels in {-1, 0, 1, 2, 3}."""
    if point_labels is None:
        raise ValueError("point_labels must be given with point_coords (one label per point)")
    coords = finite_array(point_coords, "point_coords")
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ValueError(f"point_coords must have shape Nx2 (x, y) with N >= 1, got {coords.shape}")
    labels = finite_array(point_labels, "point_labels")
    if labels.shape != (coords.shape[0],):
        raise ValueError(
            f"point_labels must have shape ({coords.shape[0]},) to match point_coords, "
            f"got {labels.shape}"
        )
    if not np.all(np.isin(labels, POINT_LABELS)):
        bad = labels[~np.isin(labels, POINT_LABELS)][0]
        raise ValueError(
            f"point_labels must be in {{-1, 0, 1, 2, 3}} (1 foreground, 0 background), got {bad:g}"
        )
    return coords, labels.astype(np.int64)


def check_inside(points, width: int, height: int) -> None:
    """Refuse (x, y) pixel points outside a WxH image: a click cannot land there, so such a
    point is a mix-up of frames (normalised coordinates, (y, x) order, another image)."""
    for x, y in finite_array(points, "point_coords").reshape(-1, 2):
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point {x:g},{y:g} is outside the {width}x{height} image (X,Y order)")


def check_box(box) -> np.ndarray:
    """Validate one XYXY box (shape 4 or 1x4) with x0 <= x1 and y0 <= y1."""
    array = finite_array(box, "box")
    if array.shape not in ((4,), (1, 4)):
        raise ValueError(f"box must have shape (4,) as x0, y0, x1, y1, got {array.shape}")
    x0, y0, x1, y1 = array.reshape(4)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must satisfy x0 <= x1 and y0 <= y1, got {array.reshape(4).tolist()}")
    return array.reshape(1, 4)


def check_mask_input(mask_input, size: tuple[int, int]) -> np.ndarray:
    """Validate low-res logits of shape 1xHxW (a previous prediction's, H=W=256)."""
    array = finite_array(mask_input, "mask_input")
    if array.shape == size:
        array = array[None]
    if array.shape != (1, *size):
        raise ValueError(
            f"mask_input must have shape 1x{size[0]}x{size[1]} (low-res logits from a previous "
            f"predict), got {array.shape}"
        )
    return array


def check_prompt_batch(
    point_coords, point_labels, boxes, mask_input, mask_size: tuple[int, int], all_finite
) -> None:
    """Validate batched prompts (``predict_torch``): ``point_coords`` BxNx2 with
    ``point_labels`` BxN, ``boxes`` Bx4, ``mask_input`` Bx1xHxW, one B for all.

    Works on torch tensors and numpy arrays alike; ``all_finite(x)`` says whether every value
    of ``x`` is finite (the caller's library does it where the data lives).
    """
    batch = set()
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
            raise ValueError(f"point_coords must be BxNx2, got {list(point_coords.shape)}")
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise ValueError(
                f"point_labels must be BxN = {list(point_coords.shape[:2])}, "
                f"got {list(point_labels.shape)}"
            )
        if not all_finite(point_coords):
            raise ValueError("point_coords contains NaN or infinite values")
        valid = point_labels == POINT_LABELS[0]
        for label in POINT_LABELS[1:]:
            valid = valid | (point_labels == label)
        if not bool(valid.all()):
            raise ValueError(
                "point_labels must be in {-1, 0, 1, 2, 3} (1 foreground, 0 background, "
                "-1 padding, 2/3 box corners)"
            )
        batch.add(point_coords.shape[0])
    if boxes is not None:
        if boxes.ndim not in (2, 3) or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be Bx4, got {list(boxes.shape)}")
        if not all_finite(boxes):
            raise ValueError("boxes contains NaN or infinite values")
        ordered = (boxes[..., 2] >= boxes[..., 0]) & (boxes[..., 3] >= boxes[..., 1])
        if not bool(ordered.all()):
            raise ValueError("boxes must satisfy x0 <= x1 and y0 <= y1 (XYXY order)")
        batch.add(boxes.shape[0])
    if mask_input is not None:
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, *mask_size):
            raise ValueError(
                f"mask_input must be Bx1x{mask_size[0]}x{mask_size[1]}, "
                f"got {list(mask_input.shape)}"
            )
        if not all_finite(mask_input):
            raise ValueError("mask_input contains NaN or infinite values")
        batch.add(mask_input.shape[0])
    if len(batch) > 1:
        raise ValueError(f"prompt batch sizes disagree: {sorted(batch)}")
    if 0 in batch:
        raise ValueError("the prompt batch is empty (B = 0): give at least one prompt")


def single_prompt_batch(
    point_coords, point_labels, box, mask_input, transform, original_size, mask_size
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``predict``'s arguments (original-image pixels), checked and mapped to the model's input
    frame as a batch of one: coords 1xNx2, labels 1xN, box 1x4, mask_input 1x1xHxW (or None)."""
    coords = labels = boxes = mask = None
    if point_coords is not None or point_labels is not None:
        if point_coords is None:
            raise ValueError("point_coords must be given with point_labels")
        coords, labels = check_points(point_coords, point_labels)
        coords = transform.apply_coords(coords, original_size)[None]
        labels = labels[None]
    if box is not None:
        boxes = transform.apply_boxes(check_box(box), original_size)
    if mask_input is not None:
        mask = check_mask_input(mask_input, mask_size)[None]
    return coords, labels, boxes, mask
