"""Code written for segment-anything and for the authors' tinysam imports modules by path and
calls methods that only their APIs have; those paths and methods exist here (thin aliases)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from test_onnx_contract import _segment_anything_onnx_model

from conftest import mask_iou


def test_module_paths_resolve_to_the_real_homes():
    import tinysam
    from tinysam.everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from tinysam.everything import mask_ops as everything_masks
    from tinysam.transforms import ResizeLongestSide

    assert importlib.import_module("tinysam.build_sam").sam_model_registry is (
        tinysam.sam_model_registry
    )
    hierarchical = importlib.import_module("tinysam.hierarchical_mask_generator")
    assert hierarchical.SamHierarchicalMaskGenerator is SamHierarchicalMaskGenerator
    automatic = importlib.import_module("tinysam.automatic_mask_generator")
    assert automatic.SamAutomaticMaskGenerator is SamAutomaticMaskGenerator
    assert importlib.import_module("tinysam.utils.transforms").ResizeLongestSide is (
        ResizeLongestSide
    )
    amg = importlib.import_module("tinysam.utils.amg")
    assert amg.MaskData is everything_masks.MaskData
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    rles = amg.mask_to_rle_pytorch(masks)
    assert np.array_equal(amg.rle_to_mask(rles[0]), masks[0].numpy())
    assert amg.area_from_rle(rles[0]) == 6
    assert importlib.import_module("tinysam.utils.onnx").SamOnnxModel is not None


def test_segment_anything_client_through_a_one_line_alias(
    monkeypatch, vit_t_checkpoint, golden_image
):
    """segment-anything's README flow, with `segment_anything` pointing at tinysam."""
    import tinysam

    for name in list(sys.modules):
        if name == "segment_anything" or name.startswith("segment_anything."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "segment_anything", tinysam)
    from segment_anything import SamPredictor, sam_model_registry

    monkeypatch.setitem(
        sys.modules, "segment_anything.utils", importlib.import_module("tinysam.utils")
    )
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = sam_model_registry["vit_t"](checkpoint=str(vit_t_checkpoint))
    predictor = SamPredictor(sam)
    predictor.set_image(golden_image)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    coords = transform.apply_coords(np.array([[365.0, 225.0]]), golden_image.shape[:2])
    masks, scores, _ = predictor.predict_torch(
        torch.as_tensor(coords, dtype=torch.float)[None], torch.ones(1, 1, dtype=torch.int)
    )
    reference, reference_scores, _ = predictor.predict(np.array([[365, 225]]), np.array([1]))
    assert torch.allclose(scores[0], torch.as_tensor(reference_scores), atol=1e-5)
    assert mask_iou(masks[0, 0].numpy(), reference[0]) == 1.0


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("extra", [False, True])
def test_sam_onnx_model_matches_segment_anythings(vit_t_model, predictor, single, extra):
    from tinysam.utils.onnx import SamOnnxModel

    theirs = _segment_anything_onnx_model()
    options = {"return_single_mask": single, "return_extra_metrics": extra}
    ours = SamOnnxModel(vit_t_model, **options).eval()
    reference = theirs(vit_t_model, **options).eval()
    coords = predictor.transform.apply_coords(
        np.array([[365.0, 225.0], [0.0, 0.0]]), predictor.original_size
    )
    inputs = (
        predictor.get_image_embedding(),
        torch.as_tensor(coords[None], dtype=torch.float),
        torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 1, 256, 256),
        torch.zeros(1),
        torch.tensor(predictor.original_size, dtype=torch.float),
    )
    with torch.no_grad():
        got, want = ours(*inputs), reference(*inputs)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=1e-2)


def test_authors_step_by_step_hierarchical_api_gives_the_same_masks(vit_t_model, golden_image):
    """The authors' hierarchical_generate, written with their public steps, matches ours."""
    from tinysam.hierarchical_mask_generator import SamHierarchicalMaskGenerator

    # Thresholds low enough that random golden weights keep masks and cover some area.
    options = {"pred_iou_thresh": 0.0, "high_score_thresh": 0.0, "stability_score_thresh": 0.0}
    generator = SamHierarchicalMaskGenerator(vit_t_model, points_per_side=8, **options)
    expected = generator.generate(golden_image)
    covered_fraction = generator.stats.covered_fraction
    assert expected and 0.0 < covered_fraction < 1.0

    h, w = golden_image.shape[:2]
    generator.set_image(golden_image)
    generator.set_points_per_side(generator.points_per_side // 4)
    first, covered = generator.generate(golden_image, True)
    assert covered.shape == (w, h)  # indexed [x, y], as the authors' map
    assert abs(float(covered.float().mean()) - covered_fraction) < 1e-9
    sparse = generator.point_grids[0] * np.array([w, h])
    dense = generator.dense_points(sparse, covered.T.numpy(), generator.points_per_side)
    generator.set_point_grids([dense / np.array([w, h])])
    second = generator.generate(golden_image, False)
    second.cat(first)
    records = generator.post_process(golden_image, second)
    generator.reset_image()
    assert len(records) == len(expected)
    for ours, theirs in zip(records, expected):
        assert ours["bbox"] == theirs["bbox"]
        assert ours["predicted_iou"] == pytest.approx(theirs["predicted_iou"], abs=1e-6)
        assert mask_iou(ours["segmentation"], theirs["segmentation"]) == 1.0
    with pytest.raises(RuntimeError, match="set_image"):
        generator.generate(golden_image, False)
