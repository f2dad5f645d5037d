"""The HTTP face of ``LabelStudioBackend``: the routes ``label-studio-ml`` serves
(``/health``, ``/``, ``/setup``, ``/predict``, ``/webhook``, ``/metrics``), with the same
request and response bodies, so Label Studio connects to it as to any ML backend.

Differences from ``label-studio-ml``'s Flask server, all on the side of the caller: errors are
``{"error": one line}`` with a 4xx status instead of a 500 with a traceback, request bodies
are size-limited before they are read, and optional basic auth compares in constant time.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.

import base64
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ...serve.http import BodyLimit, install_error_handlers, until_disconnected
from ...serve.service import ApiError
from .backend import MODEL_VERSION, LabelStudioBackend

MODEL_CLASS = "TinySAMBackend"
DEFAULT_MAX_REQUEST_BYTES = 32 << 20  # tasks arrive with their annotations' brush RLEs
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def json_body(request: Request):
    """The request's JSON, or a 400 naming the problem (NaN and Infinity are not JSON)."""
    raw = await request.body()
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"the body is not valid JSON ({str(err)[:120]})") from None


def create_label_studio_app(
    backend: LabelStudioBackend,
    basic_auth: tuple[str, str] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    app = FastAPI(
        title="tinysam for Label Studio",
        description="A Label Studio ML backend: interactive brush masks from smart keypoints "
        "and rectangles, and optional whole-image pre-annotation.",
        version="1",
    )
    install_error_handlers(app, "tinysam.label_studio")

    @app.get("/")
    @app.get("/health")
    def health() -> dict:
        """Label Studio's connection check."""
        return {
            "status": "UP",
            "model_class": MODEL_CLASS,
            "model_version": MODEL_VERSION,
            **backend.service.health(),
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict:
        """Called when the backend is connected to a project: its labeling config is checked,
        Label Studio's URL and token are kept to read task images."""
        return backend.setup(await json_body(request))

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        """Predictions for tasks: a brush mask for an interactive context, else pre-annotation
        (when the backend runs with --preannotate) or nothing."""
        return await until_disconnected(request, backend.predict, await json_body(request))

    @app.post("/webhook")
    async def webhook(request: Request):
        """Training events: this backend does not train, and says so."""
        payload = await json_body(request)
        event = payload.get("action") if isinstance(payload, dict) else None
        if event not in TRAIN_EVENTS:
            return {"status": "Unknown event"}
        return {"status": "ok", "result": "tinysam does not train from Label Studio; ignored"}

    @app.get("/metrics")
    def metrics() -> dict:
        return {}

    if basic_auth is not None:
        app.add_middleware(BasicAuth, expected=basic_auth)
    app.add_middleware(BodyLimit, limit_for=lambda path: max_request_bytes)
    return app


class BasicAuth:
    """ASGI middleware: a 401 unless the request carries the expected basic-auth user and
    password. Plain ASGI, not ``BaseHTTPMiddleware``, which hides a client's disconnect from
    the app (pre-annotation must stop when Label Studio hangs up)."""

    def __init__(self, app, expected: tuple[str, str]) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _authorized(Request(scope), self.expected):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"error": "unauthorized: give the backend's basic-auth user and password"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="Login required"'},
        )
        await response(scope, receive, send)


def _authorized(request: Request, expected: tuple[str, str]) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user.encode(), expected[0].encode()) & hmac.compare_digest(
        password.encode(), expected[1].encode()
    )
