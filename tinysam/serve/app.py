"""The web demo's server: a single page and the JSON API under it (OpenAPI at ``/docs``),
around a ``DemoService`` (``serve.service``, where the caching, limits and memory budget are
described)."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.

from pathlib import Path

from fastapi import FastAPI, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .http import MULTIPART_OVERHEAD, BodyLimit, install_error_handlers, until_disconnected
from .service import DemoService

STATIC = Path(__file__).with_name("static")


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

    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict:
        """Whether heavy work is running, the cached image count, abandoned everything runs."""
        return service.health()

    @app.post("/api/images")
    async def upload(file: UploadFile) -> dict:
        """Upload an image (multipart field ``file``); returns its id for the other calls."""
        data = await file.read(service.max_upload_bytes + 1)
        return await run_in_threadpool(service.add_image, data)

    @app.post("/api/images/{image_id}/predict")
    def predict(image_id: str, body: PredictRequest) -> dict:
        """The best mask for the prompts, as a PNG (base64) and a COCO RLE."""
        return service.predict(image_id, body.points, body.labels, body.box, body.multimask)

    @app.post("/api/images/{image_id}/everything")
    async def everything(image_id: str, request: Request) -> dict:
        """Every mask (hierarchical everything mode): COCO annotations and an overlay PNG.
        Stops if the client disconnects before the answer is ready."""
        return await until_disconnected(request, service.everything, image_id)

    def body_limit(path: str) -> int:
        if path == "/api/images":
            return service.max_upload_bytes + MULTIPART_OVERHEAD
        return service.max_json_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    return app
