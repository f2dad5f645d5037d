"""TinySAM's full-stage distillation losses (``docs/method.md`` §1), with the ground-truth terms.

    L_total   = L_distill + focal·L_focal + dice·L_dice + iou·L_iou
    L_distill = α·ℓ1(embeddings) + β·ℓ1(two-way transformer output tokens)
                + γ·mean_i H_i·ℓ1(mask logits_i)
    H_i       = sigmoid( IoU(M_i^T, M_i^GT) / (IoU(M_i^S, M_i^GT) + ε) − 1 )

``i`` runs over every (prompt, mask) pair; the paper writes a sum, the mean keeps the scale
independent of the prompt count. Masks are compared as low-res logits (the decoder's 256x256 output
in the padded input frame), with the ground truth brought to that frame. H_i is a weight, not a
path for gradients (detached). The ℓ1 distances are means over elements, as the authors chose ℓ1
over MSE because MSE values were too small to optimise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..masks import binary_iou

EPS = 1e-6


@dataclass
class LossWeights:
    """Term weights. The paper gives none for α, β, γ; 1.0 each keeps the three ℓ1 terms on
    their natural scales. focal:dice = 20:1 and iou = 1 are SAM's."""

    embedding: float = 1.0  # α
    tokens: float = 1.0  # β
    output: float = 1.0  # γ
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    hard_mask_weighting: bool = True

    def __post_init__(self) -> None:
        for name in ("embedding", "tokens", "output", "focal", "dice", "iou"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"losses.{name} must be a finite number >= 0, got {value}")


@dataclass
class ModelOutputs:
    """What one network produced for a batch of prompts on one image (or a batch of images)."""

    embedding: torch.Tensor  # B_img x C x h x w
    tokens: torch.Tensor  # B x T x C, the two-way transformer's output tokens
    masks: torch.Tensor  # B x M x 4h x 4w low-res logits
    iou: torch.Tensor  # B x M predicted IoU


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def mask_iou(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each mask (logits > 0) with its ground truth (bool)."""
    return binary_iou(logits > 0, gt)


def hard_mask_weight(
    teacher_iou: torch.Tensor, student_iou: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """H = sigmoid(IoU_T / (IoU_S + eps) - 1): 0.5 when both fit the ground truth equally,
    towards 1 where the teacher fits it far better, sigmoid(-1) ~ 0.27 where the teacher misses."""
    return torch.sigmoid(teacher_iou / (student_iou + eps) - 1)


def focal_loss(
    logits: torch.Tensor, gt: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-mask sigmoid focal loss (mean over pixels), ...x H x W -> ..."""
    target = gt.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-mask soft dice loss, ...x H x W -> ..."""
    prob = logits.sigmoid().flatten(-2)
    target = gt.to(logits.dtype).flatten(-2)
    numerator = 2 * (prob * target).sum(-1)
    denominator = prob.sum(-1) + target.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def distillation_loss(
    student: ModelOutputs,
    teacher: ModelOutputs | None,
    gt_masks: torch.Tensor,
    weights: LossWeights | None = None,
    candidates: slice = slice(None),
) -> dict[str, torch.Tensor]:
    """Every term and the total. ``gt_masks`` is B x 4h x 4w (bool), one per prompt.

    The ground-truth terms follow SAM: of a prompt's ``candidates`` masks only the one with the
    lowest focal + dice loss is trained on the ground truth (SAM: masks 1-3 for a single point,
    mask 0 for boxes and several points, see ``mask_candidates``), while the IoU head learns every
    mask's actual IoU. Without a ``teacher`` the distillation terms are zero
    (plain supervised training).
    """
    weights = weights or LossWeights()
    gt = gt_masks[:, None].expand_as(student.masks)
    with torch.no_grad():
        student_iou = mask_iou(student.masks, gt)
        h = torch.ones_like(student_iou)
        if teacher is not None and weights.hard_mask_weighting:
            h = hard_mask_weight(mask_iou(teacher.masks, gt), student_iou)
    if teacher is None:
        zero = student.masks.new_zeros(())
        terms = {"embedding": zero, "tokens": zero, "output": zero}
    else:
        per_mask_output = (student.masks - teacher.masks).abs().flatten(-2).mean(-1)  # B x M
        terms = {
            "embedding": l1(student.embedding, teacher.embedding),
            "tokens": l1(student.tokens, teacher.tokens),
            "output": (h * per_mask_output).mean(),
        }
    focal = focal_loss(student.masks[:, candidates], gt[:, candidates])
    dice = dice_loss(student.masks[:, candidates], gt[:, candidates])
    best = (weights.focal * focal + weights.dice * dice).argmin(dim=1, keepdim=True)
    terms["focal"] = focal.gather(1, best).mean()
    terms["dice"] = dice.gather(1, best).mean()
    terms["iou"] = l1(student.iou, student_iou)
    terms["total"] = (
        weights.embedding * terms["embedding"]
        + weights.tokens * terms["tokens"]
        + weights.output * terms["output"]
        + weights.focal * terms["focal"]
        + weights.dice * terms["dice"]
        + weights.iou * terms["iou"]
    )
    terms["hard_mask_weight"] = h.mean()
    return terms
