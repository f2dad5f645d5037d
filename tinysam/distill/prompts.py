"""Hard prompt sampling (``docs/method.md`` §1): points inside the ground truth first, then, for a
random number of rounds (0-9 per prompt), points from what the current prediction misses.

    P_0 ~ M_gt;   M_i = predict(P_i);   P_{i+1} ~ M_gt − M_i

The paper leaves three things open; the literal reading is the default and the others are flags:

* ``predictor``: which network predicts ``M_i`` -- the caller passes the function (the trainer's
  default is the student: its own mistakes make its hard prompts);
* ``accumulate``: keep the earlier points (``True``) or replace them by the new one (default
  ``False``: the prompt is the single point sampled last);
* ``negative_points``: also sample from the false positives ``M_i − M_gt`` with label 0 (default
  ``False``: ``M_gt − M_i`` is the missed region only, positive points).

A point is a pixel centre (x + 0.5 is added by the prompt encoder); a round whose sampling region
is empty keeps the prompt as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_ITERATIONS = 9


@dataclass
class HardPromptOptions:
    max_iterations: int = MAX_ITERATIONS  # rounds drawn uniformly from 0..max_iterations
    accumulate: bool = False
    negative_points: bool = False

    def __post_init__(self) -> None:
        if self.max_iterations < 0:
            raise ValueError(
                f"prompt_options.max_iterations must be >= 0, got {self.max_iterations}"
            )


def sample_points(regions: torch.Tensor, generator: torch.Generator | None = None):
    """One pixel drawn uniformly from each region (B x H x W bool): B x 2 (x, y), and B bools
    saying which regions were non-empty (empty ones give (0, 0))."""
    flat = regions.flatten(1).float()
    counts = flat.sum(1)
    found = counts > 0
    probs = torch.where(found[:, None], flat, torch.ones_like(flat))
    index = torch.multinomial(probs, 1, generator=generator)[:, 0]
    width = regions.shape[-1]
    xy = torch.stack([index % width, index // width], dim=1).to(torch.float32)
    return torch.where(found[:, None], xy, torch.zeros_like(xy)), found


def hard_prompts(
    gt_masks: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    options: HardPromptOptions | None = None,
    generator: torch.Generator | None = None,
    iterations: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point prompts for B ground-truth masks (B x H x W bool, the frame points live in).

    ``predict(rows, points, labels)`` returns B' x H x W bool masks for the prompts ``rows``
    (indices into the batch) given points B' x N x 2 and labels B' x N (called without
    gradients). Returns points B x N x 2, labels B x N (N = 1 unless
    ``accumulate``; unused slots of shorter prompts are padding, label -1) and the rounds each
    prompt got (drawn uniformly from 0..max_iterations unless ``iterations`` is given).
    """
    options = options or HardPromptOptions()
    batch = gt_masks.shape[0]
    gt = gt_masks.bool()
    if iterations is None:
        iterations = torch.randint(0, options.max_iterations + 1, (batch,), generator=generator)
    first, _ = sample_points(gt, generator)
    points = [first[:, None]]
    labels = [torch.ones(batch, 1)]
    for round_index in range(int(iterations.max()) if batch else 0):
        active = iterations > round_index
        current_points = torch.cat(points, dim=1)
        current_labels = torch.cat(labels, dim=1)
        with torch.no_grad():
            rows = active.nonzero()[:, 0]
            predicted = predict(rows, current_points[active], current_labels[active]).bool()
        missed = gt[active] & ~predicted
        new_xy, new_label = _next_points(missed, predicted & ~gt[active], options, generator)
        # Prompts whose region is empty (a perfect prediction) keep what they have.
        xy = current_points[:, -1].clone()
        label = current_labels[:, -1].clone()
        xy[active] = torch.where(new_label[:, None] >= 0, new_xy, xy[active])
        label[active] = torch.where(new_label >= 0, new_label, label[active])
        if options.accumulate:
            # A new slot for every prompt; prompts without a new point get padding there.
            changed = torch.zeros(batch, dtype=torch.bool)
            changed[active] = new_label >= 0
            points.append(torch.where(changed[:, None], xy, torch.zeros_like(xy))[:, None])
            labels.append(torch.where(changed, label, torch.full_like(label, -1.0))[:, None])
        else:
            points, labels = [xy[:, None]], [label[:, None]]
    return torch.cat(points, dim=1), torch.cat(labels, dim=1), iterations


def _next_points(
    missed: torch.Tensor,
    false_positive: torch.Tensor,
    options: HardPromptOptions,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next point for each prompt and its label (1 missed, 0 false positive, -1 none)."""
    xy, found = sample_points(missed, generator)
    label = torch.where(found, torch.ones(len(found)), torch.full((len(found),), -1.0))
    if options.negative_points:
        # From the larger of the two error regions, as an annotator would click.
        negative_xy, negative_found = sample_points(false_positive, generator)
        use_negative = negative_found & (
            false_positive.flatten(1).sum(1) > missed.flatten(1).sum(1)
        )
        xy = torch.where(use_negative[:, None], negative_xy, xy)
        label = torch.where(use_negative, torch.zeros_like(label), label)
    return xy, label
