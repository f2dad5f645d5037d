"""Counts, boxes and RLE runs of full-size masks made from low-res logits without upscaling
them (tinysam.everything.upscaled) against the reference's upscale-then-threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinysam.everything.upscaled import UpscaledMasks, axis_map, resize_matrix
from tinysam.masks import batched_mask_to_box, mask_to_rle, rle_to_mask
from tinysam.transforms import ResizeLongestSide, upscale_logits

# Original sizes: landscape, near-square, smaller than the 1024 input (a downscale in the
# second resize), tall and tiny, and larger than the input.
SIZES = [(1200, 1800), (769, 770), (480, 640), (100, 37), (2000, 1500)]


def _input_size(size: tuple[int, int], padded: int = 1024) -> tuple[int, int]:
    return ResizeLongestSide(padded).get_preprocess_shape(*size, padded)


def _logits(seed: int, low: int = 256) -> torch.Tensor:
    """Mask-like logits (smooth blobs, as trained decoders make), pixel noise, and constants."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(4, 1, 24, 24, generator=g) * 8, (low, low), mode="bicubic")
    noise = torch.randn(1, 1, low, low, generator=g) * 2
    constant = torch.tensor([-5.0, 5.0, 0.0]).view(3, 1, 1, 1).expand(3, 1, low, low)
    return torch.cat([smooth, noise, constant])[:, 0].contiguous()


def test_resize_matrix_is_torch_bilinear():
    for size_in, size_out in [(256, 1024), (683, 1200), (1024, 640), (37, 100), (1024, 37)]:
        matrix = torch.from_numpy(resize_matrix(size_in, size_out)).float()
        probe = torch.eye(size_in)[None, None]  # each column a one-hot row image
        expected = F.interpolate(probe, (size_out, size_in), mode="bilinear", align_corners=False)
        assert torch.allclose(matrix, expected[0, 0], atol=1e-6)


def test_every_pixel_depends_on_a_3x3_window():
    for size in SIZES:
        for low_axis, kept, full in zip((256, 256), _input_size(size), size):
            axis = axis_map(low_axis, 1024, kept, full)
            assert axis.first.min() >= 0 and axis.first.max() <= 253
            assert np.allclose(axis.weights.sum(1), 1.0) and (axis.weights >= 0).all()
            assert axis.starts[0] == 0 and axis.starts[-1] == full


# (low-res side, padded input side): SAM's and TinySAM's, and the demo's 128-pixel models.
MODELS = [(256, 1024)] * len(SIZES) + [(32, 128)] * 3
CASES = list(zip(SIZES + [(96, 128), (100, 37), (300, 200)], MODELS))


@pytest.mark.parametrize("size, model", CASES)
def test_counts_boxes_and_runs_match_the_upscaled_reference(size, model):
    low, padded = model
    low_res = _logits(sum(size), low)
    input_size = _input_size(size, padded)
    full = upscale_logits(low_res[:, None], input_size, size, padded)[:, 0]
    # Only pixels whose reference logit is this close to a threshold may come out otherwise
    # (float rounding: the weights are composed here; the reference rounds after each resize).
    near = 1e-4
    geometry = UpscaledMasks(input_size, size, low, padded)
    thresholds = [1.0, -1.0, 0.0]
    counts = geometry.counts(low_res, thresholds)
    for n, t in enumerate(thresholds):
        exact = (full > t).sum((1, 2))
        unsure = ((full - t).abs() < near).sum((1, 2))
        assert ((counts[:, n] - exact).abs() <= unsure).all(), (size, t)

    segments = geometry.segments(low_res, 0.0)
    rles = segments.rles(np.arange(len(low_res)), (0, 0), size)
    reference_rles = mask_to_rle(full > 0)
    masks = full > 0
    for k, (rle, reference) in enumerate(zip(rles, reference_rles)):
        decoded = torch.from_numpy(rle_to_mask(rle))
        differ = decoded != masks[k]
        assert not (differ & ((full[k]).abs() >= near)).any(), (size, k)
        if not differ.any():
            assert rle["counts"] == reference["counts"]
        assert rle["size"] == list(size)
        assert sum(rle["counts"]) == size[0] * size[1]
    boxes = segments.boxes(len(low_res))
    decoded = torch.stack([torch.from_numpy(rle_to_mask(r)) for r in rles])
    assert torch.equal(boxes, batched_mask_to_box(decoded))
    assert np.array_equal(segments.areas(len(low_res)), decoded.sum((1, 2)).numpy())


def test_runs_placed_inside_a_larger_image():
    """A crop's masks, placed at the crop's offset: the same pixels, padded with background."""
    low_res = _logits(3)[:4]
    crop = (300, 200)
    geometry = UpscaledMasks(_input_size(crop), crop)
    segments = geometry.segments(low_res, 0.0)
    placed = segments.rles(np.arange(4), (40, 25), (360, 400))
    alone = segments.rles(np.arange(4), (0, 0), crop)
    for big, small in zip(placed, alone):
        expected = np.zeros((360, 400), dtype=bool)
        expected[25 : 25 + 300, 40 : 40 + 200] = rle_to_mask(small)
        assert np.array_equal(rle_to_mask(big), expected)


def test_only_the_kept_masks_are_encoded():
    low_res = _logits(5)
    geometry = UpscaledMasks((683, 1024), (1200, 1800))
    segments = geometry.segments(low_res, 0.0)
    everything = segments.rles(np.arange(len(low_res)), (0, 0), (1200, 1800))
    some = segments.rles(np.array([1, 4, 6]), (0, 0), (1200, 1800))
    assert [r["counts"] for r in some] == [everything[i]["counts"] for i in (1, 4, 6)]
    assert segments.boxes(len(low_res))[5].tolist() == [0, 0, 0, 0]  # the empty mask
