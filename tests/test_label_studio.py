"""Label Studio ML backend: a real ``tinysam label-studio`` process answers Label Studio's own
request payloads, with task images read from a stand-in Label Studio file server on
127.0.0.1 that demands the token the backend got in ``/setup``.

The payload shapes are Label Studio's: ``ml/api_connector.py`` (``_prep_prediction_req``,
``setup``) of label-studio 1.23 and the context regions of its smart tools, as in
label-studio-ml-backend's ``examples/segment_anything_model``.
"""

from __future__ import annotations

import copy
import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra: pip install 'tinysam[serve]'")
brush = pytest.importorskip(
    "label_studio_sdk.converter.brush", reason="pip install 'tinysam[label-studio]'"
)
from conftest import start_tinysam, stop_server  # noqa: E402

TOKEN = "0123456789abcdef"
IMAGE_PATH = "/data/upload/1/0f1e2d3c-picture1.jpg"
CONFIG = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Banana" background="#FF0000"/>
    <Label value="Orange" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana" smart="true" background="#000000" showInline="true"/>
    <Label value="Orange" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana" background="#000000" showInline="true"/>
    <Label value="Orange" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>
"""


def keypoint(x: float, y: float, positive: bool, w: int, h: int, label="Banana") -> dict:
    """A smart keypoint region as Label Studio puts it in ``context.result``."""
    return {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.32, "keypointlabels": [label]},
        "is_positive": positive,
        "id": "fBWv1t0S2L",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def rectangle(x, y, width, height, w: int, h: int, label="Orange") -> dict:
    return {
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "id": "Hx3k0Q9vRa",
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def predict_request(regions: list | None, image_url: str = IMAGE_PATH) -> dict:
    """``MLApi._prep_prediction_req``: one task (as InteractiveAnnotatingDataSerializer
    gives it), the project uid, the config and the context."""
    task = {
        "id": 7,
        "data": {"image": image_url},
        "meta": {},
        "created_at": "2026-11-30T04:00:00.000000Z",
        "updated_at": "2026-11-30T04:00:00.000000Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": 1,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "project": 1,
        "file_upload": 1,
        "annotations": [],
        "drafts": [],
        "predictions": [],
    }
    context = None if regions is None else {"result": regions}
    return {
        "tasks": [task],
        "project": "1.1764475000",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": context},
    }


class FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    """Label Studio's file serving: /data/upload/... with ``Authorization: Token``."""

    files: dict[str, bytes] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            self.send_error(401)
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def label_studio(golden, vit_t_meta):
    photo = (golden / "images" / vit_t_meta["image"]).read_bytes()
    text = io.BytesIO()
    Image.new("RGB", (4, 4)).save(text, format="PNG")
    FakeLabelStudio.files = {IMAGE_PATH: photo, "/data/upload/1/notes.txt": b"not an image"}
    FakeLabelStudio.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def backend(vit_t_checkpoint, label_studio):
    process, port = start_tinysam(
        "label-studio", vit_t_checkpoint, "/health", "--max-request-mb", "1"
    )
    status, answer = post(port, "/setup", setup_request(label_studio))
    assert status == 200 and answer["model_version"].startswith("tinysam-")
    yield port
    stop_server(process)


def setup_request(hostname: str) -> dict:
    """``MLApi.setup``'s body."""
    return {
        "project": "1.1764475000",
        "schema": CONFIG,
        "hostname": hostname,
        "access_token": TOKEN,
        "extra_params": None,
    }


