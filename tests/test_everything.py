"""Everything mode on a scene of known objects (an oracle predictor), and output formats."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tinysam import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator

from oracle import OraclePredictor, paint_scene, rectangles

SHAPE = (512, 512)
# Boundaries at 16k + 8 keep the 16-pixel dense lattice clear of object edges.
OBJECTS = rectangles(
    SHAPE,
    [
        [(8, 8, 200, 136)],  # A
        [(232, 40, 504, 264)],  # B
        [(24, 200, 136, 488), (24, 376, 312, 488)],  # C, an L
        [(424, 424, 472, 472)],  # D: small, between the sparse grid's points
    ],
)
IMAGE = paint_scene(SHAPE, OBJECTS)


def _as_set(records) -> set[bytes]:
    return {np.packbits(r["segmentation"]).tobytes() for r in records}


def _truth(objects) -> set[bytes]:
    return {np.packbits(m).tobytes() for m in objects}


def test_dense_returns_exactly_the_objects():
    oracle = OraclePredictor()
    generator = SamAutomaticMaskGenerator(oracle, points_per_side=32)
    records = generator.generate(IMAGE)
    assert _as_set(records) == _truth(OBJECTS)
    assert oracle.prompts == 32 * 32 == generator.stats.prompts
    for r in records:
        mask = r["segmentation"]
        assert r["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert r["predicted_iou"] == pytest.approx(0.95)
        assert r["stability_score"] == 1.0
        x, y = r["point_coords"][0]
        assert mask[int(y), int(x)]
        assert r["crop_box"] == [0, 0, 512, 512]


def _expected_hierarchical_prompts(covered_objects) -> int:
    """Prompts the hierarchical mode should send, derived from the geometry alone.

    Sparse grid: 8x8 points at 32 + 64i. Dense lattice: multiples of 16 inside the image
    (16..496), minus the sparse points, minus lattice points inside the covered objects.
    """
    lattice = np.arange(16, 512, 16)
    sparse = set(32 + 64 * np.arange(8))
    covered = np.any(covered_objects, axis=0)
    dense = [
        (x, y)
        for y in lattice
        for x in lattice
        if not (x in sparse and y in sparse) and not covered[y, x]
    ]
    return 64 + len(dense)


def test_hierarchical_same_objects_fewer_prompts():
    oracle = OraclePredictor()
    generator = SamHierarchicalMaskGenerator(oracle, points_per_side=32)
    records = generator.hierarchical_generate(IMAGE)
    assert _as_set(records) == _truth(OBJECTS)  # D is found in the second round
    # A, B and C hold sparse points, so round 1 covers them; D does not.
    expected = _expected_hierarchical_prompts(OBJECTS[:3])
    assert oracle.prompts == generator.stats.prompts == expected
    assert generator.stats.rounds == [64, expected - 64]
    # Logits above 8.5 stop a little inside the objects' edges (bilinear upscaling).
    objects_area = np.any(OBJECTS[:3], axis=0).mean()
    assert 0.95 * objects_area < generator.stats.covered_fraction <= objects_area
    saved = 32 * 32 - expected
    assert saved > 0.3 * 1024  # the objects cover about 40% of the image


def test_hierarchical_on_empty_scene_prompts_everything():
    oracle = OraclePredictor()
    blank = np.zeros((512, 512, 3), dtype=np.uint8)
    records = SamHierarchicalMaskGenerator(oracle, points_per_side=32).generate(blank)
    assert records == []
    assert oracle.prompts == _expected_hierarchical_prompts(np.zeros((1, *SHAPE), dtype=bool))


def test_dense_points_stay_inside_small_images():
    """The authors' walk reads outside the covered-area map; ours skips such points."""
    covered = np.zeros((20, 30), dtype=bool)
    sparse = np.array([[1.0, 1.0], [29.0, 19.0]])
    points = SamHierarchicalMaskGenerator.dense_points(sparse, covered, points_per_side=8)
    assert len(points)
    assert (points[:, 0] >= 0).all() and (points[:, 0] < 30).all()
    assert (points[:, 1] >= 0).all() and (points[:, 1] < 20).all()
    # Image smaller than the grid: stride 0, no repeats of the sparse point itself.
    assert len(SamHierarchicalMaskGenerator.dense_points(sparse, covered, points_per_side=64)) == 0


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_rle_formats_round_trip_through_pycocotools(mode):
    records = SamAutomaticMaskGenerator(
        OraclePredictor(), points_per_side=16, output_mode=mode
    ).generate(IMAGE)
    binary = SamAutomaticMaskGenerator(OraclePredictor(), points_per_side=16).generate(IMAGE)
    assert len(records) == len(binary) > 0
    for rec, ref in zip(records, binary):
        rle = rec["segmentation"]
        if mode == "uncompressed_rle":
            assert isinstance(rle["counts"], list)
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        else:
            assert isinstance(rle["counts"], str)
            rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        decoded = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(decoded, ref["segmentation"])
        assert mask_utils.area(rle) == rec["area"]
        assert mask_utils.toBbox(rle).tolist() == [
            rec["bbox"][0],
            rec["bbox"][1],
            rec["bbox"][2] + 1,
            rec["bbox"][3] + 1,
        ]


