"""HTTP plumbing shared by the web demo and the Label Studio backend: the body limit (413
before anything is read past it), one-line JSON errors (never a traceback), and running work
that stops when the client goes away (499)."""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations.

import asyncio
import json
import logging
import threading
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .service import ApiError, Cancelled

# Multipart framing around the file (boundaries, headers): allowed on top of the file limit.
MULTIPART_OVERHEAD = 16 << 10


class BodyLimit:
    """ASGI middleware: a request body over the limit is a 413 before the app sees anything
    (on the declared Content-Length, or as soon as a chunked body crosses the limit), so no more
    than the limit is ever read, stored or parsed. The body is read here first, up to the limit,
    and handed to the app whole: the app (and any middleware inside it) never has a read fail
    under it, which answered 500 with an ``ExceptionGroup`` behind ``BaseHTTPMiddleware``."""

    def __init__(self, app, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _json_response(send, 400, "Content-Length is not a number")
                return
            if int(declared) > limit:
                await _json_response(send, 413, _too_large(int(declared), limit))
                return
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > limit:
                await _json_response(send, 413, _too_large(received, limit))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        handed = False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: a disconnect, for is_disconnected

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int) -> str:
    return f"request body of {size}+ bytes is over the server's limit of {limit}"


async def _json_response(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI, logger: str = "tinysam.serve") -> None:
    """Every error as ``{"error": one line}`` with its status; never a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException):  # e.g. a broken multipart body
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"malformed request: {where}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception):  # a bug: answer, log, keep serving
        logging.getLogger(logger).exception("unexpected error")
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, status_code=500)


async def until_disconnected(request: Request, work: Callable, *args):
    """``work(*args, cancel)`` in a worker thread; ``cancel`` is set as soon as the client
    disconnects, and work that stops for it (``Cancelled``) answers 499."""
    cancel = threading.Event()
    running = asyncio.ensure_future(run_in_threadpool(work, *args, cancel))
    while not running.done():
        await asyncio.wait({running}, timeout=0.2)
        if not running.done() and await request.is_disconnected():
            cancel.set()
    try:
        return running.result()
    except Cancelled:
        return JSONResponse({"error": "cancelled: the client went away"}, status_code=499)
