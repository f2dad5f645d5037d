"""``tinysam label-studio``: a Label Studio ML backend (interactive brush masks)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import UsageError, add_model_args, check_grid, predictor_from_args
from .serve import add_cache_and_pixel_args


def register(sub) -> None:
    backend = sub.add_parser(
        "label-studio",
        help="a Label Studio ML backend: click or drag in Label Studio, get a brush mask",
        description=(
            "Serve Label Studio's ML backend API (/health, /setup, /predict, /webhook). In "
            "Label Studio: Project > Settings > Model > Connect Model, URL "
            "http://HOST:PORT, 'Interactive preannotations' on. The labeling config needs a "
            "<BrushLabels> and a smart <KeyPointLabels> and/or <RectangleLabels> on the same "
            "<Image> (the README has one). Task images are read from Label Studio with the "
            "token it sends when connecting; other hosts only with --allow-host."
        ),
        epilog="example: tinysam label-studio --checkpoint tinysam_42.3.pth --port 9090",
    )
    backend.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    backend.add_argument("--port", type=int, default=9090, help="port (9090, as label-studio-ml)")
    backend.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's address, for task images given as /data/... paths (default: "
        "$LABEL_STUDIO_URL, else what Label Studio sends when it connects)",
    )
    backend.add_argument(
        "--api-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="Label Studio token to read task images with (default: $LABEL_STUDIO_API_KEY, "
        "else the one Label Studio sends when it connects)",
    )
    backend.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also read task images from this host (repeatable; * for any)",
    )
    backend.add_argument(
        "--preannotate",
        action="store_true",
        help="answer requests without a click (Retrieve predictions, new tasks) with the "
        "everything mode: one brush region per object",
    )
    backend.add_argument(
        "--single-mask",
        action="store_true",
        help="one mask per click instead of the best of three candidates",
    )
    backend.add_argument(
        "--basic-auth",
        metavar="USER:PASSWORD",
        default=_env_basic_auth(),
        help="require HTTP basic auth (default: $BASIC_AUTH_USER:$BASIC_AUTH_PASS if set); "
        "enter the same in Label Studio's model settings",
    )
    add_cache_and_pixel_args(backend)
    backend.add_argument(
        "--max-image-mb", type=float, default=50, help="task image download limit (50 MiB)"
    )
    backend.add_argument(
        "--max-request-mb", type=float, default=32, help="request body limit (32 MiB)"
    )
    backend.add_argument(
        "--download-seconds",
        type=float,
        default=30.0,
        help="time for a whole task image download, however slowly it arrives (30 s)",
    )
    backend.add_argument(
        "--max-downloads",
        type=int,
        default=8,
        help="task image downloads at once; more get a 503 (8); clicks never wait for them",
    )
    backend.add_argument(
        "--preannotate-seconds",
        type=float,
        default=120.0,
        help="--preannotate work of one request stops after this long with a 503 (120 s); "
        "it also stops when Label Studio hangs up",
    )
    backend.add_argument(
        "--everything-points", type=int, default=32, help="--preannotate grid per side (32)"
    )
    add_model_args(backend, backend=True)
    backend.set_defaults(run=run_label_studio)


def _env_basic_auth() -> str | None:
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    return f"{user}:{password}" if user and password else None


def run_label_studio(args: argparse.Namespace) -> None:
    from .serve import check_port, is_loopback, url

    if not 0 < args.port < 65536:
        raise UsageError("--port must be between 1 and 65535")
    sizes = (args.cache_mb, args.max_image_mb, args.max_pixels, args.max_request_mb, args.work_mb)
    sizes += (args.download_seconds, args.max_downloads, args.preannotate_seconds)
    if min(sizes) <= 0:
        raise UsageError(
            "--cache-mb, --max-image-mb, --max-pixels, --max-request-mb, --work-mb, "
            "--download-seconds, --max-downloads and --preannotate-seconds must be positive"
        )
    check_grid(args.everything_points, "--everything-points")
    if args.label_studio_url and not args.label_studio_url.startswith(("http://", "https://")):
        raise UsageError("--label-studio-url must start with http:// or https://")
    auth = None
    if args.basic_auth:
        user, sep, password = args.basic_auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--basic-auth must be USER:PASSWORD")
        auth = (user, password)
    check_port(args.host, args.port)

    import uvicorn

    from ..integrations.label_studio.app import create_label_studio_app
    from ..integrations.label_studio.backend import ImageSource, LabelStudioBackend, brush_encoder
    from ..serve.service import DemoService

    brush_encoder()  # a missing extra is an error now, not at the first click
    max_image_bytes = int(args.max_image_mb * (1 << 20))
    service = DemoService(
        predictor_from_args(args),
        cache_bytes=args.cache_mb << 20,
        max_upload_bytes=max_image_bytes,
        max_pixels=args.max_pixels,
        everything_points=args.everything_points,
        work_bytes=args.work_mb << 20,
    )
    images = ImageSource(
        args.label_studio_url,
        args.api_key,
        tuple(args.allow_host),
        max_bytes=max_image_bytes,
        download_seconds=args.download_seconds,
        max_downloads=args.max_downloads,
    )
    backend = LabelStudioBackend(
        service,
        images,
        multimask=not args.single_mask,
        preannotate=args.preannotate,
        preannotate_seconds=args.preannotate_seconds,
    )
    app = create_label_studio_app(
        backend, basic_auth=auth, max_request_bytes=int(args.max_request_mb * (1 << 20))
    )
    if not is_loopback(args.host):
        print(f"tinysam label-studio: listening on {args.host}", file=sys.stderr)
    print(
        f"tinysam label-studio: ML backend at {url(args.host, args.port)} "
        "(Label Studio: Settings > Model > Connect Model)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
