"""Point-prompt mIoU against the number of clicks (the paper's Figure 4, SAM's protocol).

For each ground-truth mask a simulated user clicks 1..N times. The first click goes to the
interior point farthest from the object's boundary; each next one to the point farthest from the
boundary of the error regions (false negatives get a positive click, false positives a negative
one), i.e. into the middle of the largest error. The image border counts as boundary. With one
click the best of the three multi-output masks (by predicted IoU) is kept; with more, the
single-mask output, fed the previous low-res logits as SAM's interactive protocol does.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_write, load_image
from ..masks import mask_iou

POSITIVE, NEGATIVE = 1, 0


def distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` to the nearest pixel outside it (the
    outside of the image included); 0 outside the region."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(region.astype(bool), 1, constant_values=False)
    return distance_transform_edt(padded)[1:-1, 1:-1]


def farthest_point(region: np.ndarray) -> tuple[int, int, float]:
    """(x, y, distance) of the region's pixel farthest from its boundary; the first in row-major
    order among ties. Distance 0 for an empty region."""
    dist = distance_to_boundary(region)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y), float(dist[y, x])


def next_click(gt: np.ndarray, prediction: np.ndarray | None) -> tuple[int, int, int] | None:
    """(x, y, label) of the next simulated click, or None when the prediction is exact."""
    gt = gt.astype(bool)
    if prediction is None:
        x, y, d = farthest_point(gt)
        return (x, y, POSITIVE) if d > 0 else None
    prediction = prediction.astype(bool)
    fn_x, fn_y, fn_d = farthest_point(gt & ~prediction)
    fp_x, fp_y, fp_d = farthest_point(prediction & ~gt)
    if max(fn_d, fp_d) == 0:
        return None
    return (fn_x, fn_y, POSITIVE) if fn_d >= fp_d else (fp_x, fp_y, NEGATIVE)


def click_ious(predictor, gt: np.ndarray, clicks: int) -> list[float]:
    """IoU with ``gt`` after each of ``clicks`` simulated clicks (the image is already set)."""
    points: list[tuple[int, int]] = []
    labels: list[int] = []
    prediction, logits, ious = None, None, []
    for n in range(clicks):
        click = next_click(gt, prediction)
        if click is None:  # exact already: further clicks change nothing
            ious.extend([ious[-1]] * (clicks - n))
            break
        points.append(click[:2])
        labels.append(click[2])
        masks, scores, low_res = predictor.predict(
            point_coords=np.array(points, np.float32),
            point_labels=np.array(labels, np.float32),
            mask_input=None if logits is None else logits[None],
            multimask_output=n == 0,
        )
        best = int(np.argmax(scores))
        prediction, logits = masks[best], low_res[best]
        ious.append(mask_iou(prediction, gt))
    return ious


@dataclass
class ClickCurve:
    """mIoU after 1..N clicks over ``masks`` ground-truth masks."""

    miou: list[float]
    masks: int

    def table(self) -> str:
        rows = ["| clicks | mIoU |", "|---|---|"]
        rows += [f"| {n} | {v:.4f} |" for n, v in enumerate(self.miou, start=1)]
        return "\n".join(rows) + f"\n\n{self.masks} masks\n"


def point_miou(
    predictor,
    annotations: str | os.PathLike | dict,
    images_dir: str | os.PathLike,
    clicks: int = 9,
    max_masks: int | None = None,
    min_area: int = 0,
    progress: bool | None = None,
) -> ClickCurve:
    """The click curve over the first ``max_masks`` non-crowd masks (image-id order) of a
    COCO-format dataset with at least ``min_area`` pixels."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from tqdm.auto import tqdm

    from .instances import ground_truth, image_files

    if clicks < 1:
        raise ValueError("clicks must be at least 1")
    files = image_files(gt := ground_truth(annotations))  # checked: one-line errors
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    chosen: list[tuple[int, dict]] = []
    for image_id in sorted(files):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            if ann.get("area", min_area) >= min_area:
                chosen.append((image_id, ann))
    chosen = chosen[:max_masks] if max_masks else chosen
    show = sys.stderr.isatty() if progress is None else progress
    sums, current = np.zeros(clicks), None
    for image_id, ann in tqdm(chosen, unit="mask", desc="clicking", disable=not show):
        if image_id != current:
            predictor.set_image(load_image(Path(images_dir) / files[image_id]))
            current = image_id
        sums += click_ious(predictor, coco.annToMask(ann).astype(bool), clicks)
    count = len(chosen)
    return ClickCurve([float(v) for v in sums / max(count, 1)], count)


def plot_curves(curves: dict[str, ClickCurve], path: str | os.PathLike) -> None:
    """A PNG of mIoU against clicks, one line per model (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve.miou) + 1), curve.miou, marker="o", label=name)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