def call(port: int, method: str, path: str, body: bytes = b"", headers=None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def post(port: int, path: str, payload, headers=None) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, kind, data = call(
        port, "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
    )
    assert kind == "application/json", (status, data[:200])
    return status, json.loads(data)


def decode_brush(region: dict) -> np.ndarray:
    """A brush region's mask, by Label Studio's own decoder (RGBA, alpha channel)."""
    h, w = region["original_height"], region["original_width"]
    return brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def expected_mask(predictor, points=None, labels=None, box=None) -> np.ndarray:
    """What ``tinysam segment`` writes: the best of the three candidate masks."""
    masks, scores, _ = predictor.predict(
        point_coords=None if points is None else np.asarray(points, float),
        point_labels=None if labels is None else np.asarray(labels, float),
        box=None if box is None else np.asarray(box, float),
    )
    return masks[int(np.argmax(scores))]


def test_health_answers_as_label_studio_ml(backend):
    status, kind, data = call(backend, "GET", "/health")
    answer = json.loads(data)
    assert status == 200 and answer["status"] == "UP" and answer["model_class"]
    assert json.loads(call(backend, "GET", "/")[2])["status"] == "UP"


def test_keypoint_gives_the_predictors_mask(backend, predictor, golden_image):
    h, w = golden_image.shape[:2]
    x, y = 47.5, 29.2  # percent, as Label Studio sends them
    status, answer = post(backend, "/predict", predict_request([keypoint(x, y, True, w, h)]))
    assert status == 200, answer
    (prediction,) = answer["results"]
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    assert (region["from_name"], region["to_name"]) == ("tag", "image")
    assert region["value"]["brushlabels"] == ["Banana"]
    assert (region["original_width"], region["original_height"]) == (w, h)
    want = expected_mask(predictor, [[x * w / 100, y * h / 100]], [1])
    np.testing.assert_array_equal(decode_brush(region), want)
    assert want.any()


def test_negative_keypoint_and_rectangle(backend, predictor, golden_image):
    h, w = golden_image.shape[:2]
    regions = [keypoint(47.5, 29.2, True, w, h), keypoint(13.0, 77.9, False, w, h)]
    status, answer = post(backend, "/predict", predict_request(regions))
    assert status == 200, answer
    points = [[47.5 * w / 100, 29.2 * h / 100], [13.0 * w / 100, 77.9 * h / 100]]
    want = expected_mask(predictor, points, [1, 0])
    np.testing.assert_array_equal(decode_brush(answer["results"][0]["result"][0]), want)

    box = rectangle(19.5, 13.0, 58.5, 71.4, w, h)
    status, answer = post(backend, "/predict", predict_request([box]))
    assert status == 200, answer
    region = answer["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["Orange"]
    pixels = [19.5 * w / 100, 13.0 * h / 100, (19.5 + 58.5) * w / 100, (13.0 + 71.4) * h / 100]
    np.testing.assert_array_equal(decode_brush(region), expected_mask(predictor, box=pixels))


def test_no_context_returns_no_prediction_and_reads_nothing(backend):
    before = len(FakeLabelStudio.seen)
    for context in (None, {"result": []}, {}):
        request = predict_request(None)
        request["params"]["context"] = context
        status, answer = post(backend, "/predict", request)
        assert (status, answer) == (200, {"results": []})
    assert len(FakeLabelStudio.seen) == before


def test_image_is_read_once_with_the_setup_token(backend, golden_image):
    h, w = golden_image.shape[:2]
    for x in (20.0, 60.0):
        status, _ = post(backend, "/predict", predict_request([keypoint(x, 50.0, True, w, h)]))
        assert status == 200
    reads = [seen for seen in FakeLabelStudio.seen if seen[0] == IMAGE_PATH]
    assert reads and all(auth == f"Token {TOKEN}" for _, auth in reads)
    assert len(reads) == 1  # later clicks reuse the cached embedding


def bad(request: dict, where: str, value) -> dict:
    """``request`` with the field at dotted path ``where`` set to ``value``."""
    request = copy.deepcopy(request)
    *path, last = where.split(".")
    node = request
    for key in path:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return request


GOOD = predict_request([keypoint(47.5, 29.2, True, 770, 769)])
BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
    + ']><View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="&i;"/></BrushLabels></View>'
)


@pytest.mark.parametrize(
    "payload, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"tasks": [], "label_config": NaN}', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (bad(GOOD, "tasks", "a task"), 400, "'tasks' must be a list"),
        (bad(GOOD, "tasks", [{"data": {"image": IMAGE_PATH}}] * 101), 413, "limit is 100"),
        (bad(GOOD, "label_config", None), 400, "label_config is missing"),
        (bad(GOOD, "label_config", "<View><Image"), 400, "not valid XML"),
        (bad(GOOD, "label_config", BILLION_LAUGHS), 400, "not valid XML"),
        (bad(GOOD, "label_config", '<View><Image name="i" value="$image"/></View>'), 400,
         "no <BrushLabels>"),
        (bad(GOOD, "params", "context"), 400, "'params' must be an object"),
        (bad(GOOD, "params.context", "click"), 400, "must be an object"),
        (bad(GOOD, "params.context.result", {"x": 1}), 400, "must be a list"),
        (bad(GOOD, "params.context.result.0.type", "choices"), 400, "is not a prompt"),
        (bad(GOOD, "params.context.result.0.value.x", 140.0), 400, "0..100"),
        (bad(GOOD, "params.context.result.0.value.y", "50"), 400, "0..100"),
        (bad(GOOD, "params.context.result.0.value", None), 400, "region object"),
        (bad(GOOD, "params.context.result.0.is_positive", "yes"), 400, "true or false"),
        (bad(GOOD, "tasks.0.data", []), 400, "'data' object"),
        (bad(GOOD, "tasks.0.data.image", None), 400, "no image URL"),
        (bad(GOOD, "tasks.0.data.image", "/data/upload/1/missing.jpg"), 502, "HTTP 404"),
        (bad(GOOD, "tasks.0.data.image", "/data/upload/1/notes.txt"), 415, "not an image"),
        (bad(GOOD, "tasks.0.data.image", "http://10.0.0.1/x.jpg"), 403, "--allow-host 10.0.0.1"),
        (bad(GOOD, "tasks.0.data.image", "file:///etc/passwd"), 400, "only http(s) and data:"),
        (bad(GOOD, "tasks.0.data.image", "data:image/png;base64,@@@"), 400, "not valid base64"),
        (bad(GOOD, "tasks", [GOOD["tasks"][0]] * 2), 400, "must hold one task"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)  # fmt: skip
def test_bad_payloads_get_one_line_errors(backend, payload, status, message):
    got, answer = post(backend, "/predict", payload)
    assert got == status, answer
    assert message in answer["error"] and "\n" not in answer["error"]
    assert "Traceback" not in answer["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(backend):
    """The backend runs with --max-request-mb 1: a larger declared body gets a 413 at once
    (no body is sent here, so nothing can break the pipe)."""
    import socket

    with socket.create_connection(("127.0.0.1", backend), timeout=60) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {(1 << 20) + 1}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while len(reply) < 1 << 16 and (data := sock.recv(65536)):
            reply += data
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert "limit" in json.loads(body)["error"]


def test_setup_refuses_a_config_without_a_brush(backend, label_studio):
    request = setup_request(label_studio)
    request["schema"] = '<View><Image name="image" value="$image"/></View>'
    status, answer = post(backend, "/setup", request)
    assert status == 400 and "<BrushLabels>" in answer["error"]


def test_webhook_and_metrics(backend):
    status, answer = post(backend, "/webhook", {"action": "ANNOTATION_CREATED", "project": {}})
    assert status == 200 and "does not train" in answer["result"]
    status, answer = post(backend, "/webhook", {"action": "PROJECT_UPDATED"})
    assert (status, answer) == (200, {"status": "Unknown event"})
    assert call(backend, "GET", "/metrics")[0] == 200


# Random weights: no mask passes the default thresholds.
LOOSE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def in_process_app(vit_t_checkpoint, **options):
    from fastapi.testclient import TestClient

    from tinysam import SamPredictor, sam_model_registry
    from tinysam.integrations.label_studio.app import create_label_studio_app
    from tinysam.integrations.label_studio.backend import ImageSource, LabelStudioBackend
    from tinysam.serve.service import DemoService

    auth = options.pop("basic_auth", None)
    model = sam_model_registry["vit_t"](checkpoint=vit_t_checkpoint)
    service = DemoService(SamPredictor(model), everything_points=8, everything_options=LOOSE)
    backend = LabelStudioBackend(service, ImageSource(), **options)
    return TestClient(create_label_studio_app(backend, basic_auth=auth))


@pytest.mark.slow  # the everything mode on a full image (~25 s); CI's slow phase
def test_preannotation_gives_one_region_per_everything_mask(vit_t_checkpoint, golden_image):
    import base64

    from tinysam import SamPredictor, sam_model_registry
    from tinysam.everything import SamHierarchicalMaskGenerator

    buffer = io.BytesIO()
    Image.fromarray(golden_image).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = in_process_app(vit_t_checkpoint, preannotate=True)
    response = client.post("/predict", json=predict_request(None, image_url=url))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["results"]
    regions = prediction["result"]

    model = sam_model_registry["vit_t"](checkpoint=vit_t_checkpoint)
    generator = SamHierarchicalMaskGenerator(SamPredictor(model), points_per_side=8, **LOOSE)
    records = generator.generate(golden_image)
    assert len(regions) == len(records) > 0
    for region, record in zip(regions, records):
        assert region["value"]["brushlabels"] == ["Banana"]  # the first brush label
        np.testing.assert_array_equal(decode_brush(region), record["segmentation"])


def test_basic_auth(vit_t_checkpoint):
    import base64

    client = in_process_app(vit_t_checkpoint, basic_auth=("ls", "s3cret"))
    assert client.get("/health").status_code == 401
    wrong = base64.b64encode(b"ls:guess").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"ls:s3cret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {right}"}).status_code == 200


def test_cli_refuses_bad_options(capsys):
    from conftest import one_error_line, run_cli

    for argv, message in [
        (["--port", "0"], "--port"),
        (["--basic-auth", "nopassword"], "USER:PASSWORD"),
        (["--label-studio-url", "ftp://x"], "http://"),
        (["--max-image-mb", "0"], "positive"),
    ]:
        code, _, err = run_cli(capsys, "label-studio", *argv)
        assert code == 2
        assert message in one_error_line(err, "label-studio")


@pytest.mark.slow
def test_a_real_label_studio_server_gets_the_mask(vit_t_checkpoint, golden, tmp_path):
    """Label Studio 1.23.2 itself (in its own venv): project and upload through its API, this
    backend connected (Label Studio calls /health and /setup), a click sent through
    /api/ml/{id}/interactive-annotating; tests/tools/label_studio_e2e.py checks the mask."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from conftest import free_port

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinysam-tests"
    venv = cache / "label-studio-1.23.2"
    if not (venv / "bin" / "label-studio").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "label-studio==1.23.2"],
            check=True, timeout=1500,
        )  # fmt: skip
    token = "e2e0123456789abcdef0123456789abcdef0123"
    port = free_port()
    env = {**os.environ, "SSRF_PROTECTION_ENABLED": "false", "USE_DEFAULT_BANNED_SUBNETS": "false"}
    studio = subprocess.Popen(
        [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--port", str(port),
         "--data-dir", str(tmp_path / "ls"), "--username", "e2e@example.com",
         "--password", "tinysam-e2e-pw", "--user-token", token, "--enable-legacy-api-token",
         "--agree-fix-sqlite"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    backend, backend_port = start_tinysam("label-studio", vit_t_checkpoint, "/health")
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # first start migrates its database: minutes
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert studio.poll() is None, "label-studio exited"
                time.sleep(1)
        script = Path(__file__).parent / "tools" / "label_studio_e2e.py"
        image = golden / "images" / "picture1.jpg"
        run = subprocess.run(
            [sys.executable, str(script), base, token, f"http://127.0.0.1:{backend_port}",
             str(vit_t_checkpoint), str(image), "365", "225"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert '"region_type": "brushlabels"' in run.stdout
    finally:
        stop_server(backend)
        studio.terminate()
        studio.wait(timeout=60)
