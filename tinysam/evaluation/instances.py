"""Zero-shot instance segmentation: detector boxes as prompts, scored as COCO or LVIS masks.

The paper's protocol (``docs/method.md`` §4): every box of a detector's results file (ViTDet-H's
``coco_instances_results_vitdet.json``) prompts the model; of the three masks of the multi-output
mode the one with the highest predicted IoU is kept (``single_mask`` takes the single-mask output
instead); the mask inherits the detection's category and score.

Each image's results are written atomically to ``parts/<image_id>.json`` as soon as they exist,
so a killed run resumes where it stopped and its final results equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import FormatError, field, is_int, is_number, numbers, require
from ..io import (
    ImageError,
    atomic_write,
    load_image,
    pending_outputs,
    remove_stale_parts,
    write_json_output,
)
from ..masks import encode_masks

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
PARTS = "parts"
RESULTS = "results.json"
RUN = "run.json"


class DatasetError(ValueError):
    """A ground-truth or detections file that cannot be used (one line saying why)."""


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise DatasetError(f"{what} not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{what} {path} is not valid JSON ({err})") from err


def ground_truth(annotations: str | os.PathLike | dict) -> dict:
    """The parsed annotations (read once: LVIS's file is ~1 GB of JSON), every field the
    evaluations use checked: a bad file fails here, before any model runs, naming the field."""
    data = (
        annotations
        if isinstance(annotations, dict)
        else _read_json(Path(annotations), "annotations file")
    )
    where = _name(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{where} has no 'images' list: not a COCO/LVIS annotations file")
    try:
        _check_ground_truth(data, where)
    except FormatError as err:
        raise DatasetError(str(err)) from None
    return data


def _check_ground_truth(data: dict, where: str) -> None:
    for i, image in enumerate(data["images"]):
        require(image, "an object", where, f"images[{i}]")
        field(image, "id", "an integer", where, f"images[{i}].")
        name = field(image, "file_name", "a string", where, f"images[{i}].", default="")
        url = field(image, "coco_url", "a string", where, f"images[{i}].", default="")
        if not (name or url):
            raise FormatError(f"{where}: images[{i}] has neither file_name nor coco_url")
        if name.startswith("/") or ".." in Path(name).parts:
            raise FormatError(f"{where}: images[{i}].file_name must be relative, got {name!r}")
    for i, category in enumerate(field(data, "categories", "a list", where, default=[])):
        require(category, "an object", where, f"categories[{i}]")
        field(category, "id", "an integer", where, f"categories[{i}].")
    for i, ann in enumerate(field(data, "annotations", "a list", where, default=[])):
        prefix = f"annotations[{i}]."
        require(ann, "an object", where, f"annotations[{i}]")
        field(ann, "image_id", "an integer", where, prefix)
        field(ann, "category_id", "an integer", where, prefix, default=0)
        if "bbox" in ann:
            numbers(ann["bbox"], 4, where, prefix + "bbox")
        field(ann, "area", "a finite number", where, prefix, default=0)
        if field(ann, "iscrowd", "an integer", where, prefix, default=0) not in (0, 1):
            raise FormatError(f"{where}: {prefix}iscrowd must be 0 or 1")
        if "segmentation" in ann:
            _check_segmentation(ann["segmentation"], where, prefix + "segmentation")


def _check_segmentation(value: Any, where: str, name: str) -> None:
    """A COCO RLE ``{size: [h, w], counts}`` or polygons (lists of x, y numbers)."""
    if isinstance(value, dict):
        size = value.get("size")
        if (
            isinstance(size, list)
            and len(size) == 2
            and all(is_int(v) and v >= 0 for v in size)
            and isinstance(value.get("counts"), (str, list))
        ):
            return
    elif isinstance(value, list) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(is_number, p))
        for p in value
    ):
        return
    raise FormatError(
        f"{where}: {name} must be a COCO RLE {{size: [h, w], counts}} or a list of polygons "
        "[x0, y0, x1, y1, ...]"
    )


def _name(annotations) -> str:
    return "the annotations" if isinstance(annotations, dict) else str(annotations)


def _checked(annotations: str | os.PathLike | dict) -> dict:
    """A ``ground_truth()`` result as it is, or a file read and checked."""
    return annotations if isinstance(annotations, dict) else ground_truth(annotations)


def image_files(annotations: str | os.PathLike | dict) -> dict[int, str]:
    """``{image_id: file name}`` of COCO or LVIS ground truth (LVIS names its images by
    ``coco_url``; the file is the URL's last part). Give a file, or ``ground_truth()``'s dict."""
    files = {}
    for image in _checked(annotations)["images"]:
        name = image.get("file_name") or str(image.get("coco_url", "")).rsplit("/", 1)[-1]
        files[int(image["id"])] = name
    return files


def is_lvis(annotations: str | os.PathLike | dict) -> bool:
    """LVIS ground truth marks its categories with a frequency (rare/common/frequent)."""
    categories = _checked(annotations).get("categories") or [{}]
    return "frequency" in categories[0]


@dataclass
class Detection:
    category_id: int
    score: float
    box_xyxy: tuple[float, float, float, float]


def load_detections(path: str | os.PathLike, min_score: float = 0.0) -> dict[int, list[Detection]]:
    """Detections grouped by image, each image's in file order."""
    data = _read_json(Path(path), "detections file")
    if not isinstance(data, list):
        raise DatasetError(f"{path} is not a COCO results list (a JSON array of detections)")
    grouped: dict[int, list[Detection]] = defaultdict(list)
    for i, det in enumerate(data):
        try:
            x, y, w, h = (float(v) for v in det["bbox"])
            det_ = Detection(int(det["category_id"]), float(det["score"]), (x, y, x + w, y + h))
            image_id = int(det["image_id"])
            if not is_int(det["image_id"]) or not is_int(det["category_id"]):
                raise ValueError("ids must be integers")
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{path}: detection {i} needs an integer image_id and category_id, a score and "
                "bbox [x, y, w, h]"
            ) from err
        if not np.all(np.isfinite([*det_.box_xyxy, det_.score])) or w < 0 or h < 0:
            raise DatasetError(f"{path}: detection {i} has a non-finite or negative box")
        if det_.score >= min_score:
            grouped[image_id].append(det_)
    return dict(grouped)


def check_detection_images(by_image: dict, files: dict, what: str) -> None:
    """Every image id of the detections (``what``, a file name) must be one of the annotations
    file's images (``files``): else the two are from different datasets."""
    unknown = set(by_image) - set(files)
    if unknown:
        raise DatasetError(
            f"{len(unknown)} image id(s) of {what} are not in the annotations file "
            f"(e.g. {min(unknown)}): detections and annotations are from different datasets"
        )


def detections_from_annotations(gt: dict) -> dict[int, list[Detection]]:
    """A (checked) annotations file's boxes as detections of score 1: the masks step of
    auto-annotation when the boxes come from people or another tool."""
    grouped: dict[int, list[Detection]] = defaultdict(list)
    for ann in gt.get("annotations", []):
        if "bbox" not in ann:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        grouped[int(ann["image_id"])].append(
            Detection(int(ann.get("category_id", 0)), 1.0, (x, y, x + w, y + h))
        )
    return dict(grouped)


def segment_boxes(
    predictor, image: np.ndarray, boxes_xyxy: np.ndarray, single_mask: bool = False
) -> np.ndarray:
    """One mask per box (NxHxW bool): the best candidate of each box by predicted IoU. Our
    backends decode low-res logits only and make just the chosen masks at full size (N bytes a
    pixel, not the 3N floats of every candidate); another predictor-like object gets
    segment-anything's call."""
    import torch

    predictor.set_image(image)
    if len(boxes_xyxy) == 0:
        return np.zeros((0, *image.shape[:2]), dtype=bool)
    boxes = predictor.transform.apply_boxes(np.asarray(boxes_xyxy, np.float32), image.shape[:2])
    boxes = torch.as_tensor(boxes)
    if not getattr(predictor, "filters_while_decoding", False):
        masks, scores, _ = predictor.predict_torch(
            None, None, boxes=boxes, multimask_output=not single_mask
        )
        masks, scores = torch.as_tensor(masks), torch.as_tensor(scores)
        best = scores.argmax(dim=1)
        return masks[torch.arange(len(best)), best].cpu().numpy().astype(bool)
    _, scores, low_res = predictor.predict_torch(
        None, None, boxes=boxes, multimask_output=not single_mask, upscale=False
    )
    scores, low_res = torch.as_tensor(scores), torch.as_tensor(low_res)
    best = scores.argmax(dim=1)
    chosen = low_res[torch.arange(len(best)), best]
    if not isinstance(predictor.features, torch.Tensor):  # a numpy backend (ONNX Runtime)
        chosen = chosen.numpy()
    return np.asarray(predictor.upscale_masks(chosen), dtype=bool)


def _part_path(out_dir: Path, image_id: int) -> Path:
    return out_dir / PARTS / f"{image_id}.json"


def segment_detections(
    predictor,
    annotations: str | os.PathLike | dict,
    detections: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    single_mask: bool = False,
    limit: int | None = None,
    progress: bool | None = None,
    after_image: Callable[[int], None] | None = None,
) -> Path:
    """Masks for every detection; returns the COCO results file (``OUT/results.json``).

    Images already in ``OUT/parts`` are skipped (resume). ``limit``: the first N images of the
    annotations file only. ``after_image(image_id)`` is called after each image is saved.
    ``predictor`` may be a function that makes one: it is called once the files are checked,
    so a bad file fails before a model is loaded.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    files = image_files(annotations)
    by_image = load_detections(detections)
    check_detection_images(by_image, files, Path(detections).name)
    ids = sorted(files)[:limit] if limit else sorted(files)
    check_run_settings(out_dir, {"detections": Path(detections).name, "single_mask": single_mask})
    remove_stale_parts(out_dir / PARTS, {_part_path(out_dir, i).name for i in ids})
    job = BoxesJob(
        predictor if not hasattr(predictor, "set_image") else (lambda: predictor),
        str(images_dir),
        files,
        {i: by_image.get(i, []) for i in ids},
        str(out_dir),
        single_mask,
    )
    todo = [int(i) for i in pending_outputs([str(i) for i in ids], job.outputs)[0]]
    if todo:
        job.setup()  # the predictor is made now, once the files are checked
    show = sys.stderr.isatty() if progress is None else progress
    for image_id in tqdm(todo, unit="image", desc="segmenting boxes", disable=not show):
        job.run(str(image_id))
        if after_image is not None:
            after_image(image_id)
    return merge_parts(out_dir, ids)


@dataclass
class BoxesJob:
    """Boxes to masks for one image at a time: the per-image code of ``segment_detections``
    and of ``tinysam boxes`` (locally or on Ray workers, see ``tinysam.batch``). Items are
    image ids (as strings); each writes ``OUT/parts/<id>.json`` (COCO results with masks)."""

    make_predictor: Callable[[], Any]
    images_dir: str
    files: dict[int, str]
    detections: dict[int, list[Detection]]
    out_dir: str
    single_mask: bool = False
    max_pixels: int | None = None
    skippable = (ImageError, FileNotFoundError)

    def outputs(self, item: str) -> list[Path]:
        return [_part_path(Path(self.out_dir), int(item))]

    def setup(self) -> None:
        self._predictor = self.make_predictor()

    def run(self, item: str) -> dict[str, Any]:
        image_id = int(item)
        dets = self.detections.get(image_id, [])
        rles = []
        if dets:
            path = Path(self.images_dir) / self.files[image_id]
            image = load_image(path, max_pixels=self.max_pixels)
            boxes = np.array([d.box_xyxy for d in dets], np.float32)
            rles = encode_masks(segment_boxes(self._predictor, image, boxes, self.single_mask))
        results = [
            {
                "image_id": image_id,
                "category_id": d.category_id,
                "segmentation": r,
                "score": d.score,
            }
            for d, r in zip(dets, rles)
        ]
        write_json_output(self.outputs(item)[0], "boxes-part", {"results": results})
        return {"image_id": image_id, "masks": len(results)}


def check_run_settings(out_dir: Path, settings: dict) -> None:
    """Parts of a run with other settings must not mix with this one's (resume only the same
    run). The model is the caller's to keep the same."""
    path = out_dir / RUN
    if path.exists():
        previous = _read_json(path, "run settings")
        if previous != settings:
            raise DatasetError(
                f"{out_dir} holds a run with other settings ({previous}); use another --out, "
                "or empty it to start over"
            )
    else:
        with atomic_write(path, "w") as f:
            json.dump(settings, f)


