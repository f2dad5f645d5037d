"""decoder.onnx and decoder_single.onnx against segment-anything's ONNX contract.

The graphs are driven as segment-anything's ``notebooks/onnx_model_example.ipynb`` drives its
export (a click plus the padding point, a second click fed the first answer's low-res logits,
a box with a point, a box alone), and compared with segment-anything's own ``SamOnnxModel``
(the module its export script traces, from the ``segment-anything`` package) run in torch on
the same weights: the oracle is their code, not ours.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import mask_iou

LOGIT_TOL = 1e-2  # the golden tolerance for low-res logits (scaled by 30)
SCORE_TOL = 1e-4


def _segment_anything_onnx_model():
    """segment-anything's ``SamOnnxModel`` class. Its package imports torchvision at the top
    (for the automatic generator and the image resize, which this module does not use), and
    torchvision cannot be installed here: stand-ins for those two names let it import."""
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        for name in (
            "torchvision",
            "torchvision.ops",
            "torchvision.ops.boxes",
            "torchvision.transforms",
            "torchvision.transforms.functional",
        ):
            stubs[name] = types.ModuleType(name)
        stubs["torchvision.ops.boxes"].batched_nms = stubs["torchvision.ops.boxes"].box_area = None
        stubs["torchvision.transforms.functional"].resize = None
        stubs["torchvision.transforms.functional"].to_pil_image = None
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("segment_anything.utils.onnx").SamOnnxModel
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def sessions(onnx_dir):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return {
        name: ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), options)
        for name in ("decoder", "decoder_single")
    }


@pytest.fixture(scope="module")
def oracles(vit_t_model):
    SamOnnxModel = _segment_anything_onnx_model()
    return {
        "decoder": SamOnnxModel(vit_t_model, return_single_mask=False).eval(),
        "decoder_single": SamOnnxModel(vit_t_model, return_single_mask=True).eval(),
    }


def _notebook_inputs(predictor, points, labels, box=None, mask_input=None):
    """The ONNX inputs as segment-anything's notebook builds them."""
    coords, tags = np.asarray(points, float).reshape(-1, 2), np.asarray(labels, float)
    if box is not None:
        coords = np.concatenate([coords, np.asarray(box, float).reshape(2, 2)])
        tags = np.concatenate([tags, [2, 3]])
    else:
        coords = np.concatenate([coords, [[0.0, 0.0]]])
        tags = np.concatenate([tags, [-1]])
    onnx_coord = predictor.transform.apply_coords(coords[None], predictor.original_size)
    has_mask = mask_input is not None
    return {
        "image_embeddings": predictor.get_image_embedding().numpy(),
        "point_coords": onnx_coord.astype(np.float32),
        "point_labels": tags[None].astype(np.float32),
        "mask_input": (mask_input if has_mask else np.zeros((1, 1, 256, 256))).astype(np.float32),
        "has_mask_input": np.array([float(has_mask)], np.float32),
        "orig_im_size": np.array(predictor.original_size, np.float32),
    }


def _run_both(sessions, oracles, name, inputs):
    masks, scores, low_res = sessions[name].run(None, inputs)
    with torch.no_grad():
        expected = oracles[name](**{k: torch.from_numpy(v) for k, v in inputs.items()})
    expected = [t.numpy() for t in expected]
    assert masks.shape == expected[0].shape and scores.shape == expected[1].shape
    assert low_res.shape == expected[2].shape
    assert np.abs(scores - expected[1]).max() < SCORE_TOL
    assert np.abs(low_res - expected[2]).max() < LOGIT_TOL
    for got, want in zip(masks[0], expected[0][0]):
        assert mask_iou(got > 0, want > 0) >= 0.999
    return masks, scores, low_res


def test_one_click_then_a_second_with_the_first_answer(predictor, sessions, oracles):
    """The notebook's flow: one click (best of masks 1-3 in the single-mask graph), then two
    clicks with the first answer's logits as mask input (mask token 0)."""
    first = _notebook_inputs(predictor, [[365, 225]], [1])
    masks, scores, low_res = _run_both(sessions, oracles, "decoder_single", first)
    assert masks.shape[:2] == (1, 1)
    # The same answer SamPredictor gives: the best of its three candidates.
    candidates, candidate_scores, _ = predictor.predict(np.array([[365, 225]]), np.array([1]))
    best = int(np.argmax(candidate_scores))
    assert abs(float(scores[0, 0]) - float(candidate_scores[best])) < SCORE_TOL
    assert mask_iou(masks[0, 0] > 0, candidates[best]) >= 0.999

    second = _notebook_inputs(predictor, [[365, 225], [500, 400]], [1, 1], mask_input=low_res)
    masks2, _, _ = _run_both(sessions, oracles, "decoder_single", second)
    single, _, _ = predictor.predict(
        np.array([[365, 225], [500, 400]]),
        np.array([1, 1]),
        mask_input=low_res[0],
        multimask_output=False,
    )
    assert mask_iou(masks2[0, 0] > 0, single[0]) >= 0.999


def test_boxes(predictor, sessions, oracles):
    box = [150, 100, 600, 650]
    # A box and a background point: three points, so mask token 0.
    inputs = _notebook_inputs(predictor, [[365, 225]], [0], box=box)
    masks, _, _ = _run_both(sessions, oracles, "decoder_single", inputs)
    single, _, _ = predictor.predict(
        np.array([[365, 225]]), np.array([0]), np.array(box), multimask_output=False
    )
    assert mask_iou(masks[0, 0] > 0, single[0]) >= 0.999
    # A box alone: two points (its corners), so the best of masks 1-3, as segment-anything.
    inputs = _notebook_inputs(predictor, np.zeros((0, 2)), [], box=box)
    _run_both(sessions, oracles, "decoder_single", inputs)


def test_multimask_graph_returns_all_four_tokens(predictor, sessions, oracles):
    inputs = _notebook_inputs(predictor, [[365, 225]], [1])
    masks, scores, _ = _run_both(sessions, oracles, "decoder", inputs)
    assert masks.shape[:2] == scores.shape == (1, 4)
    three, three_scores, _ = predictor.predict(np.array([[365, 225]]), np.array([1]))
    one, _, _ = predictor.predict(np.array([[365, 225]]), np.array([1]), multimask_output=False)
    assert np.abs(scores[0, 1:] - three_scores).max() < SCORE_TOL
    for k in range(3):
        assert mask_iou(masks[0, k + 1] > 0, three[k]) >= 0.999
    assert mask_iou(masks[0, 0] > 0, one[0]) >= 0.999
    inputs = _notebook_inputs(predictor, [[365, 225], [500, 400]], [1, 0], box=None)
    _run_both(sessions, oracles, "decoder", inputs)
