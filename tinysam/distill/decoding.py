"""Running a SAM-family model the way distillation needs it: every mask token's low-res logits
with the decoder's output tokens (``decode``), the student's forward pass as one module for DDP,
and the low-res frame masks are compared in."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam
from .losses import ModelOutputs


class StudentForward(nn.Module):
    """The student's whole forward pass as one module, so DDP sees (and syncs) every gradient:
    the image encoder once, then each group of prompts (points or boxes) against it."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor, groups: list[tuple]) -> list[ModelOutputs]:
        embedding = self.sam.image_encoder(image)
        return [decode(self.sam, embedding, *group) for group in groups]


def as_float32(outputs: ModelOutputs) -> ModelOutputs:
    """The outputs in float32 (the losses' precision), whatever the autocast made them."""
    return ModelOutputs(*(t.float() for t in vars(outputs).values()))


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def to_low_res(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Input-frame masks (K x S x S bool) in the decoder's low-res frame, where the losses
    compare masks: a pixel is in when most of the area it covers is."""
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5


def decode(sam: Sam, embedding: torch.Tensor, points, labels, boxes) -> ModelOutputs:
    """Prompts (points B x N x 2 with labels B x N, or boxes B x 4) against one image
    embedding: every mask token's low-res logits, the IoU predictions and the tokens."""
    point_prompt = None if points is None else (points, labels)
    sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=boxes, masks=None)
    masks, iou, tokens = sam.mask_decoder.predict_masks(
        embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, return_tokens=True
    )
    return ModelOutputs(embedding, tokens, masks, iou)
