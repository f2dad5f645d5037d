"""Synthetic SA-1B: shapes on textured backgrounds with exact masks, in SA-1B's file layout.

For tests and ``tinysam distill demo``: real SA-1B cannot be had here, and exact masks make the
ground-truth terms meaningful. Each image gets a smooth colour gradient with noise texture and
a few filled ellipses, rectangles and triangles in distinct colours; later shapes occlude
earlier ones, and each annotation is the visible part (as SA-1B's are).

``rich_image`` (the demo's data, ``style="rich"``) is harder in the ways that make hard prompts
matter: more shapes at scales a decade apart, rotated, with thin parts (bars, rings, crosses)
and textures of their own (stripes, checks, noise), overlapping so that most are partly hidden.
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


RICH_KINDS = ("ellipse", "box", "triangle", "bar", "ring", "cross")


def _rotated(points: np.ndarray, angle: float, centre: tuple[float, float]) -> list[tuple]:
    c, s = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return [(centre[0] + c * a - s * b, centre[1] + s * a + c * b) for a, b in zip(x, y)]


def _shape_mask(rng: np.random.Generator, kind: str, size: tuple[int, int]) -> np.ndarray:
    """One shape's full (unoccluded) mask, H x W bool, rotated at random."""
    h, w = size
    extent = max(h, w)
    radius = extent * float(np.exp(rng.uniform(np.log(0.05), np.log(0.3))))  # a decade of scales
    centre = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.5, 1.0)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("ellipse", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        outline = np.stack([radius * np.cos(t), radius * aspect * np.sin(t)], 1)
        draw.polygon(_rotated(outline, angle, centre), fill=255)
        if kind == "ring":  # a thin band: the hole is most of it
            inner = outline * rng.uniform(0.55, 0.75)
            draw.polygon(_rotated(inner, angle, centre), fill=0)
    elif kind == "triangle":
        corners = np.array([[0, -radius], [-radius, radius * aspect], [radius, radius * aspect]])
        draw.polygon(_rotated(corners, angle, centre), fill=255)
    else:
        half = {"box": radius * aspect, "bar": max(1.5, radius * rng.uniform(0.06, 0.15))}
        width = half.get(kind, max(1.5, radius * rng.uniform(0.1, 0.2)))
        arms = [np.array([[-radius, -width], [radius, -width], [radius, width], [-radius, width]])]
        if kind == "cross":
            arms.append(arms[0][:, ::-1])
        for arm in arms:
            draw.polygon(_rotated(arm, angle, centre), fill=255)
    return np.asarray(canvas) > 127


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A shape's own pattern: H x W x 3 offsets around its colour (stripes, checks or noise)."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    amplitude = rng.uniform(10, 35)
    if kind == 0:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # checks
        cell = rng.integers(3, 8)
        wave = ((xs // cell + ys // cell) % 2) * 2 - 1.0
    else:
        wave = rng.normal(0, 0.7, (h, w))
    tint = rng.uniform(0.5, 1.0, 3)
    return wave[..., None] * amplitude * tint


def rich_image(
    rng: np.random.Generator, size: tuple[int, int], shapes: int, min_area: float = 0.002
):
    """Like ``synthetic_image``, harder (see the module doc). Objects whose visible part
    covers less than ``min_area`` of the image are not annotated (their pixels stay drawn)."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    image = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    image = image + rng.normal(0, 10, (h, w, 3))
    owners = np.zeros((h, w), np.int32)
    count = int(rng.integers(max(1, shapes - 2), shapes + 3))
    for k in range(1, count + 1):
        kind = RICH_KINDS[rng.integers(0, len(RICH_KINDS))]
        mask = _shape_mask(rng, kind, size)
        colour = rng.integers(0, 256, 3).astype(np.float64)
        image[mask] = (colour + _texture(rng, size))[mask]
        owners[mask] = k
    masks = np.stack([owners == k for k in range(1, count + 1)])
    areas = masks.reshape(count, -1).sum(1)
    shown = areas >= max(1.0, min_area * h * w)
    masks, areas = masks[shown], areas[shown]
    order = np.argsort(-areas, kind="stable")
    return np.clip(image, 0, 255).astype(np.uint8), masks[order]


STYLES = {"plain": synthetic_image, "rich": rich_image}


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
    style: str = "plain",
) -> Path:
    """``count`` images as ``sa_<id>.jpg`` + ``sa_<id>.json`` in ``out``; with ``shard_size``,
    packed into ``.tar`` shards of that many images instead. ``style``: ``plain``
    (``synthetic_image``) or ``rich`` (``rich_image``, about ``shapes`` +- 2 objects).
    Returns ``out``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[tuple[str, bytes]] = []
    for image_id in range(count):
        image, masks = STYLES[style](rng, size, shapes)
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
