"""What every predictor backend shares: segment-anything's ``SamPredictor`` API over an
image-encoding step and a batched decoding step that each backend supplies.

``SamPredictor`` (PyTorch) and ``runtime.OnnxPredictor`` (ONNX Runtime, no torch) both derive
from ``PredictorBase``. The everything generators, the evaluations and the web demo rely on
this contract only: ``set_image``, ``predict``, ``predict_torch`` (with the ``upscale`` and
``min_iou`` options), ``transform``, ``original_size``, ``input_size``, and the image state
(``image_state`` / ``restore_image_state``) that lets a cache switch images without encoding
again. Torch-free, like ``checks``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .checks import as_rgb_uint8, single_prompt_batch
from .transforms import ResizeLongestSide

# Prompt batches at least this large (one-point prompts, no mask input) go through the
# many-prompt decoder, which shares the prompt-independent work (see modeling/many_prompts.py).
DEFAULT_MANY_PROMPTS = 8
# The many-prompt decoder takes a big batch this many prompts at a time: its attention maps and
# low-rank image updates grow with the batch (64 prompts at once peaked at 1.6 GB for an
# 1800x1200 image, 16 at 0.7 GB, no slower), and the results do not depend on the grouping.
MANY_PROMPT_CHUNK = 16
# Full-size masks are made from their low-res logits this many bytes of float logits at a time
# (at least one mask): B x C x H x W floats at once would grow with the batch and the image (100
# boxes x 3 candidates at 1800x1200 is 2.6 GB), while the answer itself needs 1 byte a pixel.
UPSCALE_CHUNK_BYTES = 64 << 20


def release_encoder_memory(encoder) -> None:
    """Before the many-prompt decoder grows its buffers: an encoder engine that keeps its
    activations between runs (``OpenVinoEncoder``) frees them; others have nothing to free."""
    release = getattr(encoder, "release_memory", None)
    if release is not None:
        release()


class ModelOutputError(ValueError):
    """The model answered with NaN or infinite numbers: its weights (or export) are damaged."""


@dataclass(frozen=True)
class ImageState:
    """What a predictor holds for its current image: enough to answer prompts without
    encoding again. ``features`` is the backend's array (a torch tensor or a numpy array)."""

    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        if hasattr(self.features, "nbytes"):
            return int(self.features.nbytes)
        return int(self.features.element_size() * self.features.nelement())  # torch