def test_crops_find_every_object():
    records = SamAutomaticMaskGenerator(
        OraclePredictor(), points_per_side=16, crop_n_layers=1
    ).generate(IMAGE)
    assert len(records) == len(OBJECTS)
    for obj in OBJECTS:
        best = max(
            (
                np.logical_and(r["segmentation"], obj).sum()
                / np.logical_or(r["segmentation"], obj).sum()
            )
            for r in records
        )
        assert best > 0.95
    crop_sizes = {tuple(r["crop_box"]) for r in records}
    assert all(len(c) == 4 for c in crop_sizes)


def test_parameter_errors():
    oracle = OraclePredictor()
    with pytest.raises(ValueError, match="exactly one of points_per_side or point_grids"):
        SamAutomaticMaskGenerator(oracle, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode must be one of"):
        SamAutomaticMaskGenerator(oracle, output_mode="polygons")
    with pytest.raises(ValueError, match="crop_n_layers=0"):
        SamHierarchicalMaskGenerator(oracle, crop_n_layers=1)
    with pytest.raises(ValueError, match="points_per_side >= 4"):
        SamHierarchicalMaskGenerator(oracle, points_per_side=2)
    with pytest.raises(ValueError, match="crop_n_layers must be >= 0"):
        SamAutomaticMaskGenerator(oracle, crop_n_layers=-1)
    with pytest.raises(ValueError, match="crop_overlap_ratio"):
        SamAutomaticMaskGenerator(oracle, crop_n_layers=1, crop_overlap_ratio=1.5)
    assert oracle.prompts == 0  # refused before any work


def test_generate_takes_what_set_image_takes():
    """A PIL image or a gray HxW array: the same masks as the RGB array."""
    from PIL import Image

    # Called as segment-anything calls a predictor (full-size masks for every prompt).
    expected = _as_set(
        SamAutomaticMaskGenerator(OraclePredictor(plain=True), points_per_side=8).generate(IMAGE)
    )
    pil = Image.fromarray(IMAGE)
    for generator_class in (SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator):
        generator = generator_class(OraclePredictor(), points_per_side=8)
        assert len(generator.generate(pil)) > 0
    generator = SamAutomaticMaskGenerator(OraclePredictor(), points_per_side=8)
    assert _as_set(generator.generate(pil)) == expected
    gray = IMAGE[:, :, 0]
    assert len(SamAutomaticMaskGenerator(OraclePredictor(), points_per_side=8).generate(gray)) > 0


def test_small_region_removal():
    scene = [OBJECTS[0].copy()]
    scene[0][60:62, 60:62] = False  # a 4-pixel hole
    records = SamAutomaticMaskGenerator(
        OraclePredictor(), points_per_side=16, min_mask_region_area=10
    ).generate(paint_scene(SHAPE, scene))
    assert len(records) == 1
    assert np.array_equal(records[0]["segmentation"], OBJECTS[0])  # the hole is filled
