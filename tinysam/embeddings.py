"""Image embeddings computed ahead of time and loaded back without encoding again.

One file per image, ``NAME.npz`` (written atomically, so a killed run resumes with what is
missing), holding the encoder's output (1x256x64x64 float32) and what a predictor needs with
it: the original and resized sizes, and the SHA-256 of the image file (the web demo finds an
upload's embedding by it). ``index.json`` lists them. Any predictor takes one back with
``predictor.restore_image_state(load_embedding(path))`` (numpy features are converted to the
backend's array). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import DONE, ImageError, atomic_write, output_state, read_image
from .predictor_base import ImageState

INDEX = "index.json"
FORMAT = "tinysam-embeddings"
FORMAT_VERSION = 1


def file_sha256(data: bytes) -> str:
    """The id the web demo gives an upload (the first 32 hex digits of its SHA-256)."""
    return hashlib.sha256(data).hexdigest()[:32]


def save_embedding(path: str | os.PathLike, state: ImageState, sha256: str, image: str) -> None:
    features = state.features
    if not isinstance(features, np.ndarray):  # a torch tensor
        features = features.detach().cpu().numpy()
    with atomic_write(path, "wb") as f:
        np.savez(
            f,
            # First: its member name is the mark that makes the file ours (io.output_state).
            tinysam_embedding=np.asarray(FORMAT_VERSION),
            features=np.ascontiguousarray(features, dtype=np.float32),
            original_size=np.asarray(state.original_size, np.int64),
            input_size=np.asarray(state.input_size, np.int64),
            sha256=np.asarray(sha256),
            image=np.asarray(image),
        )


def load_embedding(path: str | os.PathLike) -> ImageState:
    """An ``ImageState`` with numpy features; ValueError naming the file if it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features = np.asarray(data["features"], np.float32)
            original = tuple(int(v) for v in data["original_size"])
            resized = tuple(int(v) for v in data["input_size"])
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise ValueError(
            f"{path} is not a tinysam embedding file ({err}); compute it again"
        ) from None
    if features.ndim != 4 or features.shape[0] != 1 or len(original) != 2 or len(resized) != 2:
        raise ValueError(f"{path}: embedding of shape {features.shape} is not 1xCxHxW")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{path}: embedding contains NaN or infinite values")
    return ImageState(features, original, resized)


def write_index(out_dir: str | os.PathLike, files: list[str | os.PathLike]) -> Path:
    """``index.json``: for each embedding file there, its image's name, SHA-256 and size
    (read back from the files, so images done by earlier runs are listed too)."""
    entries = {}
    for file in files:
        file = Path(file)
        if output_state(file) != DONE:  # not made (a bad image), or not whole
            continue
        with np.load(file, allow_pickle=False) as data:
            entries[file.name] = {
                "image": str(data["image"]),
                "sha256": str(data["sha256"]),
                "original_size": [int(v) for v in data["original_size"]],
            }
    path = Path(out_dir) / INDEX
    with atomic_write(path, "w") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "images": entries}, f)
    return path


def read_index(out_dir: str | os.PathLike) -> dict[str, Path]:
    """``{image SHA-256 (32 hex digits): embedding file}`` of a folder written by
    ``tinysam embed``: what the web demo uses to skip encoding known uploads."""
    out_dir = Path(out_dir)
    path = out_dir / INDEX
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable ({err}); run tinysam embed again") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tinysam embeddings index")
    images = document.get("images")
    if not isinstance(images, dict):
        raise ValueError(f"{path}: images must be an object")
    found = {}
    for name, entry in images.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ValueError(f"{path}: images.{name} needs a sha256")
        if "/" in name or name in (".", ".."):
            raise ValueError(f"{path}: images.{name} must be a file name in the same folder")
        found[entry["sha256"]] = out_dir / name
    return found


@dataclass
class EmbeddingJob:
    """``tinysam embed`` for one image at a time (local or Ray, see ``tinysam.batch``):
    read the image, encode it, save ``NAME.npz``."""

    make_predictor: Callable[[], Any]
    plan: dict[str, str]  # image path -> its .npz path
    max_pixels: int | None = None
    skippable = (ImageError, FileNotFoundError)

    def outputs(self, item: str) -> list[Path]:
        return [Path(self.plan[item])]

    def setup(self) -> None:
        self._predictor = self.make_predictor()

    def run(self, item: str) -> dict[str, Any]:
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        data = path.read_bytes()
        image = read_image(data, name=str(path), max_pixels=self.max_pixels)
        self._predictor.set_image(image)
        state = self._predictor.image_state()
        sha256 = file_sha256(data)
        out = self.plan[item]
        save_embedding(out, state, sha256, path.name)
        return {
            "file": Path(out).name,
            "image": path.name,
            "sha256": sha256,
            "original_size": list(state.original_size),
        }