class PredictorBase(ABC):
    """Encode an image once, then answer many prompts against it.

    ``many_prompts``: the prompt batch size from which the many-prompt decoder is used (set it
    very high to always use the plain decoder, e.g. to time the difference).
    """

    #: "RGB" or "BGR": the channel order the model was trained on.
    image_format: str = "RGB"
    #: ``predict_torch`` takes ``upscale`` and ``min_iou`` (the everything generators ask).
    filters_while_decoding: bool = True
    #: The low-res mask size (256x256), set by each backend before ``__init__``.
    mask_input_size: tuple[int, int]

    def __init__(self, image_size: int, many_prompts: int = DEFAULT_MANY_PROMPTS) -> None:
        if many_prompts < 1:
            raise ValueError(f"many_prompts must be at least 1, got {many_prompts}")
        self.many_prompts = many_prompts
        self.transform = ResizeLongestSide(image_size)
        self.reset_image()

    # ------------------------------------------------------------------ backend hooks

    @abstractmethod
    def _encode(self, resized: np.ndarray, original_size: tuple[int, int]) -> None:
        """Encode ``resized`` (HxWx3 uint8, long side ``transform.target_length``) and set the
        image state (``features``, ``original_size``, ``input_size``, ``is_image_set``)."""

    @abstractmethod
    def _prompt_arrays(self, coords, labels, boxes, mask) -> tuple:
        """``predict``'s checked numpy prompts as what this backend's ``predict_torch`` takes."""

    @abstractmethod
    def predict_torch(
        self,
        point_coords,
        point_labels,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        upscale: bool = True,
        min_iou: float | None = None,
    ) -> tuple[Any, Any, Any]:
        """Batched prompts in the resized (1024) frame: ``point_coords`` BxNx2 with
        ``point_labels`` BxN, ``boxes`` Bx4, ``mask_input`` Bx1x256x256. Returns masks BxCxHxW,
        scores BxC and low-res logits BxCx256x256.

        For callers that filter many prompts (the everything mode): ``upscale=False`` skips the
        full-size masks (None); ``min_iou`` skips the masks of prompts none of whose scores
        exceed it, leaving their logits NaN."""

    @abstractmethod
    def _upscale(self, low_res) -> Any:
        """Float logits at the original size (Nx1xHxW) for low-res logits Nx1x256x256, both
        backend arrays."""

    @abstractmethod
    def _empty(self, shape: tuple[int, ...], logits: bool) -> Any:
        """An uninitialised backend array: float32 for logits, else bool."""

    @staticmethod
    @abstractmethod
    def _numpy(value) -> np.ndarray:
        """A backend array as numpy."""

    def _backend_array(self, value):
        """An array (e.g. a saved embedding, numpy) as this backend's array type."""
        return value

    @property
    def embedding_shape(self) -> tuple[int, ...] | None:
        """The image embedding's shape (1 x C x H x W), to check a saved one against; None
        where the backend cannot say."""
        return None

    # ------------------------------------------------------------------ image

    def set_image(self, image: np.ndarray | Image.Image, image_format: str = "RGB") -> None:
        """Encode an image (HxWx3 uint8, RGB or BGR; HxW; HxWx4; or a PIL image)."""
        rgb = as_rgb_uint8(image, image_format)
        if self.image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        self._encode(self.transform.apply_image(rgb), rgb.shape[:2])

    def get_image_embedding(self):
        """The current image's embedding, 1xCxHxW (256x64x64), in the backend's array type."""
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None

    def image_state(self) -> ImageState:
        """The current image's state, to bring back later with ``restore_image_state``."""
        self._require_image()
        return ImageState(self.features, self.original_size, self.input_size)

    def restore_image_state(self, state: ImageState) -> None:
        """Make a saved image current again, as if ``set_image`` had just encoded it."""
        self.reset_image()  # drops per-image helpers (e.g. the many-prompt decoder's work)
        self.features = self._backend_array(state.features)
        self.original_size = tuple(state.original_size)
        self.input_size = tuple(state.input_size)
        self.is_image_set = True

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image set: call set_image(image) before predicting")

    # ------------------------------------------------------------------ full-size masks

    def upscale_masks(self, low_res, return_logits: bool = False):
        """Low-res logits (...x256x256, a backend array) as masks at the original image size
        (...xHxW: bool, or float logits), made ``UPSCALE_CHUNK_BYTES`` of logits at a time, so
        the peak is the answer (1 byte a pixel a mask) plus one chunk, whatever the batch."""
        self._require_image()
        h, w = self.original_size
        lead = tuple(low_res.shape[:-2])
        flat = low_res.reshape(-1, 1, *low_res.shape[-2:])
        count = flat.shape[0]
        out = self._empty((count, h, w), return_logits)
        step = max(1, UPSCALE_CHUNK_BYTES // (4 * h * w))
        for start in range(0, count, step):
            logits = self._upscale(flat[start : start + step])[:, 0]
            out[start : start + step] = logits if return_logits else logits > self.mask_threshold
        return out.reshape(*lead, h, w)

    # ------------------------------------------------------------------ prompts

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
        prompts = self._single_prompt(point_coords, point_labels, box, mask_input)
        masks, scores, low_res = self.predict_torch(
            *prompts, multimask_output, return_logits=return_logits
        )
        return (
            self._numpy(masks[0]),
            _finite_scores(self._numpy(scores[0])),
            self._numpy(low_res[0]),
        )

    def _single_prompt(self, point_coords, point_labels, box, mask_input) -> tuple:
        """``predict``'s arguments, checked, as a batch of one in this backend's arrays."""
        self._require_image()
        prompts = single_prompt_batch(
            point_coords,
            point_labels,
            box,
            mask_input,
            self.transform,
            self.original_size,
            self.mask_input_size,
        )
        return self._prompt_arrays(*prompts)

    def predict_best(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, float]:
        """The mask that answers the prompts, as ``predict`` takes them: the candidate with the
        highest predicted IoU, HxW bool, and that score. Only this mask is made at full size
        (``predict`` makes all three: 3x the memory on a large image)."""
        prompts = self._single_prompt(point_coords, point_labels, box, mask_input)
        _, scores, low_res = self.predict_torch(*prompts, multimask_output, upscale=False)
        scores = _finite_scores(self._numpy(scores[0]))
        best = int(np.argmax(scores))
        mask = self.upscale_masks(low_res[0, best : best + 1])[0]
        return self._numpy(mask), float(scores[best])


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(scores)):
        raise ModelOutputError(
            "the model produced NaN or infinite scores: its weights are damaged (check the "
            "checkpoint or export it again)"
        )
    return scores
