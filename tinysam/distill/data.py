"""SA-1B data for distillation: the folder or ``.tar`` shard layout, one JPEG and one JSON per
image, read without unpacking; and a seeded, rank-aware sampler.

A JSON holds ``{"image": {...}, "annotations": [{"segmentation": COCO RLE, "bbox": XYWH,
"area", "point_coords", ...}]}``. Masks stay RLE until a training step asks for some, then come
back in the model's input frame (resized like the image, zero-padded to a square).
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import read_image
from ..modeling.sam import PIXEL_MEAN, PIXEL_STD
from ..transforms import ResizeLongestSide


@dataclass(frozen=True)
class _Entry:
    """Where one image's JPEG and JSON are: a folder, or byte ranges inside a tar shard."""

    name: str
    source: str  # the folder or the shard
    image: tuple[int, int] | str  # (offset, size) in a shard, or a file name
    annotations: tuple[int, int] | str


@dataclass
class Sample:
    """One image ready for the encoder, with its annotations still in RLE form."""

    name: str
    image: torch.Tensor  # 3 x S x S, normalised and zero-padded
    original_size: tuple[int, int]
    input_size: tuple[int, int]  # the resized image inside the padded square
    annotations: list[dict]

    def masks(self, indices: list[int] | None = None) -> torch.Tensor:
        """Ground-truth masks (K x S x S bool) in the input frame, nearest-neighbour resized."""
        from pycocotools import mask as mask_utils

        chosen = range(len(self.annotations)) if indices is None else indices
        size = self.image.shape[-1]
        h, w = self.input_size
        out = torch.zeros(len(chosen), size, size, dtype=torch.bool)
        for k, i in enumerate(chosen):
            rle = dict(self.annotations[i]["segmentation"])
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
            mask = Image.fromarray(mask_utils.decode(rle) * 255)
            resized = np.asarray(mask.resize((w, h), Image.Resampling.NEAREST)) > 127
            out[k, :h, :w] = torch.from_numpy(resized)
        return out

    def boxes(self, indices: list[int] | None = None) -> torch.Tensor:
        """Ground-truth boxes (K x 4, XYXY) in the input frame."""
        chosen = range(len(self.annotations)) if indices is None else indices
        xywh = np.array([self.annotations[i]["bbox"] for i in chosen], dtype=np.float64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).reshape(-1, 4)
        transform = ResizeLongestSide(self.image.shape[-1])
        return torch.from_numpy(transform.apply_boxes(xyxy, self.original_size)).float()


class SA1BDataset(torch.utils.data.Dataset):
    """Images of an SA-1B folder (``*.jpg`` + ``*.json``) or of ``.tar`` shards of them.

    ``root`` is a folder (images inside it, and any ``.tar`` shards in it, are read) or one
    shard. Shards are indexed by their headers once; members are then read by offset, never
    extracted. ``min_area`` drops tiny annotations.
    """

    def __init__(
        self, root: str | os.PathLike, image_size: int = 1024, min_area: float = 0.0
    ) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.min_area = min_area
        self.transform = ResizeLongestSide(image_size)
        if not self.root.exists():
            raise FileNotFoundError(f"SA-1B data not found: {self.root}")
        shards = [self.root] if self.root.is_file() else sorted(self.root.glob("*.tar"))
        entries = [] if self.root.is_file() else _folder_entries(self.root)
        for shard in shards:
            entries += _shard_entries(shard)
        if not entries:
            raise ValueError(f"no SA-1B images (a .jpg with its .json) in {self.root}")
        self.entries = sorted(entries, key=lambda e: e.name)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        entry = self.entries[index]
        rgb = read_image(_read(entry, entry.image), name=f"{entry.source}: {entry.name}")
        annotations = [
            a
            for a in read_annotations(
                _read(entry, entry.annotations), f"{entry.source}: {entry.name}"
            )
            if a.get("area", 1) >= self.min_area
        ]
        resized = self.transform.apply_image(rgb)
        return Sample(
            name=entry.name,
            image=self.preprocess(resized),
            original_size=tuple(rgb.shape[:2]),
            input_size=tuple(resized.shape[:2]),
            annotations=annotations,
        )

    def preprocess(self, resized: np.ndarray) -> torch.Tensor:
        """Resized HxWx3 uint8 -> normalised, zero-padded 3 x S x S float."""
        x = torch.from_numpy(resized).permute(2, 0, 1).float()
        mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(3, 1, 1)
        x = (x - mean) / std
        h, w = resized.shape[:2]
        return torch.nn.functional.pad(x, (0, self.image_size - w, 0, self.image_size - h))


def read_annotations(data: bytes, where: str) -> list[dict]:
    """An SA-1B JSON's annotations, checked: each has a COCO RLE ``segmentation`` and a finite
    XYWH ``bbox`` (``area``, if present, a finite number); errors name the file and field."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: annotations are not JSON ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("annotations", []), list):
        raise ValueError(
            f'{where}: annotations must be a JSON object {{"image": ..., "annotations": [...]}}'
        )
    annotations = document.get("annotations", [])
    for k, ann in enumerate(annotations):
        field = f"{where}: annotations[{k}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{field} must be an object")
        rle = ann.get("segmentation")
        size = rle.get("size") if isinstance(rle, dict) else None
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)
            and isinstance(rle.get("counts"), (str, list))
        ):
            raise ValueError(f"{field}.segmentation must be a COCO RLE {{size: [h, w], counts}}")
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(_finite_number(v) for v in bbox)
            and bbox[2] >= 0
            and bbox[3] >= 0
        ):
            raise ValueError(f"{field}.bbox must be 4 finite numbers x, y, w, h (w, h >= 0)")
        if "area" in ann and not _finite_number(ann["area"]):
            raise ValueError(f"{field}.area must be a finite number")
    return annotations


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _folder_entries(folder: Path) -> list[_Entry]:
    entries = []
    for image in folder.glob("*.jpg"):
        annotations = image.with_suffix(".json")
        if annotations.is_file():
            entries.append(_Entry(image.stem, str(folder), image.name, annotations.name))
    return entries


def _shard_entries(shard: Path) -> list[_Entry]:
    """Index a tar shard: each JPEG and JSON's data offset and size, read from the headers."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed: members can be read by offset
            for info in tar:
                if info.isfile() and info.name.endswith((".jpg", ".json")):
                    stem, suffix = info.name.rsplit(".", 1)
                    members.setdefault(stem, {})[suffix] = (info.offset_data, info.size)
    except tarfile.ReadError as err:
        raise ValueError(f"{shard} is not an uncompressed tar shard ({err})") from err
    return [
        _Entry(Path(stem).name, str(shard), parts["jpg"], parts["json"])
        for stem, parts in members.items()
        if "jpg" in parts and "json" in parts
    ]


def _read(entry: _Entry, where: tuple[int, int] | str) -> bytes:
    if isinstance(where, str):
        return (Path(entry.source) / where).read_bytes()
    offset, size = where
    with open(entry.source, "rb") as f:
        f.seek(offset)
        return f.read(size)


class ShardedSampler(torch.utils.data.Sampler):
    """Each DDP rank's own slice of a seeded permutation, reshuffled every epoch.

    Every rank gets ``len(dataset) // world_size`` indices (the remainder is left out of that
    epoch, so ranks never share an image and step in lockstep). ``start`` skips indices already
    consumed in this epoch (resuming a run mid-epoch).
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if length < world_size:
            raise ValueError(f"{length} images cannot be split over {world_size} ranks")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        per_rank = self.length // self.world_size
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.length // self.world_size - self.start
