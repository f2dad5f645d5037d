"""segment-anything's ``utils/amg.py`` names, from their homes (``tinysam.masks`` and
``tinysam.everything.mask_ops``)."""

from ..everything.mask_ops import (
    MaskData,
    batch_iterator,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from ..masks import (
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    coco_encode_rle,
    mask_to_rle,
    rle_to_mask,
)

# segment-anything's name for the torch RLE encoder.
mask_to_rle_pytorch = mask_to_rle

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]
