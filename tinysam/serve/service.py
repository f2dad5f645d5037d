"""The web demo's service, without the web: uploads encoded once into an LRU cache of
embeddings, clicks answered on each request's own view of the one predictor, the everything
mode, and the limits of each (``ApiError`` carries an HTTP status and one line). The web demo
(``serve.app``) and the Label Studio backend (``integrations``) both serve it.

An uploaded image is encoded once; its embedding stays in an LRU cache keyed by the image's
SHA-256, so each click only runs the decoder. Every request works on its own view of the one
predictor (a shallow copy holding its image's state: the weights are shared), so clicks never
wait for each other or for heavy work. Heavy work (encoding an upload, the everything mode) runs
one at a time; a request waits at most ``busy_timeout`` seconds for its turn (then 503), and an
everything run stops when its client disconnects or the server shuts down.

Limits, all checked before any work: upload bytes, JSON body bytes, image pixels, points per
click. Memory: work made at the image's full size (a click's answer, the everything mode's
masks and overlay) reserves its estimated bytes in one ``MemoryBudget`` first (``work_bytes``),
so concurrent clicks on a huge image take turns while clicks on ordinary photos run side by
side; uploads decode and encode one at a time (the heavy turn). The peak is about the model, the
cache, one upload being encoded, and the work budget (or one piece larger than it, which runs
alone).
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

from ..checks import check_inside
from ..embeddings import embedding_sha256, file_sha256, load_embedding
from ..io import ImageError, ImageTooLarge, read_image
from ..masks import RleMasks, coco_rle
from ..memory import BudgetTimeout, MemoryBudget
from ..predictor_base import ModelOutputError
from .cache import EmbeddingCache, capture, restore

DEFAULT_MAX_UPLOAD_BYTES = 20 << 20
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_CACHE_BYTES = 512 << 20
DEFAULT_MAX_JSON_BYTES = 64 << 10
DEFAULT_MAX_POINTS = 100
DEFAULT_BUSY_TIMEOUT_S = 30.0
DEFAULT_WORK_BYTES = 512 << 20
# Bytes a pixel of the image that work at full size holds at its peak (measured with
# tracemalloc-free RSS on 6300x6300 uploads): a click's one float mask being made (4), its bool
# answer (1), the PNG's uint8 copies (2) and the RLE's Fortran copy (1); the everything mode's
# float overlay (12), the image (3) and one decoded mask at a time (1).
CLICK_BYTES_PER_PIXEL = 8
EVERYTHING_BYTES_PER_PIXEL = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded file as HxWx3 uint8 RGB, or an ApiError (415 not an image, 413 too big)."""
    if not data:
        raise ApiError(400, "the upload is empty: send an image file in the 'file' field")
    try:
        return read_image(data, name="the upload", max_pixels=max_pixels)
    except ImageTooLarge as err:
        raise ApiError(413, str(err)) from None
    except ImageError as err:
        raise ApiError(415, f"{err} (send a JPEG, PNG, WebP, ...)") from None


class Cancelled(Exception):
    """The client went away, or the server is stopping: the work is abandoned."""


class _StopsWhenAsked:
    """A predictor whose ``predict_torch`` raises ``Cancelled`` once ``stop()`` says so: the
    everything mode decodes in batches of prompts, so it stops within one batch."""

    def __init__(self, predictor, stop: Callable[[], bool]) -> None:
        self._predictor = predictor
        self._stop = stop

    def predict_torch(self, *args, **kwargs):
        if self._stop():
            raise Cancelled
        return self._predictor.predict_torch(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)


