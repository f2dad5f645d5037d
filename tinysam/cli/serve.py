"""``tinysam serve``: start the web demo."""

from __future__ import annotations

import argparse
import sys

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
    serve.add_argument(
        "--cache-mb", type=int, default=512, help="memory for cached image embeddings (512 MiB)"
    )
    serve.add_argument("--max-upload-mb", type=float, default=20, help="upload size limit (20)")
    serve.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="image pixel-count limit (40 M)"
    )
    serve.add_argument(
        "--everything-points", type=int, default=32, help="everything-mode grid per side (32)"
    )
    add_model_args(serve, backend=True)

    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from .common import UsageError

    if not 0 < args.port < 65536:
        raise UsageError("--port must be between 1 and 65535")
    if args.cache_mb < 1 or args.max_upload_mb <= 0 or args.max_pixels < 1:
        raise UsageError("--cache-mb, --max-upload-mb and --max-pixels must be positive")
    if args.everything_points < 4:
        raise UsageError("--everything-points must be at least 4")
    _check_port(args.host, args.port)
    import uvicorn

    from ..serve.app import DemoService, create_app

    service = DemoService(
        predictor_from_args(args),
        cache_bytes=args.cache_mb << 20,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        everything_points=args.everything_points,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"tinysam serve: listening on {args.host}: reachable from other machines",
            file=sys.stderr,
        )
    print(f"tinysam serve: http://{args.host}:{args.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")


def _check_port(host: str, port: int) -> None:
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
