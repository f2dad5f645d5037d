"""Synthetic SA-1B: shapes on textured backgrounds with exact masks, in SA-1B's file layout.

For tests and ``tinysam distill demo``: real SA-1B cannot be had here, and exact masks make the
ground-truth terms meaningful. Each image gets a smooth colour gradient with noise texture and
a few filled ellipses, rectangles and triangles in distinct colours; later shapes occlude
earlier ones, and each annotation is the visible part (as SA-1B's are).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write


def synthetic_image(rng: np.random.Generator, size: tuple[int, int], shapes: int):
    """An HxWx3 uint8 image and its shapes' visible masks (K x H x W bool), largest first."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    image = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    image = image + rng.normal(0, 12, (h, w, 3))  # texture
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    owner = Image.new("I", (w, h), 0)  # which shape each pixel shows (0 = background)
    draw, draw_owner = ImageDraw.Draw(canvas), ImageDraw.Draw(owner)
    for k in range(1, shapes + 1):
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        rx, ry = rng.uniform(0.06, 0.25) * w, rng.uniform(0.06, 0.25) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            box = [cx - rx, cy - ry, cx + rx, cy + ry]
            draw.ellipse(box, fill=colour)
            draw_owner.ellipse(box, fill=k)
        elif kind == 1:
            box = [cx - rx, cy - ry, cx + rx, cy + ry]
            draw.rectangle(box, fill=colour)
            draw_owner.rectangle(box, fill=k)
        else:
            corners = [(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)]
            draw.polygon(corners, fill=colour)
            draw_owner.polygon(corners, fill=k)
    owners = np.asarray(owner)
    masks = np.stack([owners == k for k in range(1, shapes + 1)])
    masks = masks[masks.reshape(shapes, -1).sum(1) > 0]
    order = np.argsort(-masks.reshape(len(masks), -1).sum(1), kind="stable")
    return np.asarray(canvas), masks[order]


def annotations_for(masks: np.ndarray, image_id: int, size: tuple[int, int]) -> dict:
    """SA-1B's JSON document for one image's masks."""
    from pycocotools import mask as mask_utils

    h, w = size
    annotations = []
    for k, mask in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        pick = len(xs) // 2
        annotations.append(
            {
                "id": image_id * 1000 + k,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                "bbox": bbox,
                "area": int(mask.sum()),
                "point_coords": [[float(xs[pick]), float(ys[pick])]],
                "predicted_iou": 1.0,
                "stability_score": 1.0,
                "crop_box": [0, 0, w, h],
            }
        )
    image = {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}
    return {"image": image, "annotations": annotations}


def write_synthetic_sa1b(
    out: str | Path,
    count: int,
    size: tuple[int, int] = (192, 256),
    shapes: int = 5,
    seed: int = 0,
    shard_size: int = 0,
) -> Path:
    """``count`` images as ``sa_<id>.jpg`` + ``sa_<id>.json`` in ``out``; with ``shard_size``,
    packed into ``.tar`` shards of that many images instead. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[tuple[str, bytes]] = []
    for image_id in range(count):
        image, masks = synthetic_image(rng, size, shapes)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        document = json.dumps(annotations_for(masks, image_id, size)).encode()
        files += [(f"sa_{image_id}.jpg", buffer.getvalue()), (f"sa_{image_id}.json", document)]
    if not shard_size:
        for name, data in files:
            with atomic_write(out / name, "wb") as f:
                f.write(data)
        return out
    per_shard = 2 * shard_size
    for number, start in enumerate(range(0, len(files), per_shard)):
        with atomic_write(out / f"shard_{number:05d}.tar", "wb") as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for name, data in files[start : start + per_shard]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out
