"""Label Studio's ML backend contract: its ``/predict`` payloads in, brush masks out.

Label Studio (``label_studio/ml/api_connector.py``) posts ``{"tasks", "project",
"label_config", "params": {"context"}}`` to ``/predict`` and ``{"project", "schema",
"hostname", "access_token"}`` to ``/setup``; ``label-studio-ml`` (``label_studio_ml/api.py``)
answers ``{"results": [prediction, ...]}``, one prediction per task. An interactive request
(smart keypoints or rectangles placed by the annotator) carries them in ``context.result`` in
percent of the image; the answer is one ``brushlabels`` region whose ``value.rle`` is Label
Studio's brush RLE (``label_studio_sdk.converter.brush.mask2rle``). Without a context the
backend pre-annotates the whole image (the everything mode, one region per mask) when asked
to, and returns nothing otherwise.

``LabelStudioBackend`` is that logic without HTTP; ``label_studio.app`` serves it and
``label_studio.ml`` puts it behind ``LabelStudioMLBase`` for ``label-studio-ml start``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...formats import is_number
from ...io import DownloadError, fetch_bytes
from ...serve.service import EVERYTHING_BYTES_PER_PIXEL, ApiError, Cancelled, DemoService
from ...version import __version__

MODEL_VERSION = f"tinysam-{__version__}"
DEFAULT_MAX_IMAGE_BYTES = 50 << 20
# A task image download may take this long in all (not per read), and this many run at once.
DEFAULT_DOWNLOAD_SECONDS = 30.0
DEFAULT_MAX_DOWNLOADS = 8
# Pre-annotation (the everything mode for each task) of one request stops after this long.
DEFAULT_PREANNOTATE_SECONDS = 120.0
# A click's answer at full size (``serve.service.CLICK_BYTES_PER_PIXEL``) plus Label Studio's brush
# encoder, which repeats every pixel into RGBA (4 bytes) before run-length coding it.
BRUSH_BYTES_PER_PIXEL = 16
# Context regions Label Studio sends for the two smart tools.
KEYPOINTS = "keypointlabels"
RECTANGLES = "rectanglelabels"


def brush_encoder():
    """Label Studio's own brush RLE encoder (``mask2rle``), or an ImportError naming the extra."""
    try:
        from label_studio_sdk.converter.brush import mask2rle
    except ImportError:  # the converter before it moved into the SDK
        try:
            from label_studio_converter.brush import mask2rle
        except ImportError:
            raise ImportError(
                "Label Studio's brush encoder is missing: pip install 'tinysam[label-studio]'",
                name="label_studio_sdk",
            ) from None
    return mask2rle


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """An HxW mask as Label Studio's brush RLE (RGBA, 255 inside), by its own converter."""
    return brush_encoder()(np.asarray(mask, bool).astype(np.uint8) * 255)


@dataclass(frozen=True)
class LabelingConfig:
    """What the backend needs of a project's labeling config: where masks go."""

    brush: str  # the <BrushLabels> tag's name (``from_name`` of the regions we return)
    image: str  # the <Image> tag's name (``to_name``)
    image_key: str  # the task data key holding the image URL (``$image`` -> ``image``)
    labels: tuple[str, ...]  # the brush labels, in order


def parse_labeling_config(xml: str) -> LabelingConfig:
    """The brush and image tags of a labeling config, or ``ApiError(400)`` saying what to add."""
    if not isinstance(xml, str) or not xml.strip():
        raise ApiError(400, "label_config is missing: send the project's labeling config")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise ApiError(400, f"label_config is not valid XML ({err})") from None
    brushes = [tag for tag in root.iter() if tag.tag == "BrushLabels"]
    if not brushes:
        raise ApiError(
            400,
            "the labeling config has no <BrushLabels> tag: tinysam answers with brush masks "
            "(see the README's Label Studio config)",
        )
    brush = brushes[0]
    images = {tag.get("name"): tag for tag in root.iter() if tag.tag == "Image"}
    image = images.get(brush.get("toName")) or next(iter(images.values()), None)
    if image is None or not image.get("name"):
        raise ApiError(400, "the labeling config has no <Image> tag for the brush to draw on")
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ApiError(400, 'the <Image> tag\'s value must name a task field, like "$image"')
    labels = tuple(label.get("value", "") for label in brush.iter("Label") if label.get("value"))
    return LabelingConfig(brush.get("name", ""), image.get("name"), value[1:], labels)


