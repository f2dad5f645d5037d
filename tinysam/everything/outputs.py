"""Everything-mode results on disk: one COCO-RLE JSON per image, and an overlay to look at."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import (
    BROKEN,
    DONE,
    ImageError,
    describe_os_error,
    load_image,
    output_state,
    save_png,
    write_json_output,
)
from ..masks import decodable_rle

OVERLAY_SUFFIX = ".overlay.png"


def output_names(images: list[Path]) -> dict[Path, str]:
    """Each image's output base name in the output folder: its stem, or its whole file name
    where two images share a stem (``dup.jpg`` and ``dup.png`` give ``dup.jpg.json`` and
    ``dup.png.json``), so no two images write the same file. Compared case-insensitively,
    as on macOS and Windows disks."""
    counts: dict[str, int] = {}
    for image in images:
        counts[image.stem.casefold()] = counts.get(image.stem.casefold(), 0) + 1
    return {
        image: image.stem if counts[image.stem.casefold()] == 1 else image.name for image in images
    }


def our_overlays(images: list[Path]) -> set[Path]:
    """The images in a folder that are overlays this command wrote (``NAME.overlay.png``
    next to an image named ``NAME.*``, carrying our mark): with ``--out`` equal to the input
    folder, a later run must not take them for new images. A user's own file of that name is an
    input (and ``check_no_clobber`` then refuses to write over it)."""
    names = output_names(images)
    produced = {image.with_name(names[image] + OVERLAY_SUFFIX) for image in images}
    return {
        image for image in images if image in produced and output_state(image) in (DONE, BROKEN)
    }


def everything_outputs(base: str, out_dir: Path, overlay: bool) -> list[Path]:
    """The files a finished image leaves in ``out_dir`` (the JSON, then the overlay), for the
    base name ``output_names`` gave it."""
    paths = [out_dir / f"{base}.json"]
    if overlay:
        paths.append(out_dir / f"{base}{OVERLAY_SUFFIX}")
    return paths


def check_no_clobber(plan: dict[Path, list[Path]]) -> None:
    """Refuse a plan (image -> its outputs) where an output is an input or another's output."""
    inputs = {image.resolve() for image in plan}
    seen: dict[Path, Path] = {}
    for image, outputs in plan.items():
        for path in outputs:
            key = path.resolve()
            if key in inputs:
                raise ValueError(f"the output {path} would overwrite an input image")
            if key in seen:
                raise ValueError(f"{image.name} and {seen[key].name} would both write {path}")
            seen[key] = image


def write_everything(
    generator,
    image_path: Path,
    outputs: list[Path],
    mode: str,
    max_pixels: int | None = None,
) -> dict:
    """Run ``generator`` (output_mode 'coco_rle') on one image and write ``outputs`` (the
    JSON, and the overlay if listed; see ``everything_outputs``) atomically."""
    from pycocotools import mask as mask_utils

    from ..visualize import draw_masks

    image = load_image(image_path, max_pixels=max_pixels)
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    json_path, *overlay_path = outputs
    document = {
        "format_version": 1,
        "image": image_path.name,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "mode": mode,
        "points_per_side": generator.points_per_side,
        "prompts": generator.stats.prompts,
        "annotations": records,
    }  # no timing here: the same image gives the same bytes wherever it ran
    try:
        # The overlay first: the JSON's presence marks the image as done.
        if overlay_path:
            masks = [mask_utils.decode(decodable_rle(r["segmentation"])) for r in records]
            save_png(draw_masks(image, masks), overlay_path[0])
        write_json_output(json_path, "everything", document)
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


@dataclass
class EverythingJob:
    """``tinysam everything`` for one image at a time: the per-image code of local runs and of
    Ray workers alike (see ``tinysam.batch``). ``make_predictor`` must be picklable (e.g. a
    ``functools.partial`` of ``tinysam.backends.load_predictor``); ``plan`` maps each image
    path to its output paths (``everything_outputs``)."""

    make_predictor: Callable[[], Any]
    plan: dict[str, list[str]]
    mode: str = "hierarchical"
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    max_pixels: int | None = None
    skippable = (ImageError, FileNotFoundError)

    def outputs(self, item: str) -> list[Path]:
        return [Path(p) for p in self.plan[item]]

    def setup(self) -> None:
        from .automatic import SamAutomaticMaskGenerator
        from .hierarchical import SamHierarchicalMaskGenerator

        generator_class = (
            SamHierarchicalMaskGenerator
            if self.mode == "hierarchical"
            else SamAutomaticMaskGenerator
        )
        self._generator = generator_class(
            self.make_predictor(),
            points_per_side=self.points_per_side,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            output_mode="coco_rle",
        )

    def run(self, item: str) -> dict[str, Any]:
        return write_everything(
            self._generator, Path(item), self.outputs(item), self.mode, self.max_pixels
        )
