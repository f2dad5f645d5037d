"""Evaluation protocols on a synthetic COCO-format dataset the tests write themselves.

``BoxFillPredictor`` stands in for a model whose box prompts are perfect on rectangles: its best
mask fills the box, so detections equal to the ground-truth boxes give AP 1.0 exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinysam.cli import main
from tinysam.evaluation import clicks as clicks_mod
from tinysam.evaluation.instances import (
    DatasetError,
    coco_mask_ap,
    encode_masks,
    load_detections,
    lvis_mask_ap,
    segment_detections,
)
from tinysam.transforms import ResizeLongestSide

# image id -> (height, width, rectangles [x0, y0, x1, y1) with their category)
SCENES = {
    1: (60, 80, [((5, 5, 30, 25), 1), ((40, 10, 75, 50), 2)]),
    2: (50, 70, [((10, 20, 40, 45), 1)]),
    3: (64, 64, [((2, 2, 20, 20), 2), ((30, 30, 60, 62), 1), ((25, 3, 60, 20), 1)]),
}


def write_dataset(root: Path) -> tuple[Path, Path]:
    """Images, COCO ground truth (RLE masks) and a folder; returns (annotations, images)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, (h, w, rects) in SCENES.items():
        pixels = np.zeros((h, w, 3), np.uint8)
        for k, ((x0, y0, x1, y1), cat) in enumerate(rects, start=1):
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = True
            pixels[mask] = (60 * k, 200 - 40 * k, 50 * cat)
            (rle,) = encode_masks(mask[None])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
        name = f"scene{image_id}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "slab"}],
    }
    path = root / "gt.json"
    path.write_text(json.dumps(gt))
    return path, images_dir


def write_detections(root: Path, shift: float = 0.0, name: str = "dets.json") -> Path:
    gt = json.loads((root / "gt.json").read_text())
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]],
            "score": 0.9 - 0.01 * a["id"],
        }
        for a in gt["annotations"]
    ]
    path = root / name
    path.write_text(json.dumps(dets))
    return path


