"""The distillation losses and hard mask weighting (docs/method.md §1)."""

from __future__ import annotations

import math

import pytest
import torch

from tinysam.distill.losses import (
    LossWeights,
    ModelOutputs,
    dice_loss,
    distillation_loss,
    focal_loss,
    hard_mask_weight,
    mask_iou,
)
from tinysam.masks import chosen_masks, mask_candidates


def _outputs(seed: int, batch: int = 4, masks: int = 3) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)
    return ModelOutputs(
        embedding=torch.randn(1, 8, 4, 4, generator=g),
        tokens=torch.randn(batch, 7, 8, generator=g),
        masks=torch.randn(batch, masks, 16, 16, generator=g) * 5,
        iou=torch.rand(batch, masks, generator=g),
    )


def _gt(batch: int = 4) -> torch.Tensor:
    gt = torch.zeros(batch, 16, 16, dtype=torch.bool)
    for b in range(batch):
        gt[b, 2 + b : 10 + b, 3:12] = True
    return gt


def test_hard_mask_weight_formula_and_limits():
    t, s = torch.tensor([0.9, 0.6, 0.0, 0.8, 0.5]), torch.tensor([0.3, 0.6, 0.7, 0.0, 0.5])
    h = hard_mask_weight(t, s)
    expected = [1 / (1 + math.exp(-(ti / (si + 1e-6) - 1))) for ti, si in zip(t, s)]
    assert torch.allclose(h, torch.tensor(expected))
    assert h[1] == pytest.approx(0.5, abs=1e-5)  # equal fits: neutral weight
    assert h[2] == pytest.approx(1 / (1 + math.e))  # teacher misses: the floor, sigmoid(-1)
    assert h[3] > 0.999  # the student misses what the teacher gets: weight -> 1
    assert h[0] > h[1] > h[2]  # monotone in how much better the teacher fits


def test_distillation_terms_vanish_only_for_identical_networks():
    student, teacher = _outputs(0), _outputs(0)
    same = distillation_loss(student, teacher, _gt())
    for name in ("embedding", "tokens", "output"):
        assert same[name] == 0
    other = _outputs(1)
    for part in ("embedding", "tokens", "masks"):
        changed = ModelOutputs(**{**vars(teacher), part: getattr(other, part)})
        terms = distillation_loss(student, changed, _gt())
        name = {"masks": "output"}.get(part, part)
        assert terms[name] > 0, part


def test_ground_truth_terms():
    gt = _gt()
    perfect = torch.where(gt, 30.0, -30.0)[:, None].expand(-1, 3, -1, -1)
    assert focal_loss(perfect, gt[:, None].expand_as(perfect)).max() < 1e-6
    assert dice_loss(perfect, gt[:, None].expand_as(perfect)).max() < 1e-6
    assert focal_loss(-perfect, gt[:, None].expand_as(perfect)).min() > 1.0
    assert dice_loss(-perfect, gt[:, None].expand_as(perfect)).min() > 0.9
    assert torch.equal(mask_iou(perfect, gt[:, None]), torch.ones(4, 3))

    outputs = _outputs(2)
    student = ModelOutputs(outputs.embedding, outputs.tokens, perfect, torch.ones(4, 3))
    terms = distillation_loss(student, outputs, gt)
    assert terms["focal"] < 1e-6 and terms["dice"] < 1e-6 and terms["iou"] < 1e-6


def test_hard_mask_weighting_switch_and_weights():
    student, teacher, gt = _outputs(3), _outputs(4), _gt()
    on = distillation_loss(student, teacher, gt)
    off = distillation_loss(student, teacher, gt, LossWeights(hard_mask_weighting=False))
    assert off["hard_mask_weight"] == 1.0 and 0.26 < on["hard_mask_weight"] < 1.0
    assert on["output"] < off["output"]  # every H < 1 here
    manual = (
        on["embedding"] + on["tokens"] + on["output"] + 20 * on["focal"] + on["dice"] + on["iou"]
    )
    assert torch.isclose(on["total"], manual)


def test_gradients_reach_the_student_only_through_the_loss_terms():
    student, teacher, gt = _outputs(5), _outputs(6), _gt()
    for t in (student.embedding, student.tokens, student.masks, student.iou):
        t.requires_grad_(True)
    distillation_loss(student, teacher, gt)["total"].backward()
    for t in (student.embedding, student.tokens, student.masks, student.iou):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_ground_truth_trains_the_masks_sam_answers_with():
    """One point: the best of masks 1-3; boxes and several points: mask 0 alone."""
    gt = _gt()
    perfect = torch.where(gt, 30.0, -30.0)
    masks = torch.stack([-perfect, -perfect, perfect, -perfect], dim=1)  # only mask 2 is right
    student = ModelOutputs(torch.zeros(1, 8, 4, 4), torch.zeros(4, 7, 8), masks, torch.ones(4, 4))
    one_point = distillation_loss(student, None, gt, candidates=mask_candidates(1))
    box = distillation_loss(student, None, gt, candidates=mask_candidates(0))
    assert one_point["focal"] < 1e-6 and one_point["dice"] < 1e-6
    assert box["focal"] > 1.0 and box["dice"] > 0.9
    assert mask_candidates(2) == mask_candidates(0) == slice(0, 1)

    iou = torch.tensor([[0.9, 0.1, 0.8, 0.2]]).expand(4, 4)
    assert torch.equal(chosen_masks(masks, iou, mask_candidates(1)), gt)  # mask 2, not mask 0
    assert torch.equal(chosen_masks(masks, iou, mask_candidates(0)), ~gt)
