"""Our model reproduces the reference implementation's outputs (golden/README.md tolerances)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import torch

from tinysam.modeling import ImageEncoderViT
from tinysam.transforms import ResizeLongestSide

from conftest import mask_iou, unpack_masks

EMBED_TOL = 1e-3
LOGIT_TOL = 1e-2
SCORE_TOL = 1e-4
MIN_MASK_IOU = 0.999


def _prompt_kwargs(prompt: dict, low_res_by_prompt: dict) -> dict:
    kwargs = {}
    if "points" in prompt:
        kwargs["point_coords"] = np.array(prompt["points"], dtype=float)
        kwargs["point_labels"] = np.array(prompt["labels"])
    if "box" in prompt:
        kwargs["box"] = np.array(prompt["box"], dtype=float)
    if "mask_from" in prompt:
        kwargs["mask_input"] = low_res_by_prompt[prompt["mask_from"]]
    return kwargs


def test_resized_image_matches_exactly(golden_image, vit_t_outputs):
    resized = ResizeLongestSide(1024).apply_image(golden_image)
    expected = vit_t_outputs["resized_image"]
    assert resized.shape == expected.shape
    assert np.array_equal(resized, expected)


def test_image_embedding(predictor, vit_t_outputs):
    embedding = predictor.get_image_embedding().numpy()
    assert embedding.shape == (1, 256, 64, 64)
    assert np.abs(embedding - vit_t_outputs["image_embedding"]).max() < EMBED_TOL


def test_every_golden_prompt(predictor, vit_t_meta, vit_t_outputs):
    height, width = vit_t_meta["orig_hw"]
    best_low_res = {}
    for i, prompt in enumerate(vit_t_meta["prompts"]):
        masks, scores, low_res = predictor.predict(**_prompt_kwargs(prompt, best_low_res))
        best_low_res[i] = low_res[np.argmax(scores)][None]

        assert masks.shape == (3, height, width) and masks.dtype == bool
        assert np.abs(scores - vit_t_outputs[f"p{i}_scores"]).max() < SCORE_TOL, f"prompt {i}"
        logit_err = np.abs(low_res - vit_t_outputs[f"p{i}_low_res_logits"]).max()
        assert logit_err < LOGIT_TOL, f"prompt {i}: low-res logits off by {logit_err}"
        expected = unpack_masks(vit_t_outputs[f"p{i}_masks"], width)
        for k in range(3):
            assert mask_iou(masks[k], expected[k]) >= MIN_MASK_IOU, f"prompt {i} mask {k}"


def test_batched_boxes_through_predict_torch(predictor, vit_t_meta, vit_t_outputs):
    height, width = vit_t_meta["orig_hw"]
    boxes = torch.as_tensor(vit_t_outputs["batch_boxes"])
    boxes = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
    logits, iou, low_res = predictor.predict_torch(None, None, boxes=boxes, return_logits=True)

    assert logits.shape == (4, 3, height, width)
    assert np.abs(iou.numpy() - vit_t_outputs["batch_iou_predictions"]).max() < SCORE_TOL
    assert np.abs(low_res.numpy() - vit_t_outputs["batch_low_res_logits"]).max() < LOGIT_TOL
    mean_std = np.stack([logits.mean(dim=(-2, -1)).numpy(), logits.std(dim=(-2, -1)).numpy()])
    assert np.allclose(mean_std, vit_t_outputs["batch_mask_logits_stats"], atol=1e-3, rtol=1e-4)
    expected = unpack_masks(vit_t_outputs["batch_masks"], width)
    binary = (logits > 0).numpy()
    for b in range(4):
        for k in range(3):
            assert mask_iou(binary[b, k], expected[b, k]) >= MIN_MASK_IOU, f"box {b} mask {k}"


def test_sam_forward_matches_predictor(vit_t_model, predictor, golden_image, vit_t_outputs):
    """Sam.forward on a batched input gives the same masks as the predictor path."""
    image = ResizeLongestSide(1024).apply_image(golden_image)
    boxes = predictor.transform.apply_boxes_torch(
        torch.as_tensor(vit_t_outputs["batch_boxes"]), predictor.original_size
    )
    record = {
        "image": torch.as_tensor(image).permute(2, 0, 1).float(),
        "original_size": predictor.original_size,
        "boxes": boxes,
    }
    (out,) = vit_t_model([record], multimask_output=True)
    assert out["masks"].dtype == torch.bool
    assert (
        np.abs(out["iou_predictions"].numpy() - vit_t_outputs["batch_iou_predictions"]).max()
        < SCORE_TOL
    )
    assert (
        np.abs(out["low_res_logits"].numpy() - vit_t_outputs["batch_low_res_logits"]).max()
        < LOGIT_TOL
    )


def test_single_mask_output_is_the_first_token(predictor):
    """multimask_output=False returns mask token 0, which the 3-mask mode skips."""
    point = dict(point_coords=np.array([[365.0, 225.0]]), point_labels=np.array([1]))
    masks, scores, low_res = predictor.predict(**point, multimask_output=False)
    assert masks.shape[0] == 1 and scores.shape == (1,) and low_res.shape == (1, 256, 256)

    model = predictor.model
    coords = torch.as_tensor(
        predictor.transform.apply_coords(point["point_coords"], predictor.original_size)
    )
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(
            (coords[None].float(), torch.tensor([[1]])), None, None
        )
        all_masks, all_iou = model.mask_decoder.predict_masks(
            predictor.features, model.prompt_encoder.get_dense_pe(), sparse, dense
        )
    assert all_masks.shape[1] == 4
    assert np.allclose(low_res[0], all_masks[0, 0].numpy(), atol=1e-4)
    assert np.isclose(scores[0], all_iou[0, 0].item(), atol=1e-6)
    _, multi_scores, _ = predictor.predict(**point)
    assert np.allclose(multi_scores, all_iou[0, 1:].numpy(), atol=1e-6)


def test_vit_small_encoder(golden):
    meta = json.loads((golden / "vit_small_seed3_meta.json").read_text())
    assert meta["norm_layer"] == "LayerNorm(eps=1e-6)"
    encoder = ImageEncoderViT(
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **meta["config"]
    ).eval()
    state = torch.load(golden / "vit_small_seed3_encoder.pth", weights_only=True)
    encoder.load_state_dict(state, strict=True)

    from tinysam.io import load_image
    from tinysam.modeling.sam import PIXEL_MEAN, PIXEL_STD

    image = ResizeLongestSide(1024).apply_image(load_image(golden / "images" / meta["image"]))
    x = torch.as_tensor(image).permute(2, 0, 1).float()
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    x = torch.nn.functional.pad(x, (0, 1024 - x.shape[2], 0, 1024 - x.shape[1]))[None]
    with torch.no_grad():
        out = encoder(x).numpy()
    expected = np.load(golden / "vit_small_seed3_outputs.npz")["image_embedding"]
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() < EMBED_TOL


def test_embedding_with_one_thread(vit_t_model, golden_image, vit_t_outputs):
    """The parity does not depend on the 2-thread setting the suite uses."""
    from tinysam import SamPredictor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = SamPredictor(vit_t_model)
        p.set_image(golden_image)
    finally:
        torch.set_num_threads(before)
    assert np.abs(p.features.numpy() - vit_t_outputs["image_embedding"]).max() < EMBED_TOL