@dataclass
class Prompt:
    """Points, labels and box in image pixels, and the label the annotator chose."""

    points: list[list[float]]
    labels: list[int]
    box: list[float] | None
    label: str | None


def _percent(value: dict, key: str, where: str) -> float:
    number = value.get(key)
    if not is_number(number) or not -1e-6 <= number <= 100 + 1e-6:
        raise ApiError(400, f"{where}: value.{key} must be a number in 0..100 (percent)")
    return float(number)


def parse_context(context: Any, width: int, height: int) -> Prompt | None:
    """The prompt in an interactive request's ``context``; None when there is none."""
    if context in (None, {}, []):
        return None
    if not isinstance(context, dict):
        raise ApiError(400, "params.context must be an object with a 'result' list")
    regions = context.get("result")
    if regions in (None, []):
        return None
    if not isinstance(regions, list):
        raise ApiError(400, "params.context.result must be a list of regions")
    prompt = Prompt([], [], None, None)
    for i, region in enumerate(regions):
        where = f"context.result[{i}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise ApiError(400, f"{where} must be a region object with a 'value'")
        kind, value = region.get("type"), region["value"]
        if kind not in (KEYPOINTS, RECTANGLES):
            raise ApiError(
                400,
                f"{where}: type {kind!r} is not a prompt; use KeyPointLabels or "
                'RectangleLabels with smart="true"',
            )
        chosen = value.get(kind)
        if isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
            prompt.label = chosen[0]
        x = _percent(value, "x", where) * width / 100
        y = _percent(value, "y", where) * height / 100
        if kind == KEYPOINTS:
            positive = region.get("is_positive", True)
            if not isinstance(positive, bool):
                raise ApiError(400, f"{where}: is_positive must be true or false")
            prompt.points.append([x, y])
            prompt.labels.append(int(positive))
        else:
            w = _percent(value, "width", where) * width / 100
            h = _percent(value, "height", where) * height / 100
            prompt.box = [x, y, min(x + w, width), min(y + h, height)]  # the latest box wins
    return prompt


