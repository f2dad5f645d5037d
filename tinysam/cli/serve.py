"""``tinysam serve``: start the web demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_args, predictor_from_args


def register(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="the interactive web demo (and its JSON API) on http://127.0.0.1:8000",
        description=(
            "Serve a page where you open an image and click: left click adds a point, right "
            "click a negative one, dragging draws a box; 'Everything' segments everything. "
            "The JSON API under it is documented at /docs. Listens on loopback unless --host "
            "says otherwise."
        ),
        epilog="example: tinysam serve --checkpoint tinysam_42.3.pth --port 8000",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000)")
    add_cache_and_pixel_args(serve)
    serve.add_argument("--max-upload-mb", type=float, default=20, help="upload size limit (20)")
    serve.add_argument(
        "--max-points", type=int, default=100, help="points in one click request (100)"
    )
    serve.add_argument(
        "--max-json-kb", type=int, default=64, help="JSON request body size limit (64 KiB)"
    )
    serve.add_argument(
        "--busy-timeout",
        type=float,
        default=30.0,
        help="seconds an upload or everything request waits for the one heavy-work slot "
        "before a 503 (30); clicks never wait for it",
    )
    serve.add_argument(
        "--everything-points", type=int, default=32, help="everything-mode grid per side (32)"
    )
    serve.add_argument(
        "--embeddings",
        type=Path,
        help="a folder written by `tinysam embed`: uploads of those images skip the encoder",
    )
    add_model_args(serve, backend=True)

    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from .common import UsageError, check_grid

    if not 0 < args.port < 65536:
        raise UsageError("--port must be between 1 and 65535")
    limits = (args.cache_mb, args.max_upload_mb, args.max_pixels, args.max_points, args.work_mb)
    if min(limits) <= 0 or args.max_json_kb < 1 or not args.busy_timeout > 0:
        raise UsageError(
            "--cache-mb, --max-upload-mb, --max-pixels, --max-points, --work-mb, --max-json-kb "
            "and --busy-timeout must be positive"
        )
    check_grid(args.everything_points, "--everything-points")
    check_port(args.host, args.port)
    from ..serve.server import run
    from ..serve.service import DemoService

    service = DemoService(
        predictor_from_args(args),
        cache_bytes=args.cache_mb << 20,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        everything_points=args.everything_points,
        max_json_bytes=args.max_json_kb << 10,
        max_points=args.max_points,
        busy_timeout=args.busy_timeout,
        embeddings=_embeddings(args.embeddings),
        work_bytes=args.work_mb << 20,
    )
    if not is_loopback(args.host):
        print(
            f"tinysam serve: listening on {args.host}: reachable from other machines",
            file=sys.stderr,
        )
    print(f"tinysam serve: {url(args.host, args.port)} (API docs at /docs)", file=sys.stderr)
    run(service, args.host, args.port)


def add_cache_and_pixel_args(parser: argparse.ArgumentParser) -> None:
    """The embedding cache and image size flags every server shares."""
    parser.add_argument(
        "--cache-mb", type=int, default=512, help="memory for cached image embeddings (512 MiB)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="image pixel-count limit (40 M)"
    )
    parser.add_argument(
        "--work-mb",
        type=int,
        default=512,
        help="memory that concurrent requests may hold for masks at the image's full size; "
        "requests on large images take turns beyond it (512 MiB)",
    )


def _embeddings(folder) -> dict:
    from ..embeddings import read_index
    from .common import UsageError

    if folder is None:
        return {}
    try:
        return read_index(folder)
    except ValueError as err:
        raise UsageError(str(err)) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(host: str, port: int) -> str:
    """The address to open in a browser (IPv6 literals in brackets)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def check_port(host: str, port: int) -> None:
    """Fail with one line before loading a model if the address cannot be listened on."""
    import socket

    from .common import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(f"--host {host!r} is not an address here ({err.strerror})") from err
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UsageError(
                f"cannot listen on {host}:{port} ({err.strerror}); pick another --port"
            ) from err
