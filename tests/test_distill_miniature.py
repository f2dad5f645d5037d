"""``tinysam distill miniature``: the verdicts its report gives (from numbers written by hand),
the predictor-level ground-truth IoU, and one tiny run of the whole harness (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinysam.distill.evaluate import ground_truth_iou
from tinysam.distill.synthetic import write_synthetic_sa1b
from tinysam.evaluation.hierarchical_vs_dense import ImageComparison, best_ious, modes_table
from tinysam.io import DONE, output_state
from tinysam.miniature import (
    everything_section,
    quantization_section,
    teacher_section,
)
from tinysam.transforms import ResizeLongestSide

from conftest import one_error_line, run_cli


def _rows(dense_found, hier_found, dense_iou, hier_iou, hier_prompts=128, objects=10):
    row = ImageComparison("a.jpg", 2.0, 1.0, 256, hier_prompts, 12, 11, 10)
    row.objects, row.dense_found, row.hierarchical_found = objects, dense_found, hier_found
    row.dense_best_iou, row.hierarchical_best_iou = dense_iou, hier_iou
    return {"rows": [vars(row)], "seconds": 3.0}


def test_the_hierarchical_saving_is_shown_only_with_the_masks_kept():
    kept = everything_section({"teacher": _rows(8, 8, 7.0, 6.9)})
    assert "50% fewer decoder prompts, 50% less time" in kept
    assert "recall@0.5 +0.000, mean best IoU -0.010" in kept and "**shown at" in kept
    lost = everything_section({"teacher": _rows(8, 6, 7.0, 6.0)})  # recall -0.2
    assert "recall@0.5 -0.200" in lost and "**not shown at" in lost
    nothing = everything_section({"teacher": _rows(0, 0, 0.0, 0.0)})  # finds nothing densely
    assert "**not shown at" in nothing
    small_saving = everything_section({"teacher": _rows(8, 8, 7.0, 7.0, hier_prompts=230)})
    assert "10% fewer" in small_saving and "**not shown at" in small_saving


def test_the_modes_table_gives_calls_beside_quality():
    rows = [ImageComparison(**_rows(8, 8, 7.0, 6.9)["rows"][0])] * 2
    table = modes_table({"student": rows})
    assert "| student | dense | 512 (100%) | 4.00 | 24 | 0.800 | 0.700 |" in table
    assert "| student | hierarchical | 256 (50%) | 2.00 | 22 | 0.800 | 0.690 |" in table


def test_quantization_is_shown_only_when_8_bit_keeps_a_real_iou():
    agreement = {
        "float": {"point": 1.0, "box": 1.0},
        "W8A8 simulated": {"point": 0.95, "box": 0.97},
    }
    close = {"float": {"point": 0.6, "box": 0.7}, "W8A8 simulated": {"point": 0.59, "box": 0.69}}
    text = quantization_section({"agreement_with_float": agreement, "gt_iou": close})
    assert "| W8A8 simulated | 0.950 / 0.970 | 0.590 / 0.690 |" in text
    assert "**shown at" in text
    far = {**close, "W8A8 simulated": {"point": 0.5, "box": 0.69}}
    section = quantization_section({"agreement_with_float": agreement, "gt_iou": far})
    assert "**not shown" in section
    zero = {"float": {"point": 0.0, "box": 0.0}, "W8A8 simulated": {"point": 0.0, "box": 0.0}}
    section = quantization_section({"agreement_with_float": agreement, "gt_iou": zero})
    assert "**not shown" in section


def test_the_teacher_target_is_named_met_or_not():
    assert "target met" in teacher_section({"point": 0.71, "box": 0.86})
    assert "**not** met" in teacher_section({"point": 0.71, "box": 0.84})


def test_best_ious_match_each_object_to_its_closest_mask():
    from pycocotools import mask as mask_utils

    def rle(x0, x1):
        m = np.zeros((8, 8), np.uint8, order="F")
        m[:, x0:x1] = 1
        return mask_utils.encode(m)

    objects = [rle(0, 4), rle(4, 8)]
    found = best_ious(objects, [rle(0, 4), rle(4, 6)])
    assert found.tolist() == [1.0, 0.5]
    assert best_ious(objects, []).tolist() == [0.0, 0.0]


class _BoxFiller:
    """A predictor answering every prompt with its box filled (points: everything), through
    the same resize transform as our predictors: ground-truth IoU of rectangles is 1."""

    def __init__(self, size=64):
        self.transform = ResizeLongestSide(size)

    def set_image(self, image):
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(*self.original_size, 64)

    def predict_torch(self, points, labels, boxes=None, multimask_output=True):
        h, w = self.original_size
        count = len(points if boxes is None else boxes)
        masks = torch.ones(count, 3 if multimask_output else 1, h, w, dtype=torch.bool)
        if boxes is not None:
            scale = max(h, w) / 64
            for i, (x0, y0, x1, y1) in enumerate((boxes * scale).round().int().tolist()):
                masks[i] = False
                masks[i, :, y0:y1, x0:x1] = True
        return masks, torch.ones(masks.shape[:2]), None


def test_ground_truth_iou_reads_prompts_in_each_images_frame(tmp_path):
    from pycocotools import mask as mask_utils

    write_synthetic_sa1b(tmp_path, 2, size=(48, 64), seed=3)
    result = ground_truth_iou({"filler": _BoxFiller()}, tmp_path)["filler"]
    expected_point, expected_box = [], []
    for path in sorted(tmp_path.glob("*.json")):
        for annotation in json.loads(path.read_text())["annotations"]:
            gt = mask_utils.decode(annotation["segmentation"]).astype(bool)
            x, y, w, h = annotation["bbox"]
            box = np.zeros_like(gt)
            box[round(y) : round(y + h), round(x) : round(x + w)] = True
            expected_point.append(gt.sum() / gt.size)  # the whole image
            expected_box.append((gt & box).sum() / (gt | box).sum())
    assert result["point"] == pytest.approx(np.mean(expected_point), abs=1e-6)
    assert result["box"] == pytest.approx(np.mean(expected_box), abs=1e-6)
    assert result["box"] > 0.5  # the boxes landed on their objects


def test_the_cli_defaults_are_the_demos():
    from tinysam.cli import build_parser
    from tinysam.distill.demo import DemoOptions

    args = build_parser().parse_args(["distill", "demo"])
    defaults = DemoOptions(out=args.out)
    for name in ("steps", "teacher_steps", "image_size", "train_images", "eval_images", "lr"):
        assert getattr(args, name) == getattr(defaults, name), name
    assert args.prompts == defaults.prompts_per_image and args.seed == defaults.seed
    args = build_parser().parse_args(["distill", "miniature"])
    assert args.seeds == 3 and args.data == "plain"
    assert args.teacher_steps == 2400 and args.train_images == 400


@pytest.mark.slow  # ~2 min: tiny models, the whole harness including the int8 ONNX export
def test_miniature_writes_every_claim_and_resumes(capsys, tmp_path):
    tiny = ["--image-size", 64, "--teacher-steps", 2, "--steps", 1, "--train-images", 3,
            "--eval-images", 2, "--seeds", 2, "--prompts", 2, "--points-per-side", 4,
            "--quant-candidates", 4, "--quant-rows", 16, "--calibration-images", 2,
            "--threads", 1]  # fmt: skip
    out = tmp_path / "mini"
    code, printed, err = run_cli(capsys, "distill", "miniature", "--out", out, *tiny)
    assert code == 0, err
    document = json.loads((out / "miniature.json").read_text())
    assert set(document["everything"]) == {"teacher", "TinySAM student"}
    assert len(document["everything"]["teacher"]["rows"]) == 2  # one per held-out image
    truth = document["quantization"]["gt_iou"]
    assert set(truth) == {"float", "W8A8 simulated", "int8 ONNX Runtime"}
    assert all(0 <= v <= 1 for kinds in truth.values() for v in kinds.values())
    assert len(document["ablation"]) == 4 and document["cpu"]
    markdown = (out / "miniature.md").read_text()
    assert markdown in printed
    for heading in ("## The teacher", "## Distillation", "## Hierarchical", "## Q-TinySAM"):
        assert heading in markdown
    assert markdown.count("at this scale**") >= 4  # a verdict per claim, and per model
    for name in ("miniature.json", "summary.json", "ablation.png"):
        assert output_state(out / name) == DONE, name
    assert not list(out.glob("**/last.pt"))  # finished stages keep their weights, not more

    code, _, err = run_cli(capsys, "distill", "miniature", "--out", out, *tiny)
    assert code == 0 and "everything mode: reusing" in err and "Q-TinySAM: reusing" in err
    assert "training the small teacher" not in err and "distilling" not in err
    again = json.loads((out / "miniature.json").read_text())
    assert again["quantization"] == document["quantization"]

    record = out / "everything" / "made_with.json"
    tampered = json.loads(record.read_text())
    tampered["models"]["teacher"]["rows"][0]["dense_prompts"] = None  # not a count
    record.write_text(json.dumps(tampered))
    code, _, err = run_cli(capsys, "distill", "miniature", "--out", out, *tiny)
    assert code == 0 and "everything mode: reusing" not in err, err  # made again, not trusted
    assert "Q-TinySAM: reusing" in err
    redone = json.loads((out / "miniature.json").read_text())["everything"]
    assert len(redone["teacher"]["rows"]) == 2 and redone["teacher"]["rows"][0]["dense_prompts"]

    (out / "miniature.md").write_text("their notes")  # not ours: refused before any work
    code, _, err = run_cli(capsys, "distill", "miniature", "--out", out, *tiny)
    assert code == 2 and "not written by tinysam" in one_error_line(err, "distill")
    assert (out / "miniature.md").read_text() == "their notes"


def test_everything_mode_runs_on_the_demos_small_models():
    """128-pixel models have 32-pixel low-res masks: the everything mode's mask geometry must
    follow the model, not SAM's 256/1024 (a size mismatch before)."""
    from tinysam.distill.models import small_student
    from tinysam.everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
    from tinysam.predictor import SamPredictor

    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    predictor = SamPredictor(small_student(128, seed=5).eval())
    keep_all = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    for generator in (SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator):
        records = generator(predictor, points_per_side=4, **keep_all).generate(image)
        assert records and all(r["segmentation"].shape == (96, 128) for r in records)


