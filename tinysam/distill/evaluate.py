"""How close a student's masks are to its teacher's and to the ground truth, on fixed prompts.

Every object of every image gets one point prompt (a pixel of its mask, drawn with a fixed seed)
and one box prompt (its ground-truth box), answered as ``SamPredictor`` answers them (one point:
the best of three candidates by predicted IoU; a box: the single-mask output). Masks are
compared in the decoder's low-res frame, where the losses compare them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..masks import PROMPT_KINDS, answer, chosen_masks, mask_candidates
from ..masks import Agreement as IoUMeans
from ..modeling import Sam
from .data import SA1BDataset, read_annotations
from .decoding import decode, evaluating, to_low_res
from .prompts import sample_points


@dataclass
class Agreement:
    """Mean IoUs over ``prompts`` prompts of one kind."""

    student_teacher: float
    student_gt: float
    teacher_gt: float
    prompts: int


@torch.no_grad()
def evaluate_agreement(
    student: Sam,
    teacher: Sam,
    dataset: SA1BDataset,
    objects_per_image: int = 16,
    seed: int = 0,
) -> dict[str, Agreement]:
    """``{"point": Agreement, "box": Agreement}`` over the first ``objects_per_image`` objects
    of every image. Both models must have their image encoders."""
    generator = torch.Generator().manual_seed(seed)
    pairs = ("student_teacher", "student_gt", "teacher_gt")
    means = {pair: IoUMeans() for pair in pairs}
    device = next(student.parameters()).device
    with evaluating(student), evaluating(teacher):
        for index in range(len(dataset)):
            sample = dataset[index]
            chosen = list(range(min(objects_per_image, len(sample.annotations))))
            if not chosen:
                continue
            image = sample.image[None].to(device)
            embeddings = {
                "student": student.image_encoder(image),
                "teacher": teacher.image_encoder(image),
            }
            full = sample.masks(chosen)
            gt = to_low_res(full, student.prompt_encoder.mask_input_size)
            points, _ = sample_points(full, generator)
            ones = torch.ones(len(chosen), 1, device=device)
            prompts = {
                "point": (points[:, None].to(device), ones, None),
                "box": (None, None, sample.boxes(chosen).to(device)),
            }
            for kind, prompt in prompts.items():
                masks = {}
                for name, network in (("student", student), ("teacher", teacher)):
                    out = decode(network, embeddings[name], *prompt)
                    candidates = mask_candidates(1 if kind == "point" else 0)
                    masks[name] = chosen_masks(out.masks, out.iou, candidates).cpu()
                means["student_teacher"].add(kind, masks["student"], masks["teacher"])
                means["student_gt"].add(kind, masks["student"], gt)
                means["teacher_gt"].add(kind, masks["teacher"], gt)
    return {
        kind: Agreement(
            *(means[pair].mean(kind) for pair in pairs), means["student_gt"].counts[kind]
        )
        for kind in PROMPT_KINDS
    }


@torch.no_grad()
def ground_truth_iou(
    predictors: dict[str, object],
    folder: str | os.PathLike,
    objects_per_image: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{name: {"point"|"box": mean IoU with the ground truth}}`` for predictors of any
    backend (``SamPredictor``, ``OnnxPredictor``) on an SA-1B-format folder, at the image's own
    resolution: the first ``objects_per_image`` objects of each image, one point (a pixel of
    the mask drawn with ``seed``, the same for every predictor) and the ground-truth box."""
    from pycocotools import mask as mask_utils

    from ..io import load_image

    means = {name: IoUMeans() for name in predictors}
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(Path(folder).glob("*.json"), key=lambda p: p.name):
        annotations = read_annotations(path.read_bytes(), str(path))[:objects_per_image]
        if not annotations:
            continue
        image = load_image(path.with_suffix(".jpg"))
        rles = [a["segmentation"] for a in annotations]
        gt = torch.from_numpy(np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool))
        points, _ = sample_points(gt, generator)
        x, y, w, h = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).T
        boxes = torch.stack([x, y, x + w, y + h], dim=1)
        for name, predictor in predictors.items():
            predictor.set_image(image)
            size = predictor.original_size
            frame_points = predictor.transform.apply_coords_torch(points[:, None], size)
            frame_boxes = predictor.transform.apply_boxes_torch(boxes, size)
            means[name].add("point", answer(predictor, points=frame_points), gt)
            means[name].add("box", answer(predictor, boxes=frame_boxes), gt)
    return {name: {kind: m.mean(kind) for kind in PROMPT_KINDS} for name, m in means.items()}
