"""Hard prompt sampling: where points land, with which labels, and how they move to the edge."""

from __future__ import annotations

import torch

from tinysam.distill.prompts import HardPromptOptions, hard_prompts, sample_points

SIZE = 64


def _disc(cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def _gts(batch: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(batch, 2, generator=g) * 24 + 20
    radii = torch.rand(batch, generator=g) * 8 + 10
    return torch.stack([_disc(*c.tolist(), float(r)) for c, r in zip(centres, radii)])


def _inside(masks: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[:, 0].long(), xy[:, 1].long()
    return masks[torch.arange(len(masks)), y, x]


def _distance_to_edge(mask: torch.Tensor, xy: torch.Tensor) -> float:
    """Distance from a point to the nearest pixel outside the mask."""
    outside = (~mask).nonzero().float()  # (y, x)
    return float((outside - torch.stack([xy[1], xy[0]])).norm(dim=1).min())


def _predicts_nothing(rows, points, labels):
    return torch.zeros(len(rows), SIZE, SIZE, dtype=torch.bool)


class _MissesTheRim:
    """A predictor that gets the interior of the ground truth but misses a rim of 3 pixels."""

    def __init__(self, gts: torch.Tensor) -> None:
        outside = (~gts).float()[:, None]
        grown = torch.nn.functional.max_pool2d(outside, 7, stride=1, padding=3)[:, 0]
        self.interior = gts & (grown == 0)

    def __call__(self, rows, points, labels):
        return self.interior[rows]


def test_sample_points_stay_in_their_regions():
    regions = _gts(16)
    regions[3] = False  # an empty region
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        xy, found = sample_points(regions, g)
        assert found.tolist() == [i != 3 for i in range(16)]
        assert _inside(regions, xy)[found].all()
        assert torch.equal(xy[3], torch.zeros(2))


def test_first_points_are_positive_and_inside_the_ground_truth():
    gts = _gts()
    none = torch.zeros(32, dtype=torch.long)
    points, labels, rounds = hard_prompts(gts, _predicts_nothing, iterations=none)
    assert points.shape == (32, 1, 2) and labels.tolist() == [[1.0]] * 32
    assert _inside(gts, points[:, 0]).all() and rounds.sum() == 0


def test_later_rounds_land_in_the_missed_region_near_the_edge():
    gts = _gts()
    predictor = _MissesTheRim(gts)
    g = torch.Generator().manual_seed(2)
    none = torch.zeros(32, dtype=torch.long)
    zero, _, _ = hard_prompts(gts, predictor, iterations=none, generator=g)
    later, labels, _ = hard_prompts(gts, predictor, iterations=torch.full((32,), 3), generator=g)
    assert labels.tolist() == [[1.0]] * 32  # literal reading: positive points only
    rim = gts & ~predictor.interior
    assert _inside(rim, later[:, 0]).all()  # sampled from M_gt - M_i
    first = sum(_distance_to_edge(m, p[0]) for m, p in zip(gts, zero)) / 32
    last = sum(_distance_to_edge(m, p[0]) for m, p in zip(gts, later)) / 32
    assert last < first / 2  # closer to the boundary on average


def test_round_counts_are_uniform_from_0_to_9():
    gts = _gts(8)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(10)
    for _ in range(200):
        _, _, rounds = hard_prompts(gts, _predicts_nothing, generator=g)
        counts += torch.bincount(rounds, minlength=10)
    assert len(counts) == 10 and counts.min() > 0.7 * counts.mean()


def test_only_prompts_with_rounds_left_are_predicted():
    gts = _gts(6)
    seen = []

    def predict(rows, points, labels):
        seen.append(rows.tolist())
        return torch.zeros(len(rows), SIZE, SIZE, dtype=torch.bool)

    hard_prompts(gts, predict, iterations=torch.tensor([0, 2, 1, 0, 3, 2]))
    assert seen == [[1, 2, 4, 5], [1, 4, 5], [4]]


def test_accumulate_and_negative_points():
    gts = _gts(8)
    # The prediction is the ground truth shifted: it misses a part and overshoots another of
    # the same size; for odd prompts it overshoots more, so their next clicks are negative.
    shifted = torch.roll(gts, shifts=6, dims=2)
    shifted[1::2] |= torch.roll(gts[1::2], shifts=12, dims=2)
    g = torch.Generator().manual_seed(4)
    options = HardPromptOptions(accumulate=True, negative_points=True)
    points, labels, _ = hard_prompts(
        gts, lambda rows, p, lab: shifted[rows], options, g, iterations=torch.full((8,), 2)
    )
    assert points.shape == (8, 3, 2)  # the first point and two more, all kept
    assert (labels[:, 0] == 1).all()
    assert (labels[0::2, 1:] == 1).all() and (labels[1::2, 1:] == 0).all()
    for b in range(8):
        for k in (1, 2):
            x, y = points[b, k].long().tolist()
            if labels[b, k] == 1:
                assert gts[b, y, x] and not shifted[b, y, x]
            else:
                assert labels[b, k] == 0 and shifted[b, y, x] and not gts[b, y, x]