def merge_parts(out_dir: Path, ids: Iterable[int]) -> Path:
    """Join the per-image parts, in image-id order, into ``OUT/results.json`` (atomically)."""
    results = []
    for image_id in ids:
        with open(_part_path(out_dir, image_id), encoding="utf-8") as f:
            results.extend(json.load(f)["results"])
    path = out_dir / RESULTS
    with atomic_write(path, "w") as f:
        json.dump(results, f, allow_nan=False)
    return path


def coco_mask_ap(
    annotations: str | os.PathLike,
    results: str | os.PathLike,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """pycocotools' mask AP (``segm``) of a results file, on ``image_ids`` (default: all the
    annotated images; a run with ``limit`` passes the images it segmented)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        dets = _read_json(Path(results), "results file")
        if not dets:
            return dict.fromkeys(COCO_METRICS, 0.0)
        dt = gt.loadRes(dets)
        evaluator = COCOeval(gt, dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_METRICS, evaluator.stats[:6])}


def lvis_mask_ap(
    annotations: str | os.PathLike,
    results: str | os.PathLike,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """The LVIS API's mask AP (federated: only categories verified present or absent count),
    on ``image_ids`` (default: all the annotated images)."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError as err:
        raise ImportError(
            "LVIS scoring needs the LVIS API: pip install lvis (it also needs opencv-python)",
            name="lvis",
        ) from err
    gt = LVIS(str(annotations))
    dt = LVISResults(gt, str(results))
    evaluator = LVISEval(gt, dt, iou_type="segm")
    if image_ids is not None:
        evaluator.params.img_ids = sorted(image_ids)
    evaluator.run()
    stats = evaluator.get_results()
    return {name: float(stats[name]) for name in LVIS_METRICS if name in stats}
