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
import zipfile
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


# What an embedding file may hold, checked before anything is decompressed: a file is a zip, so
# 1 MB of zeros can claim a gigabyte. The features are float32 (the encoder's own dtype, no
# conversion), at most MAX_FEATURE_BYTES (or exactly the model's shape when the caller knows
# it); every other member is a few numbers or a short string.
MAX_FEATURE_BYTES = 64 << 20
MAX_SMALL_MEMBER_BYTES = 4096
# The encoder's outputs are LayerNorm'd and small; a value past this is not an embedding (3e38
# passes isfinite, then overflows the decoder into NaN).
MAX_FEATURE_MAGNITUDE = 1e4


def _check_members(archive: zipfile.ZipFile, expected_shape: tuple[int, ...] | None) -> None:
    """Sizes, dtype and shape from the zip directory and the .npy header: nothing inflated."""
    members = {info.filename: info for info in archive.infolist()}
    if "features.npy" not in members:
        raise ValueError("no features in it")
    for name, info in members.items():
        limit = MAX_FEATURE_BYTES + MAX_SMALL_MEMBER_BYTES
        if name != "features.npy":
            limit = MAX_SMALL_MEMBER_BYTES
        if info.file_size > limit:
            raise ValueError(f"{name} would inflate to {info.file_size} bytes (limit {limit})")
    with archive.open("features.npy") as f:
        version = np.lib.format.read_magic(f)
        readers = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in readers:
            raise ValueError(f"features in .npy format {version}, not 1.0 or 2.0")
        shape, _, dtype = readers[version](f)
    if dtype != np.dtype("<f4"):
        raise ValueError(f"features are {dtype}, not float32")
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"features of shape {list(shape)} are not 1xCxHxW")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ValueError(
            f"features of shape {list(shape)}; this model's are {list(expected_shape)}"
        )


def load_embedding(
    path: str | os.PathLike, expected_shape: tuple[int, ...] | None = None
) -> ImageState:
    """An ``ImageState`` with numpy features; ValueError naming the file and the problem if it
    is damaged or not what it claims (sizes checked before decompressing, float32 features of
    ``expected_shape`` when given, finite and in range, positive sizes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_members(archive, expected_shape)
        with np.load(path, allow_pickle=False) as data:
            features = data["features"]
            original = tuple(int(v) for v in np.asarray(data["original_size"]).reshape(-1))
            resized = tuple(int(v) for v in np.asarray(data["input_size"]).reshape(-1))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a usable tinysam embedding file ({err}); compute it again"
        ) from None
    if len(original) != 2 or len(resized) != 2 or min(original + resized) < 1:
        raise ValueError(f"{path}: image sizes {original} / {resized} are not (H, W)")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{path}: embedding contains NaN or infinite values")
    if features.size and float(np.abs(features).max()) > MAX_FEATURE_MAGNITUDE:
        raise ValueError(f"{path}: embedding values beyond +-{MAX_FEATURE_MAGNITUDE:g}")
    return ImageState(features, original, resized)


def embedding_sha256(path: str | os.PathLike) -> str:
    """The image SHA-256 (32 hex digits) stored inside an embedding file (check the file with
    ``load_embedding`` first)."""
    with np.load(path, allow_pickle=False) as data:
        return str(data["sha256"])


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
