"""``SamPredictor``: encode an image once, then answer many prompts against it.

The API is segment-anything's. Inputs are checked here, at the boundary (with the checks in
``tinysam.checks``, shared with the ONNX predictor), so a wrong dtype, shape or a NaN becomes one
``ValueError`` naming the argument instead of a traceback from deep in torch.
"""

from __future__ import annotations

import numpy as np
import torch

from .checks import check_prompt_batch
from .modeling import Sam
from .modeling.many_prompts import ManyPromptDecoder
from .perf import PRECISIONS, bf16_is_fast, tune_allocator
from .predictor_base import (
    DEFAULT_MANY_PROMPTS,
    MANY_PROMPT_CHUNK,
    PredictorBase,
    release_encoder_memory,
)


class SamPredictor(PredictorBase):
    """``PredictorBase`` on a PyTorch ``Sam`` (any device).

    ``image_encoder``: another engine for the image encoder on the CPU (an ONNX Runtime
    session or ``OpenVinoEncoder`` of the same model's ``encoder.onnx``: ``run(None,
    {"image": x})``), where it is faster than torch's; prompts stay on torch, whose
    many-prompt decoder keeps work across batches that the ONNX graphs recompute.

    ``precision="bf16"``: the image encoder runs under torch's bf16 autocast (products in
    bf16, norms and softmax in fp32; the embedding comes back as fp32); fast on CPUs with
    AVX512-BF16 or AMX, emulated elsewhere. Where bf16 is fast (those CPUs, or a GPU), the
    many-prompt decoder's masks (everything mode's largest products) run in bf16 too; its
    prompt decoding and the plain decoder stay fp32."""

    def __init__(
        self,
        sam_model: Sam,
        many_prompts: int = DEFAULT_MANY_PROMPTS,
        image_encoder=None,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if sam_model.device.type == "cpu":
            tune_allocator()  # ~1.5x faster CPU inference; see tinysam/perf.py
        elif image_encoder is not None:
            raise ValueError("an image_encoder engine runs on the CPU; keep the model there")
        self.image_encoder = image_encoder
        self.model = sam_model
        self.image_format = sam_model.image_format
        self.mask_input_size = tuple(sam_model.prompt_encoder.mask_input_size)
        super().__init__(sam_model.image_encoder.img_size, many_prompts)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _encode(self, resized: np.ndarray, original_size: tuple[int, int]) -> None:
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, original_size)

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
        if self.image_encoder is None:
            bf16 = self.precision == "bf16"
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                self.features = self.model.image_encoder(encoder_input).float()
        else:
            (features,) = self.image_encoder.run(None, {"image": encoder_input.numpy()})[:1]
            self.features = torch.from_numpy(np.ascontiguousarray(features))
        self.is_image_set = True

    def _prompt_arrays(self, coords, labels, boxes, mask) -> tuple:
        return tuple(
            None if a is None else torch.as_tensor(a, dtype=dtype, device=self.device)
            for a, dtype in zip(
                (coords, labels, boxes, mask), (torch.float, torch.int, torch.float, torch.float)
            )
        )

    @staticmethod
    def _numpy(value) -> np.ndarray:
        return value.cpu().numpy()

    def _backend_array(self, value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float32, device=self.device)

    @property
    def embedding_shape(self) -> tuple[int, int, int, int]:
        """The image encoder's output shape (1 x C x H x W)."""
        prompt = self.model.prompt_encoder
        return (1, prompt.embed_dim, *prompt.image_embedding_size)

    @property
    def mask_threshold(self) -> float:
        return self.model.mask_threshold

    def _upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        return self.model.postprocess_masks(low_res, self.input_size, self.original_size)

    def _empty(self, shape: tuple[int, ...], logits: bool) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32 if logits else torch.bool, device=self.device)

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
        many = getattr(self.model.mask_decoder, "supports_many_prompts", True)
        if mask_input is None and sparse.shape[0] >= self.many_prompts and many:
            scores, low_res = self._many_prompts(sparse, dense, selected, min_iou)
        else:
            low_res, scores = self._decode(sparse, dense, multimask_output)
        if not upscale:
            return None, scores, low_res
        return self.upscale_masks(low_res, return_logits), scores, low_res

    def _decode(
        self, sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain decoder, ``MANY_PROMPT_CHUNK`` prompts at a time: it copies the image
        embedding and upscales 32 channels to 256x256 for every prompt (100 boxes at once
        held 1.3 GB of them)."""
        parts = [
            self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse_rows,
                dense_prompt_embeddings=dense_rows,
                multimask_output=multimask_output,
            )
            for sparse_rows, dense_rows in zip(
                sparse.split(MANY_PROMPT_CHUNK), dense.split(MANY_PROMPT_CHUNK)
            )
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _many_prompts(
        self, sparse: torch.Tensor, dense: torch.Tensor, selected: slice, min_iou: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and low-res logits through ``ManyPromptDecoder``, ``MANY_PROMPT_CHUNK``
        prompts at a time; with ``min_iou``, logits only where a score passes (others NaN)."""
        release_encoder_memory(self.image_encoder)
        decoder = self._many_prompt_decoder(dense)
        all_scores, all_logits = [], []
        for chunk in sparse.split(MANY_PROMPT_CHUNK):
            scores = decoder.decode(chunk)[0][:, selected]
            rows = None if min_iou is None else (scores > min_iou).any(dim=1).nonzero()[:, 0]
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self._bf16_masks()):
                logits = decoder.masks(rows)[:, selected].float()
            if rows is not None:
                kept = logits
                logits = kept.new_full((chunk.shape[0], *kept.shape[1:]), float("nan"))
                logits[rows] = kept
            all_scores.append(scores)
            all_logits.append(logits)
        return torch.cat(all_scores), torch.cat(all_logits)

    def _bf16_masks(self) -> bool:
        """Whether the many-prompt decoder's masks run in bf16: asked for, and where it pays
        (emulated bf16 would make everything mode's decoder about 12x slower). Its prompt
        decoding stays fp32: the low-rank updates mix dtypes, which autocast does not cover."""
        if self.precision != "bf16":
            return False
        return self.device.type != "cpu" or bf16_is_fast()

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
        check_prompt_batch(
            point_coords,
            point_labels,
            boxes,
            mask_input,
            self.model.prompt_encoder.mask_input_size,
            lambda x: bool(torch.isfinite(x).all()),
        )

    def reset_image(self) -> None:
        super().reset_image()
        self._many: ManyPromptDecoder | None = None