class ImageSource:
    """Task image URLs -> bytes: Label Studio's own files with its token, ``data:`` URLs, and
    other hosts only when allowed (the backend must not become a proxy into its network).

    Every hop of a redirect passes the same rule as the first URL. A download has a size cap
    and a deadline for the whole transfer (``download_seconds``), and at most
    ``max_downloads`` run at once (more are refused with a 503 at once, not queued), so slow
    or stalled image servers cannot hold the worker threads that clicks need.
    """

    def __init__(
        self,
        label_studio_url: str | None = None,
        api_key: str | None = None,
        allow_hosts: tuple[str, ...] = (),
        max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        download_seconds: float = DEFAULT_DOWNLOAD_SECONDS,
        max_downloads: int = DEFAULT_MAX_DOWNLOADS,
    ) -> None:
        self.label_studio_url = label_studio_url
        self.api_key = api_key
        self.allow_hosts = tuple(host.lower() for host in allow_hosts)
        self.max_bytes = max_bytes
        self.download_seconds = download_seconds
        self.max_downloads = max_downloads
        self._downloads = threading.BoundedSemaphore(max_downloads)
        self._lock = threading.Lock()

    def configure(self, hostname: Any, access_token: Any) -> None:
        """What Label Studio says of itself in ``/setup`` (its URL and the project's token);
        values given on the command line win."""
        with self._lock:
            if isinstance(hostname, str) and hostname.startswith(("http://", "https://")):
                self.label_studio_url = self.label_studio_url or hostname
            if isinstance(access_token, str) and access_token:
                self.api_key = self.api_key or access_token

    def read(self, url: Any) -> bytes:
        if not isinstance(url, str) or not url:
            raise ApiError(400, "the task has no image URL under the <Image> tag's field")
        if url.startswith("data:"):
            return self._data_url(url)
        base = self.label_studio_url
        if url.startswith("/"):
            if not base:
                raise ApiError(
                    400,
                    f"image {url[:200]} is a Label Studio path, but the backend does not know "
                    "Label Studio's URL: connect it from Label Studio (it sends its URL in "
                    "/setup) or start with --label-studio-url",
                )
            url = urllib.parse.urljoin(base.rstrip("/") + "/", url.lstrip("/"))
        own = self._check_url(url)
        headers = {"Authorization": f"Token {self.api_key}"} if own and self.api_key else None
        if not self._downloads.acquire(blocking=False):
            raise ApiError(
                503,
                f"{self.max_downloads} image downloads are already running; try again in a moment",
            )
        try:
            return fetch_bytes(
                url,
                max_bytes=self.max_bytes,
                timeout=self.download_seconds,
                secret_headers=headers,
                check_url=self._check_url,
            )
        except DownloadError as err:
            raise ApiError(502, str(err)) from None
        finally:
            self._downloads.release()

    def _check_url(self, url: str) -> bool:
        """Whether ``url`` is Label Studio's own; an ``ApiError`` if it may not be read at all
        (another scheme, or a host not allowed). Called for the first URL and every redirect."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ApiError(400, f"image URL {url[:200]!r}: only http(s) and data: URLs are read")
        base = self.label_studio_url
        own = base is not None and _origin(url) == _origin(base)
        host = parsed.hostname.lower()
        if not own and "*" not in self.allow_hosts and host not in self.allow_hosts:
            raise ApiError(
                403,
                f"image host {host} is not Label Studio's; start the backend with "
                f"--allow-host {host} to read images from it",
            )
        return own

    def _data_url(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, "data: image URLs must be base64 (data:image/png;base64,...)")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ApiError(413, f"the data: image is more than {self.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data: image URL is not valid base64") from None


class _Stop:
    """Work of one request should stop: its client went away (``cancel``), or it ran past its
    time. Quacks like the ``threading.Event`` that ``DemoService.everything_masks`` polls."""

    def __init__(self, cancel: threading.Event | None, seconds: float) -> None:
        self.cancel = cancel
        self.deadline = time.monotonic() + seconds

    def client_gone(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def is_set(self) -> bool:
        return self.client_gone() or time.monotonic() > self.deadline


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class LabelStudioBackend:
    """Label Studio's ``/setup`` and ``/predict`` on a ``DemoService`` (its embedding cache,
    heavy-work slot and limits); each task's image is read once per URL and encoded once."""

    def __init__(
        self,
        service: DemoService,
        images: ImageSource,
        multimask: bool = True,
        preannotate: bool = False,
        max_tasks: int = 100,
        preannotate_seconds: float = DEFAULT_PREANNOTATE_SECONDS,
    ) -> None:
        self.service = service
        self.images = images
        self.multimask = multimask
        self.preannotate = preannotate
        self.max_tasks = max_tasks
        self.preannotate_seconds = preannotate_seconds
        # SHA-256 of a task's image URL -> its cached image id. Keyed by digest, not by the URL:
        # a data: URL is the whole image (16 MB each kept 4096 times over, before).
        self._image_ids: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def setup(self, payload: Any) -> dict:
        if not isinstance(payload, dict):
            raise ApiError(400, "the /setup body must be a JSON object")
        if payload.get("schema") is not None:
            parse_labeling_config(payload["schema"])
        self.images.configure(payload.get("hostname"), payload.get("access_token"))
        return {"model_version": MODEL_VERSION}

    def predict(self, payload: Any, cancel: threading.Event | None = None) -> dict:
        """One prediction per task that asks for one. ``cancel`` (the client went away) and
        ``preannotate_seconds`` stop pre-annotation within one batch of prompts: the first
        raises ``Cancelled``, the second answers 503 naming the limit."""
        if not isinstance(payload, dict):
            raise ApiError(400, "the /predict body must be a JSON object")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise ApiError(400, "'tasks' must be a list of task objects")
        if len(tasks) > self.max_tasks:
            raise ApiError(413, f"{len(tasks)} tasks in one request; the limit is {self.max_tasks}")
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "'params' must be an object")
        config = parse_labeling_config(payload.get("label_config"))
        context = params.get("context")
        if context not in (None, {}, []) and len(tasks) != 1:
            raise ApiError(400, "an interactive request (with a context) must hold one task")
        stop = _Stop(cancel, self.preannotate_seconds)
        results = []
        try:
            for task in tasks:
                if stop.is_set():
                    raise Cancelled
                prediction = self.predict_task(task, config, context, stop)
                if prediction is not None:
                    results.append(prediction)
        except Cancelled:
            if stop.client_gone():
                raise
            raise ApiError(
                503,
                f"pre-annotation stopped after {self.preannotate_seconds:g} s (the backend's "
                f"--preannotate-seconds) with {len(results)} of {len(tasks)} tasks done; ask "
                "for fewer tasks at a time",
            ) from None
        return {"results": results}

    def predict_task(
        self, task: dict, config: LabelingConfig, context: Any, stop: _Stop | None = None
    ) -> dict | None:
        if context in (None, {}, []) and not self.preannotate:
            return None  # nothing asked for, nothing to download or encode
        data = task.get("data")
        if not isinstance(data, dict):
            raise ApiError(400, "each task needs a 'data' object")
        url = data.get(config.image_key)
        image_id, width, height = self._image(url)
        prompt = parse_context(context, width, height)
        if prompt is None:
            if not self.preannotate:
                return None
            return self._everything(image_id, config, width, height, stop)
        if not prompt.points and prompt.box is None:
            return None
        label = prompt.label or (config.labels[0] if config.labels else None)
        with self.service.full_size_work(image_id, BRUSH_BYTES_PER_PIXEL):
            mask, score = self.service.segment(
                image_id, prompt.points, prompt.labels, prompt.box, self.multimask
            )
            region = self._region(mask, score, config, label, width, height)
        return {"result": [region], "score": score, "model_version": MODEL_VERSION}

    def _image(self, url: Any) -> tuple[str, int, int]:
        key = (
            hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
            if isinstance(url, str)
            else None
        )
        with self._lock:
            image_id = self._image_ids.get(key) if key is not None else None
        cached = self.service.cache.get(image_id) if image_id else None
        if cached is None:
            added = self.service.add_image(self.images.read(url))
            image_id = added["image_id"]
            with self._lock:
                self._image_ids[key] = image_id
                while len(self._image_ids) > 4096:
                    self._image_ids.popitem(last=False)
            return image_id, added["width"], added["height"]
        h, w = cached.image.shape[:2]
        return image_id, w, h

    def _everything(
        self, image_id: str, config: LabelingConfig, width: int, height: int, stop=None
    ):
        label = config.labels[0] if config.labels else None
        with self.service.full_size_work(image_id, EVERYTHING_BYTES_PER_PIXEL):
            records, masks = self.service.everything_masks(image_id, stop)
            regions = [
                self._region(mask, float(record["predicted_iou"]), config, label, width, height)
                for record, mask in zip(records, masks)
            ]
        score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
        return {"result": regions, "score": score, "model_version": MODEL_VERSION}

    @staticmethod
    def _region(mask, score: float, config: LabelingConfig, label, width: int, height: int):
        return {
            "id": uuid.uuid4().hex[:10],
            "from_name": config.brush,
            "to_name": config.image,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": mask_to_brush_rle(mask),
                "brushlabels": [label] if label else [],
            },
            "score": score,
            "type": "brushlabels",
            "readonly": False,
        }
