"""Everything-mode results on disk: one COCO-RLE JSON per image, and an overlay to look at."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write, describe_os_error, load_image, save_png
from ..masks import decodable_rle


def everything_outputs(image_path: Path, out_dir: Path, overlay: bool) -> list[Path]:
    """The files a finished image leaves in ``out_dir`` (the JSON, then the overlay)."""
    paths = [out_dir / f"{image_path.stem}.json"]
    if overlay:
        paths.append(out_dir / f"{image_path.stem}.png")
    return paths


def write_everything(generator, image_path: Path, out_dir: Path, mode: str, overlay: bool) -> dict:
    """Run ``generator`` (output_mode 'coco_rle') on one image and write its outputs atomically."""
    from pycocotools import mask as mask_utils

    from ..visualize import draw_masks

    image = load_image(image_path)
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    json_path, *overlay_path = everything_outputs(image_path, out_dir, overlay)
    document = {
        "image": image_path.name,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "mode": mode,
        "points_per_side": generator.points_per_side,
        "prompts": generator.stats.prompts,
        "seconds": round(seconds, 3),
        "annotations": records,
    }
    try:
        # The overlay first: the JSON's presence marks the image as done.
        if overlay_path:
            masks = [mask_utils.decode(decodable_rle(r["segmentation"])) for r in records]
            save_png(draw_masks(image, masks), overlay_path[0])
        with atomic_write(json_path, "w") as f:
            json.dump(document, f)
    except OSError as err:
        raise OSError(err.errno, describe_os_error(err, json_path)) from err
    summary = {
        "image": str(image_path),
        "masks": len(records),
        "prompts": generator.stats.prompts,
        "seconds": round(seconds, 3),
        "json": str(json_path),
    }
    if overlay_path:
        summary["overlay"] = str(overlay_path[0])
    return summary