def png_base64(pixels: np.ndarray) -> str:
    """An HxW (gray) or HxWx3 uint8 array as a base64 PNG, ready for JSON and data: URLs."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DemoService:
    """What the endpoints do, without HTTP (tests and other front ends call it directly)."""

    def __init__(
        self,
        predictor,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        everything_points: int = 32,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        max_points: int = DEFAULT_MAX_POINTS,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
        embeddings: dict | None = None,
        everything_options: dict | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
    ) -> None:
        self.predictor = predictor
        # Further SamHierarchicalMaskGenerator settings (thresholds) for the everything mode.
        self.everything_options = everything_options or {}
        self.cache = EmbeddingCache(cache_bytes)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.everything_points = everything_points
        self.max_json_bytes = max_json_bytes
        self.max_points = max_points
        self.busy_timeout = busy_timeout
        # Upload id (SHA-256 prefix) -> an embedding file of `tinysam embed`: no encoding.
        self.embeddings = embeddings or {}
        self.precomputed = 0  # uploads answered from self.embeddings
        self.embeddings_rejected = 0  # embedding files refused (then encoded), and the last why
        self.embedding_problem: str | None = None
        self.cancelled = 0  # everything runs abandoned (client gone, or shutting down)
        self._heavy = threading.Semaphore(1)
        # Work at the image's full size reserves its bytes here first (see the module doc).
        self.work = MemoryBudget(work_bytes)
        self._busy = False
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Shutting down: running everything requests stop at their next batch."""
        self._stopping.set()

    @contextmanager
    def _heavy_turn(self):
        """One heavy job at a time; waiting longer than ``busy_timeout`` is a 503."""
        if not self._heavy.acquire(timeout=self.busy_timeout):
            raise ApiError(
                503,
                f"the server is busy (encoding or segmenting another image for more than "
                f"{self.busy_timeout:g} s); try again in a moment",
            )
        self._busy = True
        try:
            yield
        finally:
            self._busy = False
            self._heavy.release()

    @contextmanager
    def full_size_work(self, image_id: str, bytes_per_pixel: int = CLICK_BYTES_PER_PIXEL):
        """Hold the share of the memory budget that work at ``image_id``'s full size needs;
        waiting longer than ``busy_timeout`` for it is a 503."""
        h, w = self._cached(image_id).image.shape[:2]
        try:
            with self.work.reserve(bytes_per_pixel * h * w, timeout=self.busy_timeout):
                yield
        except BudgetTimeout:
            raise ApiError(
                503,
                f"the server is busy (other requests on large images hold its memory budget "
                f"for more than {self.busy_timeout:g} s); try again in a moment",
            ) from None

    def _view(self, cached=None):
        """This request's own predictor: shares the weights, holds its own image state."""
        view = copy.copy(self.predictor)
        if cached is not None:
            restore(view, cached)
        return view

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "cached_images": len(self.cache),
            "busy": self._busy,
            "cancelled": self.cancelled,
            "precomputed": self.precomputed,
            "embeddings_rejected": self.embeddings_rejected,
            "embedding_problem": self.embedding_problem,
        }

    def add_image(self, data: bytes) -> dict[str, Any]:
        if len(data) > self.max_upload_bytes:
            raise ApiError(
                413,
                f"upload is {len(data)} bytes, more than the server's limit of "
                f"{self.max_upload_bytes}",
            )
        image_id = file_sha256(data)
        cached = self.cache.get(image_id)
        if cached is None:
            # Decoding is heavy too (3+ bytes a pixel): concurrent uploads take turns.
            with self._heavy_turn():
                image = decode_upload(data, self.max_pixels)
                cached = self._precomputed(image_id, image)
                if cached is None:
                    view = self._view()
                    view.set_image(image)
                    cached = capture(view, image)
            self.cache.put(image_id, cached)
        h, w = cached.image.shape[:2]
        return {"image_id": image_id, "width": w, "height": h}

    def _precomputed(self, image_id: str, image: np.ndarray):
        """The upload's embedding from ``tinysam embed``, if there is one and it is this
        image's, for this model: the file is checked before it is decompressed (sizes, dtype,
        the model's shape), then its values (finite, in range), the SHA-256 stored inside it
        against the upload's, and its sizes against the image's. Anything else is encoded, and
        the reason goes to the log and ``/api/health``."""
        path = self.embeddings.get(image_id)
        if path is None:
            return None
        try:
            state = load_embedding(path, self.predictor.embedding_shape)
            stored = embedding_sha256(path)
        except ValueError as err:
            return self._reject_embedding(path, str(err).splitlines()[0])
        if stored != image_id:
            return self._reject_embedding(
                path, f"{path} holds the embedding of another image (SHA-256 {stored[:12]}...)"
            )
        h, w = image.shape[:2]
        resized = self.predictor.transform.get_preprocess_shape(
            h, w, self.predictor.transform.target_length
        )
        if tuple(state.original_size) != (h, w) or tuple(state.input_size) != resized:
            return self._reject_embedding(
                path,
                f"{path} is for a {state.original_size} image resized to {state.input_size}, "
                f"not this {(h, w)} one ({resized})",
            )
        view = self._view()
        view.restore_image_state(state)
        self.precomputed += 1
        return capture(view, image)

    def _reject_embedding(self, path, reason: str) -> None:
        self.embeddings_rejected += 1
        self.embedding_problem = reason
        logging.getLogger("tinysam.serve").warning(
            "unusable embedding %s: %s; encoding", path, reason
        )

    def _cached(self, image_id: str):
        cached = self.cache.get(image_id)
        if cached is None:
            raise ApiError(
                404,
                f"image {image_id} is not on the server (never uploaded, or evicted from the "
                "cache): upload it again",
            )
        return cached

    def predict(
        self,
        image_id: str,
        points: list[list[float]],
        labels: list[int],
        box: list[float] | None,
        multimask: bool,
    ) -> dict[str, Any]:
        with self.full_size_work(image_id):
            mask, score = self.segment(image_id, points, labels, box, multimask)
            h, w = mask.shape
            return {
                "score": score,
                "width": int(w),
                "height": int(h),
                "area": int(mask.sum()),
                "mask_png": png_base64(mask.view(np.uint8) * 255),
                "rle": coco_rle(mask),
            }

    def segment(
        self,
        image_id: str,
        points: list[list[float]],
        labels: list[int],
        box: list[float] | None,
        multimask: bool,
    ) -> tuple[np.ndarray, float]:
        """The best mask (HxW bool) for the prompts on a cached image, and its score; every
        prompt problem is an ``ApiError`` (4xx) naming it. Call it inside ``full_size_work``:
        the mask is made at the image's full size."""
        if len(points) > self.max_points:
            raise ApiError(
                422,
                f"{len(points)} points in one request; the server takes at most {self.max_points}",
            )
        cached = self._cached(image_id)
        if not points and box is None:
            raise ApiError(400, "give at least one point or a box")
        if len(points) != len(labels):
            raise ApiError(400, f"{len(points)} points but {len(labels)} labels")
        if any(len(p) != 2 for p in points):
            raise ApiError(400, "each point must be [x, y]")
        if any(label not in (0, 1) for label in labels):
            raise ApiError(400, "labels must be 1 (object) or 0 (background)")
        if box is not None and len(box) != 4:
            raise ApiError(400, "box must be [x0, y0, x1, y1]")
        coords = np.asarray(points, np.float64) if points else None
        view = self._view(cached)
        try:
            if points:
                h, w = cached.image.shape[:2]
                check_inside(points, w, h)
            return view.predict_best(
                point_coords=coords,
                point_labels=np.asarray(labels, np.float64) if points else None,
                box=None if box is None else np.asarray(box, np.float64),
                multimask_output=multimask,
            )
        except ModelOutputError as err:
            raise ApiError(500, str(err)) from None
        except ValueError as err:  # the predictor's input checks: one line, the fix
            raise ApiError(400, str(err).splitlines()[0]) from None

    def everything(self, image_id: str, cancel: threading.Event | None = None) -> dict[str, Any]:
        """Every mask; stops (``Cancelled``) when ``cancel`` is set or the server stops."""
        from ..visualize import draw_masks

        with self.full_size_work(image_id, EVERYTHING_BYTES_PER_PIXEL):
            records, masks = self.everything_masks(image_id, cancel)
            annotations = [
                {
                    "segmentation": coco_rle(mask),
                    "area": int(record["area"]),
                    "bbox": [float(v) for v in record["bbox"]],
                    "predicted_iou": float(record["predicted_iou"]),
                    "stability_score": float(record["stability_score"]),
                    "point_coords": record["point_coords"],
                }
                for record, mask in zip(records, masks)
            ]
            overlay = png_base64(draw_masks(self._cached(image_id).image, masks))
        return {"count": len(annotations), "overlay_png": overlay, "annotations": annotations}

    def everything_masks(
        self, image_id: str, cancel: threading.Event | None = None
    ) -> tuple[list[dict], RleMasks]:
        """The everything mode's records and their HxW bool masks (decoded one at a time as
        they are read), one heavy turn. Call it inside ``full_size_work(image_id,
        EVERYTHING_BYTES_PER_PIXEL)``."""
        from ..everything import SamHierarchicalMaskGenerator, SharedEmbedding

        cached = self._cached(image_id)

        def stop() -> bool:
            return self._stopping.is_set() or (cancel is not None and cancel.is_set())

        with self._heavy_turn():
            view = _StopsWhenAsked(self._view(cached), stop)
            generator = SamHierarchicalMaskGenerator(
                SharedEmbedding(view, current=cached.image),
                points_per_side=self.everything_points,
                output_mode="uncompressed_rle",
                **self.everything_options,
            )
            try:
                records = generator.generate(cached.image)
            except Cancelled:
                self.cancelled += 1
                raise
        return records, RleMasks([r["segmentation"] for r in records])
