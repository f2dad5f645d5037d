"""With the golden checkpoint: the many-prompt path gives the per-prompt decoder's results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinysam import SamAutomaticMaskGenerator, SamPredictor
from tinysam.everything.mask_ops import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
    nms,
)
from tinysam.io import load_image
from tinysam.transforms import upscale_logits

from conftest import mask_iou


@pytest.fixture(scope="module")
def picture2(golden):
    return load_image(golden / "images" / "picture2.jpg")


@pytest.fixture
def picture2_predictor(vit_t_model, picture2):
    predictor = SamPredictor(vit_t_model)
    predictor.set_image(picture2)
    return predictor


def _grid_prompts(predictor, per_side: int):
    """An n x n grid of single foreground points: pixels, and the 1024-frame batch."""
    h, w = predictor.original_size
    points = build_point_grid(per_side) * np.array([w, h])
    coords = predictor.transform.apply_coords(points, predictor.original_size)
    coords = torch.as_tensor(coords).float()[:, None]
    return points, coords, torch.ones(len(points), 1, dtype=torch.int)


@pytest.mark.slow  # ~25 s: every grid prompt decoded twice; CI's slow phase
def test_batched_prompts_match_one_at_a_time(picture2_predictor):
    p = picture2_predictor
    points, coords, labels = _grid_prompts(p, 8)
    none, batch_iou, batch_low_res = p.predict_torch(
        coords, labels, return_logits=True, upscale=False
    )
    assert none is None
    batch_masks = upscale_logits(batch_low_res, p.input_size, p.original_size) > 0
    for i, point in enumerate(points):
        masks, scores, low_res = p.predict(point[None], np.array([1]))
        assert np.abs(scores - batch_iou[i].numpy()).max() < 1e-4
        assert np.abs(low_res - batch_low_res[i].numpy()).max() < 1e-2
        for k in range(3):
            assert mask_iou(masks[k], batch_masks[i, k].numpy()) >= 0.999


def _plain_everything(predictor, points, iou_thresh, stability_thresh, nms_thresh):
    """segment-anything's order of work: full-size logits for every mask, then the filters."""
    rows = []
    for x, y in points:
        logits, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]), return_logits=True)
        for k in range(3):
            if scores[k] <= iou_thresh:
                continue
            stability = calculate_stability_score(torch.as_tensor(logits[k]), 0.0, 1.0).item()
            if stability < stability_thresh:
                continue
            rows.append((logits[k] > 0, float(scores[k]), stability))
    masks = torch.as_tensor(np.stack([r[0] for r in rows]))
    keep = nms(batched_mask_to_box(masks), torch.tensor([r[1] for r in rows]), nms_thresh)
    return [rows[i] for i in keep.tolist()]


def test_generator_matches_plain_pipeline(picture2_predictor, picture2):
    """Filtering by IoU before upscaling keeps exactly the masks the plain order keeps."""
    p = picture2_predictor
    h, w = p.original_size
    plain = _plain_everything(p, build_point_grid(6) * np.array([w, h]), 0.5, 0.3, 1.0)
    settings = dict(pred_iou_thresh=0.5, stability_score_thresh=0.3, box_nms_thresh=1.0)
    records = SamAutomaticMaskGenerator(p, points_per_side=6, **settings).generate(picture2)
    assert len(records) == len(plain) >= 20  # NMS off: every mask that passes the filters
    for record, (mask, score, stability) in zip(records, plain):
        assert abs(record["predicted_iou"] - score) < 1e-4
        assert abs(record["stability_score"] - stability) < 1e-3
        assert mask_iou(record["segmentation"], mask) >= 0.999


def test_min_iou_skips_only_the_masks_that_fail(picture2_predictor):
    p = picture2_predictor
    points, coords, labels = _grid_prompts(p, 4)
    _, iou, full = p.predict_torch(coords, labels, upscale=False)
    threshold = float(iou.max(dim=1).values.median())
    _, iou2, partial = p.predict_torch(coords, labels, upscale=False, min_iou=threshold)
    assert torch.equal(iou, iou2)
    wanted = (iou > threshold).any(dim=1)
    assert 0 < wanted.sum() < len(points)
    assert torch.isnan(partial[~wanted]).all()
    assert torch.allclose(partial[wanted], full[wanted], atol=1e-4)


def test_a_big_batch_is_decoded_in_chunks_with_the_whole_batchs_results(picture2_predictor):
    """36 prompts go through the many-prompt decoder 16 at a time (a bounded peak memory):
    the scores, the masks made and the NaN rows are those of one pass over all 36."""
    from tinysam.modeling.many_prompts import ManyPromptDecoder
    from tinysam.predictor_base import MANY_PROMPT_CHUNK

    p = picture2_predictor
    points, coords, labels = _grid_prompts(p, 6)
    assert 2 * MANY_PROMPT_CHUNK < len(points) < 3 * MANY_PROMPT_CHUNK  # the last chunk short
    with torch.no_grad():
        sparse, dense = p.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    whole = ManyPromptDecoder(
        p.model.mask_decoder, p.features, p.model.prompt_encoder.get_dense_pe(), dense[:1]
    )
    iou = whole.decode(sparse)[0][:, 1:]
    logits = whole.masks()[:, 1:]
    threshold = float(iou.max(dim=1).values.median())
    _, chunked_iou, chunked = p.predict_torch(coords, labels, upscale=False, min_iou=threshold)
    assert torch.allclose(chunked_iou, iou, atol=1e-5)
    wanted = (iou > threshold).any(dim=1)
    assert wanted[:MANY_PROMPT_CHUNK].any() and wanted[2 * MANY_PROMPT_CHUNK :].any()
    assert torch.isnan(chunked[~wanted]).all()
    assert torch.allclose(chunked[wanted], logits[wanted], atol=1e-4)