def test_the_hierarchical_first_round_sees_the_masks_the_predictor_gives():
    """Round 1's masks and covered area come from the model's own upscaling (128 pixels for
    the demo's models, not SAM's 1024): the masks of one prompt are the predictor's."""
    from tinysam.distill.models import small_student
    from tinysam.everything import SamHierarchicalMaskGenerator
    from tinysam.masks import rle_to_mask
    from tinysam.predictor import SamPredictor

    image = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    predictor = SamPredictor(small_student(128, seed=7).eval())
    generator = SamHierarchicalMaskGenerator(
        predictor, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        high_score_thresh=0.0,
    )  # fmt: skip
    generator.set_image(image)
    generator.set_point_grids([np.array([[0.5, 0.5]])])
    data, covered = generator.generate(image, need_high=True)
    expected, _, _ = predictor.predict(np.array([[64.0, 48.0]]), np.array([1]))
    found = [rle_to_mask(rle) for rle in data["rles"]]
    assert found and all(any(np.array_equal(m, e) for e in expected) for m in found)
    union = np.logical_or.reduce(found)
    assert np.array_equal(covered.T.numpy(), union)  # covered: logits above 0, kept masks


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calibration-images", 0], "--calibration-images must be at least 1"),
        (["--quant-rows", -1], "--quant-rows must be at least 1"),
        (["--points-per-side", 2], "points-per-side"),
        (["--image-size", 72], "--image-size must be a multiple of 16"),
        (["--train-images", 2, "--calibration-images", 3], "at most --train-images"),
        (["--seeds", 0], "--seeds must be at least 1"),
    ],
)
def test_miniature_usage_errors_exit_2_before_any_work(capsys, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "distill", "miniature", "--out", tmp_path / "m", *extra)
    assert code == 2 and message in one_error_line(err, "distill")
    assert not (tmp_path / "m").exists()
