"""The web demo's server: a single page and the JSON API under it (OpenAPI at ``/docs``).

An uploaded image is encoded once; its embedding stays in an LRU cache keyed by the image's
SHA-256, so each click only runs the decoder. One predictor serves every tab: requests take
turns on it (a lock), each restoring its own image's embedding first.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.

import base64
import hashlib
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..io import ImageError, ImageTooLarge, read_image
from ..masks import coco_rle
from .cache import EmbeddingCache, capture, restore

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_UPLOAD_BYTES = 20 << 20
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_CACHE_BYTES = 512 << 20


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
    ) -> None:
        self.predictor = predictor
        self.cache = EmbeddingCache(cache_bytes)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.everything_points = everything_points
        self._lock = threading.Lock()

    def add_image(self, data: bytes) -> dict[str, Any]:
        if len(data) > self.max_upload_bytes:
            raise ApiError(
                413,
                f"upload is {len(data)} bytes, more than the server's limit of "
                f"{self.max_upload_bytes}",
            )
        image_id = hashlib.sha256(data).hexdigest()[:32]
        cached = self.cache.get(image_id)
        if cached is None:
            image = decode_upload(data, self.max_pixels)
            with self._lock:
                self.predictor.set_image(image)
                cached = capture(self.predictor, image)
            self.cache.put(image_id, cached)
        h, w = cached.image.shape[:2]
        return {"image_id": image_id, "width": w, "height": h}

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
        cached = self._cached(image_id)
        if not points and box is None:
            raise ApiError(400, "give at least one point or a box")
        if len(points) != len(labels):
            raise ApiError(400, f"{len(points)} points but {len(labels)} labels")
        if any(len(p) != 2 for p in points):
            raise ApiError(400, "each point must be [x, y]")
        if box is not None and len(box) != 4:
            raise ApiError(400, "box must be [x0, y0, x1, y1]")
        coords = np.asarray(points, np.float64) if points else None
        with self._lock:
            restore(self.predictor, cached)
            try:
                masks, scores, _ = self.predictor.predict(
                    point_coords=coords,
                    point_labels=np.asarray(labels, np.float64) if points else None,
                    box=None if box is None else np.asarray(box, np.float64),
                    multimask_output=multimask,
                )
            except ValueError as err:  # the predictor's input checks: one line, the fix
                raise ApiError(400, str(err).splitlines()[0]) from None
        best = int(np.argmax(scores))
        h, w = masks.shape[-2:]
        return {
            "score": float(scores[best]),
            "width": int(w),
            "height": int(h),
            "area": int(masks[best].sum()),
            "mask_png": png_base64(masks[best].astype(np.uint8) * 255),
            "rle": coco_rle(masks[best]),
        }

    def everything(self, image_id: str) -> dict[str, Any]:
        from ..everything import SamHierarchicalMaskGenerator, SharedEmbedding
        from ..everything.masks import rle_to_mask
        from ..visualize import draw_masks

        cached = self._cached(image_id)
        with self._lock:
            restore(self.predictor, cached)
            generator = SamHierarchicalMaskGenerator(
                SharedEmbedding(self.predictor, current=cached.image),
                points_per_side=self.everything_points,
                output_mode="uncompressed_rle",
            )
            records = generator.generate(cached.image)
        masks = [rle_to_mask(r["segmentation"]) for r in records]
        annotations = []
        for record, mask in zip(records, masks):
            annotations.append(
                {
                    "segmentation": coco_rle(mask),
                    "area": int(record["area"]),
                    "bbox": [float(v) for v in record["bbox"]],
                    "predicted_iou": float(record["predicted_iou"]),
                    "stability_score": float(record["stability_score"]),
                    "point_coords": record["point_coords"],
                }
            )
        return {
            "count": len(annotations),
            "overlay_png": png_base64(draw_masks(cached.image, masks)),
            "annotations": annotations,
        }


def create_app(service: DemoService):
    """The FastAPI application around ``service``."""
    app = FastAPI(
        title="tinysam",
        description="Promptable segmentation on a CPU: upload an image once, then click.",
        version="1",
    )

    class PredictRequest(BaseModel):
        points: list[list[float]] = Field(default_factory=list, description="[[x, y], ...]")
        labels: list[int] = Field(default_factory=list, description="1 positive, 0 negative")
        box: list[float] | None = Field(None, description="[x0, y0, x1, y1]")
        multimask: bool = Field(True, description="best of three masks (else single output)")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"malformed request: {where}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):  # a bug: answer, log, keep serving
        logging.getLogger("tinysam.serve").exception("unexpected error")
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict:
        return {"ok": True, "cached_images": len(service.cache)}

    @app.post("/api/images")
    async def upload(request: Request, file: UploadFile) -> dict:
        """Upload an image (multipart field ``file``); returns its id for the other calls."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > service.max_upload_bytes + 4096:
            raise ApiError(413, f"upload larger than the limit of {service.max_upload_bytes}")
        data = await file.read(service.max_upload_bytes + 1)
        return await run_in_threadpool(service.add_image, data)

    @app.post("/api/images/{image_id}/predict")
    def predict(image_id: str, body: PredictRequest) -> dict:
        """The best mask for the prompts, as a PNG (base64) and a COCO RLE."""
        return service.predict(image_id, body.points, body.labels, body.box, body.multimask)

    @app.post("/api/images/{image_id}/everything")
    def everything(image_id: str) -> dict:
        """Every mask (hierarchical everything mode): COCO annotations and an overlay PNG."""
        return service.everything(image_id)

    return app
