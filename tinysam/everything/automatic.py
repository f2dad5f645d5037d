"""``SamAutomaticMaskGenerator``: masks for everything in an image, from a grid of point prompts.

Parameters, filters and output records are segment-anything's. The difference is where the work
goes: masks are filtered by predicted IoU at low resolution, and the survivors' stability
scores, boxes and RLEs come from their low-res logits without upscaling them (``upscaled``:
full-size values only along the masks' edges, the reference's values). Only the hierarchical
mode's first round, which needs the high-logit area, upscales its masks the reference's way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checks import as_rgb_uint8, check_points_per_side
from ..predictor import SamPredictor
from ..transforms import upscale_logits
from .mask_ops import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    nms,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .upscaled import upscaled_masks

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MASK_THRESHOLD = 0.0
# Upscale kept masks in chunks of about this many full-size logits (bounds memory on big images).
UPSCALE_CHUNK_PIXELS = 1 << 25


def _empty_masks() -> MaskData:
    return MaskData(
        iou_preds=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        stability_score=torch.zeros(0),
        boxes=torch.zeros(0, 4, dtype=torch.long),
        rles=[],
    )


@dataclass
class GenerationStats:
    """What the last ``generate`` call cost: decoder prompts and seconds per stage."""

    prompts: int = 0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    postprocess_s: float = 0.0
    rounds: list[int] = field(default_factory=list)  # prompts per round (hierarchical: 2)
    covered_fraction: float | None = None  # hierarchical: share of the image covered by round 1


class SharedEmbedding:
    """A predictor whose ``set_image`` skips the image it already holds (the same array
    object), so several generators, or a cache that restored the embedding, share one encode."""

    def __init__(self, predictor, current: np.ndarray | None = None) -> None:
        self._predictor = predictor
        self._image = current

    def set_image(self, image: np.ndarray, *args, **kwargs) -> None:
        if self._image is not image:
            self._predictor.set_image(image, *args, **kwargs)
            self._image = image

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        """``model`` is a ``Sam``, or any predictor with ``set_image``, ``predict_torch``,
        ``transform``, ``input_size`` and ``original_size`` (another backend)."""
        if crop_n_layers < 0 or crop_n_points_downscale_factor < 1:
            raise ValueError(
                "crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1, got "
                f"{crop_n_layers} and {crop_n_points_downscale_factor}"
            )
        if not 0 < crop_overlap_ratio < 1 and crop_n_layers:
            raise ValueError(f"crop_overlap_ratio must be in (0, 1), got {crop_overlap_ratio}")
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids")
        if points_per_side is not None:
            check_points_per_side(points_per_side)
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1})")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}"
            )
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, got {points_per_batch}")

        self.predictor = model if hasattr(model, "predict_torch") else SamPredictor(model)
        # Our backends (PredictorBase) skip full-size masks, and the masks of prompts that fail
        # the IoU filter; another predictor-like object gets segment-anything's call. (An
        # attribute, not isinstance, so wrappers such as SharedEmbedding pass it through.)
        self._decode_options = {}
        if getattr(self.predictor, "filters_while_decoding", False):
            self._decode_options["upscale"] = False
            if pred_iou_thresh > 0.0:
                self._decode_options["min_iou"] = pred_iou_thresh
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.stats = GenerationStats()

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for the whole image (HxWx3 uint8 RGB; or what ``set_image`` takes: HxW, HxWx4,
        a PIL image), as segment-anything's records."""
        self.stats = GenerationStats()
        data = self._generate_masks(as_rgb_uint8(image))
        return self._records(data)

    # ------------------------------------------------------------------ stages

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        data = MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))
        if len(crop_boxes) > 1 and len(data):
            # Between crops, prefer masks from smaller crops.
            scores = 1 / box_area(data["crop_boxes"]).double()
            data.filter(nms(data["boxes"], scores, self.crop_nms_thresh))
        return data

    def _set_image(self, image: np.ndarray) -> None:
        start = time.perf_counter()
        self.predictor.set_image(image)
        self.stats.encoder_s += time.perf_counter() - start

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer_idx: int, orig_size: tuple[int, int]
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        self._set_image(crop)
        points = self.point_grids[layer_idx] * np.array(crop.shape[:2])[None, ::-1]
        data = self._predict_points(points, crop_box, orig_size)
        self.predictor.reset_image()
        return self._finish_crop(data, crop_box)

    def _finish_crop(self, data: MaskData, crop_box: list[int]) -> MaskData:
        """NMS within a crop, then back to the image frame."""
        if len(data):
            data.filter(nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data), dtype=torch.long).reshape(-1, 4)
        return data

    def _predict_points(
        self,
        points: np.ndarray,
        crop_box: list[int],
        orig_size: tuple[int, int],
        covered: torch.Tensor | None = None,
        high_score_thresh: float | None = None,
    ) -> MaskData:
        """Prompt every point (3 masks each) and keep the masks that pass the filters.

        ``covered`` (HxW bool, the crop's size), if given, gains the kept masks' pixels whose
        logits exceed ``high_score_thresh`` (the hierarchical mode's covered area).
        """
        data = _empty_masks()
        self.stats.rounds.append(len(points))
        self.stats.prompts += len(points)
        for (batch,) in batch_iterator(self.points_per_batch, points):
            data.cat(self._process_batch(batch, crop_box, orig_size, covered, high_score_thresh))
        return data

    def _decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B*3)x256x256 and IoU predictions (B*3) for B point prompts."""
        start = time.perf_counter()
        predictor = self.predictor
        coords = predictor.transform.apply_coords(points, predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)[:, None, :]
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        _, iou_preds, low_res = predictor.predict_torch(
            coords, labels, multimask_output=True, return_logits=True, **self._decode_options
        )
        self.stats.decoder_s += time.perf_counter() - start
        return low_res.flatten(0, 1), iou_preds.flatten(0, 1)

    def _process_batch(
        self,
        points: np.ndarray,
        crop_box: list[int],
        orig_size: tuple[int, int],
        high: torch.Tensor | None,
        high_score_thresh: float | None,
    ) -> MaskData:
        low_res, iou_preds = self._decode(points)
        start = time.perf_counter()
        per_point = low_res.shape[0] // len(points)
        point_rows = torch.as_tensor(np.repeat(points, per_point, axis=0))
        keep = iou_preds > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        if keep is not None:
            low_res, iou_preds, point_rows = low_res[keep], iou_preds[keep], point_rows[keep]

        if high is None:
            out = self._masks_from_low_res(low_res, iou_preds, point_rows, crop_box, orig_size)
            self.stats.postprocess_s += time.perf_counter() - start
            return out

        out = _empty_masks()
        predictor = self.predictor
        h, w = predictor.original_size
        chunk = max(1, UPSCALE_CHUNK_PIXELS // (h * w + 1024 * 1024))
        orig_h, orig_w = orig_size
        for first in range(0, low_res.shape[0], chunk):
            rows = slice(first, first + chunk)
            logits = upscale_logits(
                low_res[rows, None],
                predictor.input_size,
                predictor.original_size,
                predictor.transform.target_length,
            )[:, 0].cpu()
            stability = calculate_stability_score(
                logits, MASK_THRESHOLD, self.stability_score_offset
            )
            passed = (
                stability >= self.stability_score_thresh
                if self.stability_score_thresh > 0.0
                else torch.ones_like(stability, dtype=torch.bool)
            )
            logits = logits[passed]
            masks = logits > MASK_THRESHOLD
            boxes = batched_mask_to_box(masks)
            inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            if high is not None:
                for mask_logits in logits[inside]:
                    high |= mask_logits > high_score_thresh
            del logits
            masks = uncrop_masks(masks[inside], crop_box, orig_h, orig_w)
            out.cat(
                MaskData(
                    iou_preds=iou_preds[rows][passed][inside].cpu(),
                    points=point_rows[rows][passed][inside],
                    stability_score=stability[passed][inside],
                    boxes=boxes[inside],
                    rles=mask_to_rle(masks),
                )
            )
        self.stats.postprocess_s += time.perf_counter() - start
        return out

    def _masks_from_low_res(
        self,
        low_res: torch.Tensor,
        iou_preds: torch.Tensor,
        point_rows: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> MaskData:
        """Stability filter, boxes and RLEs straight from the low-res logits (``upscaled``):
        the reference's values without its full-size logits."""
        predictor = self.predictor
        geometry = upscaled_masks(
            tuple(predictor.input_size),
            tuple(predictor.original_size),
            int(low_res.shape[-1]),
            int(predictor.transform.target_length),
        )
        offset = self.stability_score_offset
        thresholds = [MASK_THRESHOLD + offset, MASK_THRESHOLD - offset, MASK_THRESHOLD]
        out = _empty_masks()
        batch = geometry.masks_per_batch(len(thresholds))  # bounds the memory of big images
        for first in range(0, len(low_res), batch):
            rows = slice(first, first + batch)
            cells = geometry.analyse(low_res[rows].cpu(), thresholds)
            out.cat(
                self._filtered_masks(cells, iou_preds[rows], point_rows[rows], crop_box, orig_size)
            )
        return out

    def _filtered_masks(self, cells, iou_preds, point_rows, crop_box, orig_size) -> MaskData:
        """The stability filter, then boxes, the crop-edge filter and RLEs of what passes."""
        offset = self.stability_score_offset
        stability = (
            cells.count(MASK_THRESHOLD + offset).int() / cells.count(MASK_THRESHOLD - offset).int()
        )
        if self.stability_score_thresh > 0.0:
            passed = (stability >= self.stability_score_thresh).nonzero()[:, 0]
            cells, iou_preds = cells.select(passed), iou_preds[passed]
            point_rows, stability = point_rows[passed], stability[passed]
        if len(iou_preds) == 0:
            return _empty_masks()
        segments = cells.segments(MASK_THRESHOLD)
        boxes = segments.boxes(len(iou_preds))
        orig_h, orig_w = orig_size
        inside = (~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])).numpy()
        kept = np.flatnonzero(inside)
        return MaskData(
            iou_preds=iou_preds.cpu()[kept],
            points=point_rows[kept],
            stability_score=stability[kept],
            boxes=boxes[kept],
            rles=segments.rles(kept, tuple(crop_box[:2]), orig_size),
        )

    # ------------------------------------------------------------------ output

    def _records(self, data: MaskData) -> list[dict[str, Any]]:
        start = time.perf_counter()
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        data.to_numpy()
        records = []
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation: Any = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": area_from_rle(rle),
                    "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
                }
            )
        self.stats.postprocess_s += time.perf_counter() - start
        return records

    @staticmethod
    def postprocess_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill small holes and drop small islands, then NMS again preferring untouched masks."""
        if len(data["rles"]) == 0:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            mask = rle_to_mask(rle)
            mask, holes_changed = remove_small_regions(mask, min_area, mode="holes")
            mask, islands_changed = remove_small_regions(mask, min_area, mode="islands")
            masks.append(torch.as_tensor(mask))
            scores.append(0.0 if (holes_changed or islands_changed) else 1.0)
        masks_t = torch.stack(masks)
        boxes = batched_mask_to_box(masks_t)
        keep = nms(boxes, torch.tensor(scores), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle(masks_t[i : i + 1])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data
