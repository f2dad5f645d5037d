"""``SamPredictor``: encode an image once, then answer many prompts against it.

The API is segment-anything's. Inputs are checked here, at the boundary, so a wrong dtype, shape
or a NaN becomes one ``ValueError`` naming the argument instead of a traceback from deep in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .modeling import Sam
from .modeling.many_prompts import ManyPromptDecoder
from .modeling.prompt_encoder import POINT_LABELS
from .perf import tune_allocator
from .transforms import ResizeLongestSide


def as_rgb_uint8(image: np.ndarray | Image.Image, image_format: str = "RGB") -> np.ndarray:
    """Bring a user image to HxWx3 uint8 RGB, or raise a ValueError saying what was expected.

    Accepts HxWx3 (RGB or BGR per ``image_format``), HxWx4 (alpha dropped), HxW grayscale and
    PIL images (any mode; ``image_format`` does not apply to them).
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
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
    image = image[:, :, :3]
    if image_format == "BGR":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def _finite_array(value, name: str) -> np.ndarray:
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
    coords = _finite_array(point_coords, "point_coords")
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise ValueError(f"point_coords must have shape Nx2 (x, y) with N >= 1, got {coords.shape}")
    labels = _finite_array(point_labels, "point_labels")
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


def check_box(box) -> np.ndarray:
    """Validate one XYXY box (shape 4 or 1x4) with x0 <= x1 and y0 <= y1."""
    array = _finite_array(box, "box")
    if array.shape not in ((4,), (1, 4)):
        raise ValueError(f"box must have shape (4,) as x0, y0, x1, y1, got {array.shape}")
    x0, y0, x1, y1 = array.reshape(4)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must satisfy x0 <= x1 and y0 <= y1, got {array.reshape(4).tolist()}")
    return array.reshape(1, 4)


def check_mask_input(mask_input, size: tuple[int, int]) -> np.ndarray:
    """Validate low-res logits of shape 1xHxW (a previous prediction's, H=W=256)."""
    array = _finite_array(mask_input, "mask_input")
    if array.shape == size:
        array = array[None]
    if array.shape != (1, *size):
        raise ValueError(
            f"mask_input must have shape 1x{size[0]}x{size[1]} (low-res logits from a previous "
            f"predict), got {array.shape}"
        )
    return array


# Batches at least this large (without mask prompts) use ManyPromptDecoder.
MANY_PROMPTS = 8


class SamPredictor:
    def __init__(self, sam_model: Sam) -> None:
        if sam_model.device.type == "cpu":
            tune_allocator()  # ~1.5x faster CPU inference; see tinysam/perf.py
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_image(self, image: np.ndarray | Image.Image, image_format: str = "RGB") -> None:
        """Encode an image (HxWx3 uint8, RGB or BGR; HxW; HxWx4; or a PIL image)."""
        rgb = as_rgb_uint8(image, image_format)
        if self.model.image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        resized = self.transform.apply_image(rgb)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, rgb.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Encode an image already resized with ``transform`` (1x3xHxW, long side 1024)."""
        size = self.model.image_encoder.img_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[0] != 1 or shape[1] != 3 or max(shape[2:]) != size:
            raise ValueError(
                f"transformed_image must be 1x3xHxW with longest side {size}, got {list(shape)}"
            )
        if len(original_image_size) != 2 or min(original_image_size) <= 0:
            raise ValueError(f"original_image_size must be (H, W), got {original_image_size}")
        self.reset_image()
        self.original_size = tuple(int(v) for v in original_image_size)
        self.input_size = tuple(shape[-2:])
        encoder_input = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        self.features = self.model.image_encoder(encoder_input)
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts given in original-image pixels.

        Returns masks CxHxW (bool, or float logits with ``return_logits``), scores C and
        low-res logits Cx256x256; C is 3 with ``multimask_output``, else 1.
        """
        self._require_image()
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None:
                raise ValueError("point_coords must be given with point_labels")
            coords, labels = check_points(point_coords, point_labels)
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            boxes = self.transform.apply_boxes(check_box(box), self.original_size)
            box_t = torch.as_tensor(boxes, dtype=torch.float, device=self.device)[None]
        if mask_input is not None:
            mask = check_mask_input(mask_input, self.model.prompt_encoder.mask_input_size)
            mask_t = torch.as_tensor(mask, dtype=torch.float, device=self.device)[None]

        masks, scores, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), scores[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        upscale: bool = True,
        min_iou: float | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the resized (1024) frame.

        ``point_coords`` BxNx2 with ``point_labels`` BxN, ``boxes`` Bx4, ``mask_input``
        Bx1x256x256. Returns masks BxCxHxW, scores BxC, low-res logits BxCx256x256.

        For callers that filter many prompts (the everything mode): ``upscale=False`` skips the
        full-size masks (None); ``min_iou`` skips the masks of prompts none of whose scores
        exceed it, leaving their logits NaN. Batches without mask prompts run through
        ``ManyPromptDecoder``, which shares the work that does not depend on the prompt.
        """
        self._require_image()
        self._check_torch_prompts(point_coords, point_labels, boxes, mask_input)
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        if mask_input is None and sparse.shape[0] >= MANY_PROMPTS:
            decoder = self._many_prompt_decoder(dense)
            scores = decoder.decode(sparse)[0][:, selected]
            rows = None if min_iou is None else (scores > min_iou).any(dim=1).nonzero()[:, 0]
            logits = decoder.masks(rows)[:, selected]
            if rows is None:
                low_res = logits
            else:
                low_res = logits.new_full((sparse.shape[0], *logits.shape[1:]), float("nan"))
                low_res[rows] = logits
        else:
            low_res, scores = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        if not upscale:
            return None, scores, low_res
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res

    def _many_prompt_decoder(self, dense: torch.Tensor) -> ManyPromptDecoder:
        """The current image's ManyPromptDecoder (its shared work is done once per image)."""
        if self._many is None:
            self._many = ManyPromptDecoder(
                self.model.mask_decoder,
                self.features,
                self.model.prompt_encoder.get_dense_pe(),
                dense[:1],
            )
        return self._many

    def _check_torch_prompts(self, point_coords, point_labels, boxes, mask_input) -> None:
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
            if not torch.isfinite(point_coords).all():
                raise ValueError("point_coords contains NaN or infinite values")
            batch.add(point_coords.shape[0])
        if boxes is not None:
            if boxes.shape[-1] != 4 or boxes.ndim not in (2, 3):
                raise ValueError(f"boxes must be Bx4, got {list(boxes.shape)}")
            if not torch.isfinite(boxes).all():
                raise ValueError("boxes contains NaN or infinite values")
            batch.add(boxes.shape[0])
        if mask_input is not None:
            size = self.model.prompt_encoder.mask_input_size
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, *size):
                raise ValueError(
                    f"mask_input must be Bx1x{size[0]}x{size[1]}, got {list(mask_input.shape)}"
                )
            batch.add(mask_input.shape[0])
        if len(batch) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sorted(batch)}")

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, 1xCxHxW (256x64x64)."""
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self._many: ManyPromptDecoder | None = None
        self.original_size = None
        self.input_size = None

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image set: call set_image(image) before predicting")
