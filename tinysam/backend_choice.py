"""``--backend auto``: the backend that encodes images fastest on this machine, measured once
and remembered.

The image encoder dominates a prompt session's cost, and its input is always a padded
``image_size`` square, so one timing on noise decides for every image. The answer is kept in
``cache_dir()/backend_choice.json`` under a key naming the CPU, the thread count, the library
versions and the model (its type, float or int8, and the files when a checkpoint is compared
with an export), so another machine, a library upgrade or another model measures again. Delete
the file, or pass ``remeasure=True``, to measure again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from .predictor_base import PredictorBase

CHOICE_FILE = "backend_choice.json"
CHOICE_FORMAT = "tinysam-backend-choice"
CHOICE_VERSION = 1
MEASURE_REPEATS = 3
# A checkpoint and an export compared under one key must hold the same model: their embeddings
# of the measuring image may differ by int8 rounding (a few percent), not by being other weights.
SAME_MODEL_TOLERANCE = 0.25
_LIBRARIES = ("torch", "onnxruntime", "openvino")


class BackendChoiceError(ValueError):
    """The backends to choose between disagree about the model (one line saying which)."""


@dataclass
class BackendChoice:
    backend: str
    key: str
    encoder_ms: dict[str, float] = field(default_factory=dict)  # empty: read from the cache
    measured: bool = False


def choice_file() -> Path:
    from .io import cache_dir  # one cache folder for weights and choices

    return cache_dir() / CHOICE_FILE


def machine_key(threads: int) -> str:
    """The CPU, the threads and the versions of every backend library installed."""
    from .perf import cpu_kind

    versions = []
    for name in _LIBRARIES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu_kind()} | {threads} threads | {', '.join(versions)}"


def choice_key(candidates, model_key: str, threads: int) -> str:
    """The cache key: this machine, the model and the backends compared."""
    return f"{machine_key(threads)} | {model_key} | {' / '.join(sorted(candidates))}"


def choose_backend(
    factories: dict[str, Callable[[], PredictorBase]],
    model_key: str,
    threads: int,
    *,
    remeasure: bool = False,
    build: bool = True,
    log=None,
) -> tuple[PredictorBase | None, BackendChoice]:
    """The predictor of the fastest backend among ``factories`` (name -> a function making
    it), and the choice. With one candidate nothing is measured; otherwise the cached answer
    for this machine and ``model_key`` is used, or every candidate is built, timed on the
    same noise image (interleaved medians) and the winner kept and cached. ``build=False``
    only decides (the predictor returned is then None unless it was built to measure)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    key = choice_key(factories, model_key, threads)
    if len(factories) == 1:
        (name,) = factories
        return factories[name]() if build else None, BackendChoice(name, key)
    cached = None if remeasure else _read_choices().get(key)
    if cached in factories:
        return factories[cached]() if build else None, BackendChoice(cached, key)
    log(
        f"choosing a backend for this machine (once; kept in {choice_file()}): "
        f"timing the image encoder on {', '.join(factories)}"
    )
    predictors = {name: make() for name, make in factories.items()}
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    for predictor in predictors.values():  # also the warm-up: first runs allocate
        predictor.set_image(image)
    _check_same_model(predictors)
    from .perf import interleaved_medians

    seconds = interleaved_medians(
        {name: (lambda p=p: p.set_image(image)) for name, p in predictors.items()},
        MEASURE_REPEATS,
    )
    # Decide on the times as kept (0.1 ms), so the record never names the slower of a tie.
    encoder_ms = {n: round(s * 1000, 1) for n, s in seconds.items()}
    best = min(encoder_ms, key=encoder_ms.get)
    choice = BackendChoice(best, key, encoder_ms, True)
    log(
        "backend: "
        + ", ".join(f"{n} {ms:.0f} ms" for n, ms in choice.encoder_ms.items())
        + f" -> {best}"
    )
    _write_choice(key, choice, log)
    winner = predictors.pop(best)
    winner.reset_image()
    return winner, choice


def _check_same_model(predictors: dict[str, PredictorBase]) -> None:
    """Every candidate encoded the same image: their embeddings must be one model's."""
    embeddings = {n: _as_numpy(p.get_image_embedding()) for n, p in predictors.items()}
    (first, reference), *others = embeddings.items()
    scale = float(np.linalg.norm(reference)) or 1.0
    for name, embedding in others:
        if embedding.shape != reference.shape:
            difference = float("inf")
        else:
            difference = float(np.linalg.norm(embedding - reference)) / scale
        if not difference <= SAME_MODEL_TOLERANCE:
            raise BackendChoiceError(
                f"the {first} and {name} backends hold different models (their image "
                f"embeddings differ by {difference:.0%}); give --checkpoint and --onnx-dir of "
                "one model (the export made from that checkpoint), or pick --backend"
            )


def _as_numpy(array) -> np.ndarray:
    if type(array).__module__.split(".")[0] == "torch":
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def _stored() -> dict:
    """The cache file's contents; an unreadable or foreign file counts as empty (and is
    rewritten with the next choice)."""
    empty = {"format": CHOICE_FORMAT, "version": CHOICE_VERSION, "choices": {}}
    try:
        data = json.loads(choice_file().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return empty
    if not isinstance(data, dict) or data.get("format") != CHOICE_FORMAT:
        return empty
    if data.get("version") != CHOICE_VERSION or not isinstance(data.get("choices"), dict):
        return empty
    return data


def _read_choices() -> dict[str, str]:
    return {
        key: entry["backend"]
        for key, entry in _stored()["choices"].items()
        if isinstance(entry, dict) and isinstance(entry.get("backend"), str)
    }


def _write_choice(key: str, choice: BackendChoice, log) -> None:
    """Add one choice to the file, atomically; a cache that cannot be written only warns."""
    from .io import atomic_write

    path = choice_file()
    data = _stored()
    data["choices"][key] = {
        "backend": choice.backend,
        "encoder_ms": choice.encoder_ms,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with atomic_write(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as err:
        log(f"warning: cannot keep the backend choice in {path} ({err.strerror or err})")


def export_model_key(manifest: dict) -> str:
    """What an export's encoder is (from its manifest), for the cache key: its model type and
    float or int8."""
    kind = "int8" if "quantization" in manifest else "float"
    return f"export {manifest.get('model_type', '?')} {kind}"


def file_identity(path: str | os.PathLike) -> str:
    """A file (or folder) as it is now: its resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path} {stat.st_size} {stat.st_mtime_ns}"


__all__ = [
    "BackendChoice",
    "BackendChoiceError",
    "choice_file",
    "choice_key",
    "choose_backend",
    "export_model_key",
    "machine_key",
]
