"""The teacher's image embeddings, computed once and stored, so the 2.5 GB ViT-H encoder never
runs inside the training loop.

Layout of a cache folder: ``shard_00000.npy`` ... (float16, K x 256 x 64 x 64 each, plain
``.npy`` read without pickle) and ``index.json`` listing every finished shard with its image
names and SHA-256. A shard is written (atomically) only when full, and the index after it, so a
killed run loses at most the shard in progress and resumes from the index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, write_json_output

INDEX = "index.json"
FORMAT = "tinysam-teacher-cache"


class CacheError(ValueError):
    """A cache folder that is missing, foreign, corrupt or made for other data."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(folder: Path) -> dict | None:
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{path} is unreadable ({err}); delete it and cache again") from err
    if index.get("format") != FORMAT:
        raise CacheError(f"{path} is not a teacher cache index")
    return index


def teacher_embedding(encode: Callable[[torch.Tensor], torch.Tensor], sample) -> np.ndarray:
    """One image's stored embedding (C x h x w float16): the per-image code of both the
    single-process cache and the sharded one."""
    return encode(sample.image[None].float())[0].cpu().to(torch.float16).numpy()


def cache_teacher(
    encode: Callable[[torch.Tensor], torch.Tensor],
    samples: Iterable,
    out: str | os.PathLike,
    teacher: str,
    shard_size: int = 64,
    names: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Store ``encode(image[None])`` for every sample (objects with ``name`` and ``image``);
    returns the index. Images already in finished shards are skipped (resume); ``names``, if
    given, lets them be skipped without reading them. ``progress(n)`` is called per image.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(out) or {"format": FORMAT, "teacher": teacher, "shards": []}
    if index.get("teacher") != teacher:
        raise CacheError(
            f"{out} holds embeddings of {index.get('teacher')}, not {teacher}; use another folder"
        )
    done = {name for shard in index["shards"] for name in shard["names"]}
    pending_names: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        number = len(index["shards"])
        path = out / f"shard_{number:05d}.npy"
        with atomic_write(path, "wb") as f:
            np.save(f, np.stack(pending), allow_pickle=False)
        index["shards"].append(
            {"file": path.name, "names": list(pending_names), "sha256": _sha256(path)}
        )
        index["shape"] = list(pending[0].shape)
        with atomic_write(out / INDEX, "w") as f:
            json.dump(index, f)
        pending.clear()
        pending_names.clear()

    if names is not None:
        dataset = samples
        todo = [i for i, name in enumerate(names) if name not in done]
        samples = (dataset[i] for i in todo)  # type: ignore[index]
    with torch.no_grad():
        for sample in samples:
            if sample.name in done:
                continue
            pending.append(teacher_embedding(encode, sample))
            pending_names.append(sample.name)
            if progress:
                progress(1)
            if len(pending) == shard_size:
                flush()
    if pending:
        flush()
    return index


class TeacherEmbeddings:
    """Read a finished cache: ``embeddings[name]`` -> 1 x C x h x w float32 tensor.

    Each shard's SHA-256 is checked the first time it is opened (``verify=False`` skips it);
    shards are memory-mapped, so only the rows asked for are read.
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = True) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise CacheError(
                f"no teacher cache in {self.folder}; make one with `tinysam distill cache-teacher`"
            )
        self.index = index
        self.verify = verify
        self.where = {
            name: (k, row)
            for k, shard in enumerate(index["shards"])
            for row, name in enumerate(shard["names"])
        }
        self._open: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(f"{name} is not in the teacher cache {self.folder}")
        k, row = self.where[name]
        return torch.from_numpy(np.array(self._shard(k)[row], dtype=np.float32))[None]

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._open:
            shard = self.index["shards"][k]
            path = self.folder / shard["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing; cache the teacher again")
            if self.verify and _sha256(path) != shard["sha256"]:
                raise CacheError(f"{path} is corrupt (checksum mismatch); delete it and re-cache")
            self._open[k] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._open[k]


# --------------------------------------------------------------------------- many workers
# With --ray, shard k holds the k-th ``shard_size`` images in name order, written whole by one
# worker next to ``shard_k.json`` (its names and SHA-256, the mark that it is done); the driver
# lists the finished shards in ``index.json`` at the end: the format ``TeacherEmbeddings`` reads.


def chunks(names: list[str], shard_size: int) -> list[list[str]]:
    """The images of each shard, in name order."""
    ordered = sorted(names)
    return [ordered[k : k + shard_size] for k in range(0, len(ordered), shard_size)]


@dataclass
class TeacherCacheJob:
    """The teacher's embeddings, one shard at a time (items: shard numbers as strings); the
    same code locally and on Ray workers (see ``tinysam.batch``). A bad image is left out of
    its shard and named in the result."""

    data: str
    out: str
    teacher: str
    checkpoint: str | None
    image_size: int
    shard_size: int
    names: list[str]
    device: str = "cpu"
    skippable = (CacheError,)

    def outputs(self, item: str) -> list[Path]:
        return [Path(self.out) / f"shard_{int(item):05d}.json"]

    def setup(self) -> None:
        from .data import SA1BDataset
        from .models import build_teacher

        self._dataset = SA1BDataset(self.data, self.image_size)
        self._position = {entry.name: i for i, entry in enumerate(self._dataset.entries)}
        teacher = build_teacher(self.teacher, self.image_size, self.checkpoint, progress=False)
        encoder = teacher.image_encoder.to(self.device)
        self._encode = lambda image: encoder(image.to(self.device))

    def run(self, item: str) -> dict:
        k = int(item)
        done, failed, rows = [], {}, []
        with torch.no_grad():
            for name in chunks(self.names, self.shard_size)[k]:
                try:
                    sample = self._dataset[self._position[name]]
                except (ValueError, KeyError, OSError) as err:
                    failed[name] = str(err).splitlines()[0]
                    continue
                rows.append(teacher_embedding(self._encode, sample))
                done.append(name)
        if not rows:
            raise CacheError(f"no image of shard {k} could be read: {failed}")
        out = Path(self.out)
        path = out / f"shard_{k:05d}.npy"
        with atomic_write(path, "wb") as f:
            np.save(f, np.stack(rows), allow_pickle=False)
        shard = {"file": path.name, "names": done, "sha256": _sha256(path), "failed": failed}
        write_json_output(self.outputs(item)[0], "teacher-shard", shard)  # marked: resumable
        return {"shard": k, "images": len(done), "failed": failed, "shape": list(rows[0].shape)}


def write_sharded_index(out: str | os.PathLike, teacher: str, shard_size: int, count: int) -> dict:
    """``index.json`` listing the finished shards (those with their ``.json``), in order."""
    out = Path(out)
    shards, shape = [], None
    for k in range(count):
        marker = out / f"shard_{k:05d}.json"
        if marker.is_file():
            shard = json.loads(marker.read_text())
            shards.append({key: shard[key] for key in ("file", "names", "sha256")})
            if shape is None:
                rows = np.load(out / shard["file"], mmap_mode="r", allow_pickle=False)
                shape = list(rows.shape[1:])
    index = {"format": FORMAT, "teacher": teacher, "shard_size": shard_size, "shards": shards}
    if shape is not None:
        index["shape"] = shape
    with atomic_write(out / INDEX, "w") as f:
        json.dump(index, f)
    return index
