"""Bad input to SamPredictor fails at the boundary with a ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tinysam import SamPredictor
from tinysam.checks import as_rgb_uint8

POINT = np.array([[365.0, 225.0]])
LABEL = np.array([1])


# ------------------------------------------------------------------ image conversion


def test_rgb_passes_through():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(as_rgb_uint8(image), image)


def test_bgr_is_flipped():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(as_rgb_uint8(image, "BGR"), image[:, :, ::-1])


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    rgb = as_rgb_uint8(gray)
    assert rgb.shape == (5, 7, 3)
    assert all(np.array_equal(rgb[:, :, c], gray) for c in range(3))
    assert np.array_equal(as_rgb_uint8(gray[:, :, None]), rgb)


def test_alpha_is_dropped():
    rgba = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    assert np.array_equal(as_rgb_uint8(rgba), rgba[:, :, :3])
    assert np.array_equal(as_rgb_uint8(rgba, "BGR"), rgba[:, :, 2::-1])


def test_pil_images_of_any_mode():
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(as_rgb_uint8(Image.fromarray(rgb)), rgb)
    gray = Image.fromarray(rgb[:, :, 0])
    assert as_rgb_uint8(gray).shape == (5, 7, 3)
    assert np.array_equal(as_rgb_uint8(Image.fromarray(rgb).convert("RGBA")), rgb)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((5, 7, 3), dtype=np.float32), "image must have dtype uint8"),
        (np.zeros((5, 7, 3), dtype=np.uint16), "image must have dtype uint8"),
        (np.zeros((5, 7, 2), dtype=np.uint8), r"HxWx3 .* got shape \(5, 7, 2\)"),
        (np.zeros((2, 5, 7, 3), dtype=np.uint8), "got shape"),
        (np.zeros(7, dtype=np.uint8), "got shape"),
        (np.zeros((0, 7, 3), dtype=np.uint8), "image is empty"),
        (torch.zeros(1, 3, 8, 8), "set_torch_image"),
        ([[1, 2], [3, 4]], "numpy array or PIL image"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        as_rgb_uint8(image)


def test_bad_image_format():
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        as_rgb_uint8(np.zeros((4, 4, 3), np.uint8), "RGBA")


def test_bgr_end_to_end(vit_t_model, golden_image, predictor):
    p = SamPredictor(vit_t_model)
    p.set_image(np.ascontiguousarray(golden_image[:, :, ::-1]), image_format="BGR")
    assert torch.equal(p.features, predictor.features)
    assert p.original_size == predictor.original_size == golden_image.shape[:2]


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(point_coords=np.array([365.0, 225.0]), point_labels=LABEL),
            "point_coords must have shape Nx2",
        ),
        (
            dict(point_coords=np.zeros((1, 3)), point_labels=LABEL),
            "point_coords must have shape Nx2",
        ),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "N >= 1"),
        (
            dict(point_coords=np.array([[np.nan, 1.0]]), point_labels=LABEL),
            "point_coords contains NaN",
        ),
        (
            dict(point_coords=np.array([[np.inf, 1.0]]), point_labels=LABEL),
            "point_coords contains NaN or infinite",
        ),
        (
            dict(point_coords=POINT, point_labels=np.array([1, 0])),
            r"point_labels must have shape \(1,\)",
        ),
        (
            dict(point_coords=POINT, point_labels=np.array([5])),
            r"point_labels must be in \{-1, 0, 1, 2, 3\}",
        ),
        (dict(point_coords=POINT, point_labels=np.array([0.5])), "point_labels must be in"),
        (dict(point_coords=POINT, point_labels=np.array([np.nan])), "point_labels contains NaN"),
        (dict(point_coords=POINT), "point_labels must be given with point_coords"),
        (dict(point_labels=LABEL), "point_coords must be given with point_labels"),
        (dict(point_coords=[["a", "b"]], point_labels=LABEL), "point_coords must be numeric"),
        (dict(box=np.array([[1.0, 2.0], [3.0, 4.0]])), r"box must have shape \(4,\)"),
        (dict(box=np.array([1.0, 2.0, 3.0])), r"box must have shape \(4,\)"),
        (dict(box=np.array([300.0, 100.0, 200.0, 400.0])), "x0 <= x1 and y0 <= y1"),
        (dict(box=np.array([100.0, 300.0, 200.0, 200.0])), "x0 <= x1 and y0 <= y1"),
        (dict(box=np.array([100.0, np.nan, 200.0, 200.0])), "box contains NaN"),
        (
            dict(point_coords=POINT, point_labels=LABEL, mask_input=np.zeros((1, 64, 64))),
            "mask_input must have shape 1x256x256",
        ),
        (
            dict(point_coords=POINT, point_labels=LABEL, mask_input=np.full((1, 256, 256), np.nan)),
            "mask_input contains NaN",
        ),
    ],
)
def test_bad_prompts(any_predictor, kwargs, message):
    """The same one-line errors from the torch and the ONNX predictor."""
    with pytest.raises(ValueError, match=message):
        any_predictor.predict(**kwargs)


def test_accepted_prompt_forms(predictor):
    """Lists, a 1x4 box, 2-D mask input and integer-valued float labels are all fine."""
    masks, scores, low_res = predictor.predict([[365, 225]], [1.0], box=[[150, 100, 600, 650]])
    assert masks.shape == (3, 770, 769) and scores.shape == (3,)
    again, _, _ = predictor.predict(
        POINT, LABEL, box=np.array([150, 100, 600, 650]), mask_input=low_res[0]
    )
    assert again.shape == (3, 770, 769)


def test_return_logits(predictor):
    logits, _, _ = predictor.predict(POINT, LABEL, return_logits=True)
    masks, _, _ = predictor.predict(POINT, LABEL)
    assert logits.dtype == np.float32
    assert np.array_equal(logits > 0, masks)


def test_box_corner_labels_embed_as_a_box(vit_t_model):
    """Labels 2 and 3 are the box's corners, as in segment-anything's ONNX convention."""
    encoder = vit_t_model.prompt_encoder
    box = torch.tensor([[100.0, 150.0, 600.0, 700.0]])
    with torch.no_grad():
        as_box = encoder._embed_boxes(box)
        as_points = encoder._embed_points(box.view(1, 2, 2), torch.tensor([[2, 3]]), pad=False)
    assert torch.allclose(as_box, as_points, atol=1e-6)


def test_predict_before_set_image(vit_t_model):
    p = SamPredictor(vit_t_model)
    with pytest.raises(RuntimeError, match=r"call set_image\(image\) before predicting"):
        p.predict(POINT, LABEL)
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


def test_reset_image(vit_t_model, predictor):
    p = SamPredictor(vit_t_model)
    p.set_torch_image(torch.zeros(1, 3, 1024, 512, dtype=torch.uint8), (2048, 1024))
    assert p.is_image_set and p.input_size == (1024, 512) and p.original_size == (2048, 1024)
    p.reset_image()
    assert not p.is_image_set and p.features is None


@pytest.mark.parametrize(
    "shape", [(3, 1024, 1024), (1, 1, 1024, 1024), (1, 3, 512, 512), (2, 3, 1024, 1024)]
)
def test_set_torch_image_shape(vit_t_model, shape):
    with pytest.raises(
        ValueError, match="transformed_image must be 1x3xHxW with longest side 1024"
    ):
        SamPredictor(vit_t_model).set_torch_image(torch.zeros(shape), (10, 10))


def test_predict_torch_checks(any_predictor):
    predictor = any_predictor
    coords = torch.zeros(2, 1, 2)
    with pytest.raises(ValueError, match="point_labels must be BxN"):
        predictor.predict_torch(coords, torch.ones(2, 2))
    with pytest.raises(ValueError, match="prompt batch sizes disagree"):
        predictor.predict_torch(coords, torch.ones(2, 1), boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="point_coords contains NaN"):
        predictor.predict_torch(torch.full((1, 1, 2), float("nan")), torch.ones(1, 1))
    with pytest.raises(ValueError, match="boxes contains NaN"):
        predictor.predict_torch(None, None, boxes=torch.full((1, 4), float("inf")))
    with pytest.raises(ValueError, match="mask_input must be Bx1x256x256"):
        predictor.predict_torch(None, None, mask_input=torch.zeros(1, 256, 256))
    with pytest.raises(ValueError, match="mask_input contains NaN"):
        predictor.predict_torch(
            coords[:1], torch.ones(1, 1), mask_input=torch.full((1, 1, 256, 256), float("nan"))
        )


def test_predict_torch_refuses_what_predict_refuses(any_predictor):
    predictor = any_predictor
    point = torch.full((1, 1, 2), 10.0)
    for label in (7.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="point_labels must be in"):
            predictor.predict_torch(point, torch.full((1, 1), label))
    with pytest.raises(ValueError, match="x0 <= x1"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[50.0, 10.0, 20.0, 40.0]]))
    with pytest.raises(ValueError, match="batch is empty"):
        predictor.predict_torch(torch.zeros(0, 1, 2), torch.zeros(0, 1))
    with pytest.raises(ValueError, match="batch is empty"):
        predictor.predict_torch(None, None, boxes=torch.zeros(0, 4))


def test_pil_images_are_converted_like_files():
    sixteen = Image.fromarray(np.full((3, 4), 65535, np.uint16))
    assert sixteen.mode == "I;16" and as_rgb_uint8(sixteen).min() == 255  # scaled, not clipped
    with pytest.raises(ValueError, match="image is empty"):
        as_rgb_uint8(Image.new("RGB", (0, 0)))
    rgb = np.zeros((3, 4, 3), np.uint8)
    assert as_rgb_uint8(rgb) is rgb  # no copy: SharedEmbedding recognises its image


def test_set_image_of_nothing(vit_t_model):
    predictor = SamPredictor(vit_t_model)
    for image in (Image.new("RGB", (0, 0)), np.zeros((0, 0), np.uint8)):
        with pytest.raises(ValueError, match="image is empty"):
            predictor.set_image(image)


def test_non_finite_outputs_are_an_error_not_a_nan_json(vit_t_checkpoint, golden_image):
    from tinysam import build_sam_vit_t
    from tinysam.cli.common import UsageError, strict_json
    from tinysam.predictor_base import ModelOutputError

    model = build_sam_vit_t(vit_t_checkpoint).eval()
    with torch.no_grad():  # weights damaged in memory, after the load-time check
        model.mask_decoder.iou_prediction_head.layers[0].weight.fill_(float("nan"))
    predictor = SamPredictor(model)
    predictor.set_image(golden_image)
    with pytest.raises(ModelOutputError, match="NaN or infinite scores"):
        predictor.predict(np.array([[100.0, 100.0]]), np.array([1]))
    with pytest.raises(UsageError, match="NaN or infinite numbers"):
        strict_json({"scores": [float("nan")]})
    assert strict_json({"scores": [0.5]}) == '{"scores": [0.5]}'