class BoxFillPredictor:
    """Three masks per box: an empty one, the filled box (best score), a one-pixel-grown box."""

    def __init__(self) -> None:
        self.transform = ResizeLongestSide(1024)
        self.batches: list[int] = []

    def set_image(self, image: np.ndarray) -> None:
        self.size = image.shape[:2]

    def predict_torch(self, point_coords, point_labels, boxes=None, multimask_output=True):
        h, w = self.size
        scale = 1024 / max(h, w)
        self.batches.append(len(boxes))
        masks = torch.zeros(len(boxes), 3, h, w, dtype=torch.bool)
        for i, box in enumerate(boxes.numpy() / scale):
            x0, y0, x1, y1 = np.round(box).astype(int)
            masks[i, 1, y0:y1, x0:x1] = True
            masks[i, 2, max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        scores = torch.tensor([[0.1, 0.9, 0.5]]).repeat(len(boxes), 1)
        if not multimask_output:  # the single-mask output: here the grown box
            return masks[:, 2:], scores[:, 2:], None
        return masks, scores, None


@pytest.fixture()
def dataset(tmp_path):
    annotations, images = write_dataset(tmp_path)
    return tmp_path, annotations, images


def test_ground_truth_boxes_score_ap_one_and_shifted_boxes_lower(dataset):
    root, annotations, images = dataset
    predictor = BoxFillPredictor()
    exact = segment_detections(
        predictor, annotations, write_detections(root), images, root / "exact", progress=False
    )
    assert predictor.batches == [2, 1, 3]  # every box of an image in one decoder batch
    metrics = coco_mask_ap(annotations, exact)
    assert metrics["AP"] == pytest.approx(1.0)
    shifted = segment_detections(
        BoxFillPredictor(),
        annotations,
        write_detections(root, shift=6, name="shifted.json"),
        images,
        root / "shifted",
        progress=False,
    )
    assert coco_mask_ap(annotations, shifted)["AP"] < 0.9


def test_single_mask_flag_uses_the_single_output(dataset):
    root, annotations, images = dataset
    results = segment_detections(
        BoxFillPredictor(),
        annotations,
        write_detections(root),
        images,
        root / "single",
        single_mask=True,
        progress=False,
    )
    assert coco_mask_ap(annotations, results)["AP"] < 1.0  # grown boxes miss IoU 0.95


def test_metrics_equal_pycocotools_called_directly(dataset):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root, annotations, images = dataset
    results = segment_detections(
        BoxFillPredictor(),
        annotations,
        write_detections(root, shift=3),
        images,
        root / "out",
        progress=False,
    )
    ours = coco_mask_ap(annotations, results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(str(results)), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert list(ours.values()) == [float(v) for v in evaluator.stats[:6]]
    assert 0.0 < ours["AP"] < 1.0


def test_resume_after_interruption_gives_identical_results(dataset):
    root, annotations, images = dataset
    dets = write_detections(root, shift=2)
    whole = segment_detections(BoxFillPredictor(), annotations, dets, images, root / "whole")

    def crash_after_first(image_id: int) -> None:
        if image_id == 1:
            raise KeyboardInterrupt

    out = root / "resumed"
    with pytest.raises(KeyboardInterrupt):
        segment_detections(
            BoxFillPredictor(), annotations, dets, images, out, after_image=crash_after_first
        )
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["1.json"]
    assert not (out / "results.json").exists()
    second = BoxFillPredictor()
    resumed = segment_detections(second, annotations, dets, images, out)
    assert second.batches == [1, 3]  # image 1 was not redone
    assert resumed.read_bytes() == whole.read_bytes()
    with pytest.raises(DatasetError, match="holds a run with other settings"):
        segment_detections(BoxFillPredictor(), annotations, dets, images, out, single_mask=True)


def test_bad_detection_files_get_one_line_errors(tmp_path, dataset):
    root, annotations, images = dataset
    (tmp_path / "bad.json").write_text('[{"image_id": 1, "bbox": [1, 2]}]')
    with pytest.raises(DatasetError, match="needs an integer image_id and category_id"):
        load_detections(tmp_path / "bad.json")
    (tmp_path / "float_id.json").write_text(
        '[{"image_id": 1.7, "category_id": 1, "score": 1, "bbox": [1, 2, 3, 3]}]'
    )
    with pytest.raises(DatasetError, match="detection 0 needs an integer image_id"):
        load_detections(tmp_path / "float_id.json")  # not truncated to image 1
    (tmp_path / "nan.json").write_text(
        '[{"image_id": 1, "category_id": 1, "score": 1, "bbox": [1, 2, NaN, 3]}]'
    )
    with pytest.raises(DatasetError, match="non-finite"):
        load_detections(tmp_path / "nan.json")
    (tmp_path / "other.json").write_text(
        '[{"image_id": 99, "category_id": 1, "score": 1, "bbox": [1, 2, 3, 3]}]'
    )
    with pytest.raises(DatasetError, match="not in the annotations file"):
        segment_detections(
            BoxFillPredictor(), annotations, tmp_path / "other.json", images, tmp_path / "o"
        )


def test_lvis_scoring_calls_the_lvis_api(dataset, monkeypatch):
    """The LVIS API cannot be installed here (it needs opencv and breaks on numpy 2): a stand-in
    module records that ground truth, results and the segm IoU type reach it."""
    import sys
    import types

    calls = {}

    class LVIS:
        def __init__(self, path):
            calls["gt"] = path

    class LVISResults:
        def __init__(self, gt, path):
            calls["results"] = path

    class LVISEval:
        def __init__(self, gt, dt, iou_type):
            calls["iou_type"] = iou_type
            self.params = types.SimpleNamespace(img_ids=[1, 2, 3])

        def run(self):
            calls["ran"] = self.params.img_ids

        def get_results(self):
            return {"AP": 0.5, "APr": 0.25, "APc": 0.5, "APf": 0.75, "AP50": 0.6}

    stand_in = types.SimpleNamespace(LVIS=LVIS, LVISResults=LVISResults, LVISEval=LVISEval)
    monkeypatch.setitem(sys.modules, "lvis", stand_in)
    metrics = lvis_mask_ap("gt.json", "results.json", image_ids=[2, 1])
    assert calls == {"gt": "gt.json", "results": "results.json", "iou_type": "segm", "ran": [1, 2]}
    assert metrics == {"AP": 0.5, "AP50": 0.6, "APr": 0.25, "APc": 0.5, "APf": 0.75}


def test_lvis_ground_truth_is_recognised(dataset, tmp_path):
    from tinysam.evaluation.instances import image_files, is_lvis

    root, annotations, _ = dataset
    assert not is_lvis(annotations)
    gt = json.loads(annotations.read_text())
    for category in gt["categories"]:
        category["frequency"] = "f"
    for image in gt["images"]:  # LVIS names images by their COCO URL
        image["coco_url"] = f"http://images.cocodataset.org/val2017/{image.pop('file_name')}"
    lvis_gt = tmp_path / "lvis.json"
    lvis_gt.write_text(json.dumps(gt))
    assert is_lvis(lvis_gt)
    assert image_files(lvis_gt)[2] == "scene2.png"


def test_eval_instances_cli_with_the_golden_model(dataset, vit_t_checkpoint):
    root, annotations, images = dataset
    dets = write_detections(root)
    out = root / "cli"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["eval", "instances", "--annotations", str(annotations), "--detections", str(dets)]
            + ["--images", str(images), "--out", str(out), "--limit", "2"]
            + ["--checkpoint", str(vit_t_checkpoint)]
        )
    assert code == 0
    summary = json.loads(stdout.getvalue().splitlines()[-1])
    assert summary["dataset"] == "coco" and 0.0 <= summary["AP"] <= 1.0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 3 and {r["image_id"] for r in results} == {1, 2}
    assert json.loads((out / "metrics.json").read_text())["AP"] == summary["AP"]


def test_eval_cli_rejects_bad_input(dataset, capsys):
    root, annotations, images = dataset
    (root / "broken.json").write_text("{not json")
    code = main(
        ["eval", "instances", "--annotations", str(root / "broken.json")]
        + ["--detections", str(write_detections(root)), "--images", str(images)]
        + ["--out", str(root / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is not valid JSON" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda gt: gt["images"].__setitem__(0, "scene1.png"), "images[0] must be an object"),
        (lambda gt: gt["images"][0].__setitem__("id", None), "images[0].id must be an integer"),
        (lambda gt: gt["images"][0].__setitem__("id", 1.7), "images[0].id must be an integer"),
        (lambda gt: gt["images"][0].pop("file_name"), "neither file_name nor coco_url"),
        (
            lambda gt: gt["images"][0].__setitem__("file_name", "../../etc/passwd"),
            "file_name must be relative",
        ),
        (lambda gt: gt.__setitem__("categories", {"1": "box"}), "categories must be a list"),
        (lambda gt: gt.__setitem__("categories", [1, 2]), "categories[0] must be an object"),
        (
            lambda gt: gt["annotations"][0].__setitem__("segmentation", "rle"),
            "annotations[0].segmentation must be a COCO RLE",
        ),
        (
            lambda gt: gt["annotations"][1].__setitem__("image_id", 1.7),
            "annotations[1].image_id must be an integer",
        ),
        (
            lambda gt: gt["annotations"][0].__setitem__("bbox", [0, 0, "w", 1]),
            "annotations[0].bbox must be a list of 4 finite numbers",
        ),
        (
            lambda gt: gt["annotations"][0].__setitem__("iscrowd", 2),
            "iscrowd must be 0 or 1",
        ),
    ],
)
def test_malformed_ground_truth_fails_at_load_naming_the_field(dataset, capsys, change, message):
    """Checked before any model is loaded (the checkpoint named here does not exist)."""
    root, annotations, images = dataset
    gt = json.loads(annotations.read_text())
    change(gt)
    annotations.write_text(json.dumps(gt))
    code = main(
        ["eval", "instances", "--annotations", str(annotations), "--checkpoint", "missing.pth"]
        + ["--detections", str(write_detections(root)), "--images", str(images)]
        + ["--out", str(root / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(annotations) in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_detections_fail_before_the_model_is_loaded(dataset, capsys):
    root, annotations, images = dataset
    (root / "dets.json").write_text('{"not": "a list"}')
    code = main(
        ["eval", "instances", "--annotations", str(annotations), "--checkpoint", "missing.pth"]
        + ["--detections", str(root / "dets.json"), "--images", str(images)]
        + ["--out", str(root / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is not a COCO results list" in err, err


# --------------------------------------------------------------------------- clicks


def test_farthest_point_of_known_shapes():
    square = np.zeros((21, 31), bool)
    square[5:16, 10:21] = True  # 11x11, centre (15, 10)
    assert clicks_mod.farthest_point(square)[:2] == (15, 10)
    yy, xx = np.mgrid[:40, :50]
    disk = (xx - 30) ** 2 + (yy - 18) ** 2 <= 9**2
    x, y, d = clicks_mod.farthest_point(disk)
    assert (x, y) == (30, 18) and d == pytest.approx(82**0.5)  # nearest outside: (39, 19)
    # An L: the thick arm's middle is farther from the boundary than the thin arm's.
    shape = np.zeros((40, 40), bool)
    shape[0:40, 0:6] = True  # thin arm, touching the image border
    shape[25:40, 0:40] = True  # thick arm along the bottom
    x, y, _ = clicks_mod.farthest_point(shape)
    assert 25 <= y < 40 and y == 32  # middle of the 15-row arm; the image edge is boundary


def test_next_click_goes_to_the_largest_error_with_its_label():
    gt = np.zeros((30, 30), bool)
    gt[5:25, 5:25] = True
    assert clicks_mod.next_click(gt, None) == (14, 14, clicks_mod.POSITIVE)
    missing_right = gt.copy()
    missing_right[:, 15:] = False  # the right half is missed: click into it, positive
    x, y, label = clicks_mod.next_click(gt, missing_right)
    assert label == clicks_mod.POSITIVE and 15 <= x < 25 and gt[y, x]
    extra = gt.copy()
    extra[0:30, 25:30] = True  # a false-positive slab of width 5 (wider than any miss)
    x, y, label = clicks_mod.next_click(gt, extra)
    assert label == clicks_mod.NEGATIVE and x == 27
    assert clicks_mod.next_click(gt, gt) is None


class OracleClickPredictor:
    """Returns the ground truth once it has two clicks; one click gives the left half."""

    def __init__(self, gt: np.ndarray) -> None:
        self.gt = gt

    def set_image(self, image):
        pass

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        half = self.gt.copy()
        half[:, half.shape[1] // 2 :] = False
        mask = half if len(point_coords) == 1 else self.gt
        count = 3 if multimask_output else 1
        logits = np.zeros((count, 8, 8), np.float32)
        return np.stack([mask] * count), np.linspace(1, 0.5, count), logits


def test_click_curve_counts_and_stops_improving_when_exact():
    gt = np.zeros((20, 20), bool)
    gt[2:18, 2:18] = True
    ious = clicks_mod.click_ious(OracleClickPredictor(gt), gt, clicks=4)
    assert ious == [pytest.approx(0.5), 1.0, 1.0, 1.0]


@pytest.mark.slow  # ~15 s: two evaluation commands end to end; CI's slow phase
def test_eval_clicks_and_everything_cli(dataset, vit_t_checkpoint, golden, tmp_path):
    root, annotations, images = dataset
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["eval", "clicks", "--annotations", str(annotations), "--images", str(images)]
            + ["--out", str(root / "clicks"), "--clicks", "3", "--max-masks", "2"]
            + ["--checkpoint", str(vit_t_checkpoint)]
        )
    assert code == 0
    summary = json.loads(stdout.getvalue().splitlines()[-1])
    assert summary["masks"] == 2 and len(summary["miou"]) == 3
    png = Image.open(root / "clicks" / "clicks.png")
    assert png.size[0] > 100 and "| 3 |" in (root / "clicks" / "clicks.md").read_text()

    folder = tmp_path / "pictures"
    folder.mkdir()
    shutil.copy(golden / "images" / "picture3.jpg", folder)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(
            ["eval", "everything", str(folder), "--out", str(tmp_path / "every")]
            + ["--points-per-side", "8", "--checkpoint", str(vit_t_checkpoint)]
        )
    assert code == 0, out.getvalue()
    (row,) = json.loads((tmp_path / "every" / "everything.json").read_text())
    assert row["dense_prompts"] == 64 and 0 < row["hierarchical_prompts"] <= 64
    assert 0 <= row["recovered"] <= row["dense_masks"]


def test_recovered_masks_matches_at_the_threshold():
    from tinysam.evaluation.hierarchical_vs_dense import recovered_masks

    a = np.zeros((1, 20, 20), bool)
    a[0, 0:10, 0:10] = True
    b = np.zeros((1, 20, 20), bool)
    b[0, 0:10, 0:9] = True  # IoU 0.9 with a
    c = np.zeros((1, 20, 20), bool)
    c[0, 10:20, 10:20] = True
    record = lambda m: {"segmentation": encode_masks(m)[0]}  # noqa: E731
    assert recovered_masks([record(a), record(c)], [record(b)], 0.9) == 1
    assert recovered_masks([record(a), record(c)], [record(b)], 0.91) == 0
    assert recovered_masks([record(a)], [], 0.9) == 0


# --------------------------------------------------------------------------- bench


@pytest.mark.slow  # ~15 s: times every backend; CI's slow phase
def test_bench_counts_flops_and_times_backends(vit_t_checkpoint, capsys):
    from tinysam import build_sam_vit_t
    from tinysam.evaluation.bench import count_costs

    cost = count_costs(build_sam_vit_t(vit_t_checkpoint).eval())
    # TinySAM's encoder is ~42 G MACs at 1024x1024 (the paper); a decode ~2 G.
    assert 35e9 < cost.encoder_flops / 2 < 50e9
    assert 0 < cost.decoder_flops < cost.encoder_flops / 10
    assert 5e6 < cost.encoder_parameters < 7e6  # TinyViT-5M and the neck
    code = main(["bench", "--checkpoint", str(vit_t_checkpoint), "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "| torch |" in out and "G MACs" in out


def test_machine_limits_are_measured_and_rows_rated_against_them(capsys):
    import math

    from tinysam.evaluation.bench import Latency, ModelCost, bench_table
    from tinysam.evaluation.limits import limits_table, measure_limits

    limits = measure_limits(threads=1, n=128, repeats=1, copy_mb=8)
    rates = [limits.fp32_gflops_torch, limits.fp32_gflops_onnxruntime,
             limits.int8_gops_onnxruntime, limits.memory_gb_per_s]  # fmt: skip
    assert all(math.isfinite(r) and r > 0 for r in rates), rates
    assert limits.best_fp32() == max(rates[:2])
    u8u8 = limits.int8_u8u8_gops_onnxruntime
    assert math.isfinite(u8u8) and u8u8 > 0
    assert math.isfinite(limits.bf16_gflops_torch) and limits.bf16_gflops_torch > 0
    # The int8 ceiling is the kernel our graphs run here: u8 x u8 only where u8 x s8 saturates.
    used = u8u8 if limits.int8_products_saturate else limits.int8_gops_onnxruntime
    assert limits.int8_ceiling() == pytest.approx(used / limits.best_fp32())
    assert limits.ceiling("int8") == used and limits.ceiling("bf16") == limits.bf16_gflops_torch
    table = limits_table(limits)
    assert "int8 GEMM" in table and "bf16 GEMM" in table and "memory copy" in table
    assert limits.cpu in table and "(our int8 graphs here)" in table
    kernel = limits.int8_kernel()
    assert f"| int8 ceiling: {kernel} GEMM / best fp32 GEMM | {limits.int8_ceiling():.2f}x" in table
    for saturate, kernel in ((True, "u8 x u8"), (False, "u8 x s8")):
        other = replace(limits, int8_products_saturate=saturate)
        assert other.int8_kernel() == kernel
        line = next(x for x in limits_table(other).splitlines() if "our int8 graphs" in x)
        assert kernel in line
    # 2 GFLOP at 100 GFLOP/s is 20 ms ideal: 40 ms measured is 50% of the limit.
    cost = ModelCost(5_000_000, 4_000_000, 6_000, 2_000_000_000, 1_000_000)
    rated = bench_table(cost, [Latency("onnxruntime", 40.0, 3.0)], fp32_limit=100.0)
    assert "| onnxruntime | 40.0 | 50% | 3.0 |" in rated and "20.0 ms" in rated
    # Each row against its own precision's rate: 2 GFLOP at 400 GFLOP/s bf16 is 5 ms ideal.
    rows = [Latency("torch", 40.0, 3.0), Latency("torch bf16", 10.0, 3.0, "bf16")]
    rated = bench_table(cost, rows, 100.0, ceilings={"fp32": 100.0, "bf16": 400.0, "int8": None})
    assert "| torch | fp32 | 40.0 | 50% | 3.0 |" in rated
    assert "| torch bf16 | bf16 | 10.0 | 50% | 3.0 |" in rated
    code = main(["bench", "--limits-only", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "fp32 GEMM, torch" in out and '"limits"' in out
