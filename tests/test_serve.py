"""The web demo's JSON API: uploads, prompts, limits, concurrency and the embedding cache."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra: pip install 'tinysam[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from tinysam.serve.app import create_app  # noqa: E402
from tinysam.serve.service import DemoService  # noqa: E402

from conftest import start_tinysam, stop_server  # noqa: E402

EMBEDDING_BYTES = 256 * 64 * 64 * 4


@pytest.fixture(scope="module")
def predictor(vit_t_checkpoint):
    from tinysam import SamPredictor, build_sam_vit_t

    return SamPredictor(build_sam_vit_t(vit_t_checkpoint).eval())


def client_for(predictor, **limits) -> tuple[TestClient, DemoService]:
    service = DemoService(predictor, everything_points=8, **limits)
    return TestClient(create_app(service)), service


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(seed: int, size=(96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def upload(client: TestClient, data: bytes, name: str = "a.png"):
    return client.post("/api/images", files={"file": (name, data, "image/png")})


def decode_mask(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


def test_click_returns_the_predictors_mask(predictor, golden):
    client, _ = client_for(predictor)
    data = (golden / "images" / "picture1.jpg").read_bytes()
    info = upload(client, data, "picture1.jpg").json()
    assert (info["width"], info["height"]) == (769, 770)
    response = client.post(
        f"/api/images/{info['image_id']}/predict", json={"points": [[300, 200]], "labels": [1]}
    )
    assert response.status_code == 200
    body = response.json()
    mask = decode_mask(body["mask_png"])
    from tinysam.io import load_image

    predictor.set_image(load_image(golden / "images" / "picture1.jpg"))
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1.0])
    )
    np.testing.assert_array_equal(mask, masks[np.argmax(scores)])
    assert body["area"] == int(mask.sum()) and body["score"] == pytest.approx(scores.max())
    from pycocotools import mask as mask_utils

    rle = dict(body["rle"], counts=body["rle"]["counts"].encode())
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    # A second upload of the same bytes is served from the cache (same id).
    assert upload(client, data).json()["image_id"] == info["image_id"]


def test_box_and_negative_points(predictor):
    client, _ = client_for(predictor)
    image_id = upload(client, png_bytes(noise_image(1))).json()["image_id"]
    body = {"points": [[20, 20], [60, 40]], "labels": [1, 0], "box": [5, 5, 90, 80]}
    response = client.post(f"/api/images/{image_id}/predict", json=body)
    assert response.status_code == 200
    assert decode_mask(response.json()["mask_png"]).shape == (96, 128)


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"", 400, "empty"),
        (b"this is not an image", 415, "not an image"),
        (png_bytes(noise_image(0))[:60], 415, "truncated"),
    ],
)
def test_bad_uploads_get_json_errors(predictor, data, status, message):
    client, _ = client_for(predictor)
    response = upload(client, data)
    assert response.status_code == status and message in response.json()["error"]


def test_oversize_uploads_and_images_are_refused(predictor):
    client, _ = client_for(predictor, max_upload_bytes=10_000, max_pixels=100 * 100)
    big_file = png_bytes(noise_image(2, (200, 200)))
    response = upload(client, big_file)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    flat = png_bytes(np.zeros((120, 120, 3), np.uint8))  # small file, too many pixels
    assert len(flat) < 10_000
    response = upload(client, flat)
    assert response.status_code == 413 and "pixels" in response.json()["error"]
    assert client.get("/api/health").json()["ok"]  # still serving


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"points": [[1, 2, 3]], "labels": [1]}, 400, "[x, y]"),
        ({"points": [[1, 2]], "labels": []}, 400, "labels"),
        ({"points": [], "labels": []}, 400, "at least one point or a box"),
        ({"points": [[1, "x"]], "labels": [1]}, 422, "malformed request"),
        ({"box": [1, 2, 3]}, 400, "box must be"),
        (b'{"points": [[1e999, 2]], "labels": [1]}', 400, "NaN or infinite"),
        (b'{"points": [[NaN, 2]], "labels": [1]}', 400, "NaN or infinite"),
    ],
)
def test_malformed_prompts_get_json_errors(predictor, body, status, message):
    client, _ = client_for(predictor)
    image_id = upload(client, png_bytes(noise_image(3))).json()["image_id"]
    url = f"/api/images/{image_id}/predict"
    if isinstance(body, bytes):  # JSON the client would refuse to write
        response = client.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(url, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_image_and_non_json_body(predictor):
    client, _ = client_for(predictor)
    response = client.post("/api/images/nope/predict", json={"points": [[1, 2]], "labels": [1]})
    assert response.status_code == 404 and "upload it again" in response.json()["error"]
    image_id = upload(client, png_bytes(noise_image(4))).json()["image_id"]
    response = client.post(
        f"/api/images/{image_id}/predict",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422 and "malformed" in response.json()["error"]


def test_concurrent_requests_on_different_images(predictor):
    client, _ = client_for(predictor)
    images = [noise_image(10 + k) for k in range(2)]
    ids = [upload(client, png_bytes(im)).json()["image_id"] for im in images]
    prompts = [[[30, 40]], [[100, 20]], [[64, 64]]]

    def ask(image_id, point):
        response = client.post(
            f"/api/images/{image_id}/predict", json={"points": point, "labels": [1]}
        )
        assert response.status_code == 200
        return decode_mask(response.json()["mask_png"])

    expected = {(i, k): ask(ids[i], p) for i in range(2) for k, p in enumerate(prompts)}
    got, errors = {}, []

    def worker(i: int) -> None:
        try:
            for _ in range(2):
                for k, p in enumerate(prompts):
                    got[(i, k)] = ask(ids[i], p)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, mask in expected.items():
        np.testing.assert_array_equal(got[key], mask)


def test_cache_evicts_the_least_recently_used_image(predictor):
    per_image = EMBEDDING_BYTES + 96 * 128 * 3
    client, service = client_for(predictor, cache_bytes=2 * per_image + 10)
    a, b, c = (upload(client, png_bytes(noise_image(20 + k))).json()["image_id"] for k in range(3))
    assert a not in service.cache and b in service.cache and c in service.cache
    point = {"points": [[5, 5]], "labels": [1]}
    assert client.post(f"/api/images/{a}/predict", json=point).status_code == 404
    assert client.post(f"/api/images/{b}/predict", json=point).status_code == 200  # b is fresh
    upload(client, png_bytes(noise_image(20)))  # a again: c is now the oldest
    assert a in service.cache and b in service.cache and c not in service.cache
    assert service.cache.nbytes <= service.cache.max_bytes


def test_everything_returns_annotations_and_an_overlay(predictor):
    client, _ = client_for(predictor)
    image_id = upload(client, png_bytes(noise_image(5))).json()["image_id"]
    body = client.post(f"/api/images/{image_id}/everything").json()
    assert body["count"] == len(body["annotations"])
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.size == (128, 96)


def test_page_and_openapi_are_served(predictor):
    client, _ = client_for(predictor)
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/images", "/api/images/{image_id}/predict"} <= set(paths)


def test_onnx_backend_serves_two_images_alternately(onnx_dir):
    from tinysam.runtime import OnnxPredictor

    client, service = client_for(OnnxPredictor(onnx_dir, threads=2))
    images = [noise_image(30), noise_image(31)]
    ids = [upload(client, png_bytes(im)).json()["image_id"] for im in images]
    direct = OnnxPredictor(onnx_dir, threads=2)
    for image_id, image in [*zip(ids, images), *zip(ids, images)]:
        body = client.post(
            f"/api/images/{image_id}/predict", json={"points": [[40, 30]], "labels": [1]}
        ).json()
        direct.set_image(image)
        masks, scores, _ = direct.predict(
            point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1.0])
        )
        np.testing.assert_array_equal(decode_mask(body["mask_png"]), masks[np.argmax(scores)])
    assert len(service.cache) == 2


def test_serve_cli_refuses_a_busy_port(capsys):
    import socket

    from tinysam.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--port", "70000"]) == 2


# ---------------------------------------------------------------------------- a real server
# `tinysam serve` started as users start it, on 127.0.0.1, with small limits.


def start_server(checkpoint, *options) -> tuple:
    return start_tinysam("serve", checkpoint, "/api/health", *options)


def call(port: int, method: str, path: str, body: bytes = b"", headers=None, timeout=60.0):
    """(status, JSON answer) over a fresh connection."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def post_json(port: int, path: str, payload) -> tuple[int, dict]:
    import json

    body = json.dumps(payload).encode()
    return call(port, "POST", path, body, {"Content-Type": "application/json"})


def post_image(port: int, data: bytes) -> tuple[int, dict]:
    boundary = "tinysamtestboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return call(port, "POST", "/api/images", body, headers)


@pytest.fixture(scope="module")
def server(vit_t_checkpoint):
    process, port = start_server(
        vit_t_checkpoint,
        "--max-points", "50", "--max-upload-mb", "1", "--max-pixels", "4000000",
        "--busy-timeout", "3", "--everything-points", "32",
    )  # fmt: skip
    yield port
    stop_server(process)


def test_a_gone_clients_heavy_request_does_not_delay_clicks(server, golden):
    """An everything request whose client disconnects is abandoned at its next batch, and a
    click meanwhile answers within the configured bound (--busy-timeout 3)."""
    import http.client
    import time

    status, info = post_image(server, (golden / "images" / "picture2.jpg").read_bytes())
    assert status == 200
    image_id = info["image_id"]
    click = {"points": [[200, 150]], "labels": [1]}
    assert post_json(server, f"/api/images/{image_id}/predict", click)[0] == 200  # warm

    heavy = http.client.HTTPConnection("127.0.0.1", server, timeout=0.5)
    heavy.request("POST", f"/api/images/{image_id}/everything")
    with pytest.raises(TimeoutError):
        heavy.getresponse()  # still working after 0.5 s ...
    heavy.close()  # ... and the client gives up
    start = time.monotonic()
    status, answer = post_json(server, f"/api/images/{image_id}/predict", click)
    waited = time.monotonic() - start
    assert status == 200 and answer["area"] > 0
    assert waited < 3.0, f"a click waited {waited:.1f} s behind abandoned work"
    for _ in range(100):  # the everything run notices within one batch
        health = call(server, "GET", "/api/health")[1]
        if health["cancelled"] >= 1 and not health["busy"]:
            break
        time.sleep(0.2)
    assert health["cancelled"] >= 1 and not health["busy"], health


def read_until_closed(sock) -> str:
    """The server's whole answer on a raw socket that it closes (bounded: 1 MiB)."""
    reply = b""
    while len(reply) < 1 << 20 and (data := sock.recv(65536)):
        reply += data
    return reply.decode()


def test_prompt_and_body_limits_answer_before_any_work(server):
    import socket
    import time

    status, info = post_image(server, png_bytes(noise_image(21)))
    url = f"/api/images/{info['image_id']}/predict"
    status, answer = post_json(server, url, {"points": [[1, 1]] * 51, "labels": [1] * 51})
    assert status == 422 and "at most 50" in answer["error"]
    many = {"points": [[1.5, 2.5]] * 12000, "labels": [1] * 12000}  # ~170 KB of JSON
    status, answer = post_json(server, url, many)
    assert status == 413 and "limit of 65536" in answer["error"]
    status, answer = post_json(server, url, {"points": [[1, 1]], "labels": [7]})
    assert status == 400 and "labels must be 1" in answer["error"]

    # A declared 10 GB upload with a short body: refused at once, connection closed.
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(
            b"POST /api/images HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 10000000000\r\n\r\n--b\r\n"
        )
        reply = read_until_closed(sock)
        assert reply.startswith("HTTP/1.1 413") and "over the server's limit" in reply
        assert time.monotonic() - start < 10
    # Chunked (no declared length): reading stops at the limit (1 MiB + framing).
    with socket.create_connection(("127.0.0.1", server), timeout=20) as sock:
        sock.sendall(
            b"POST /api/images HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"\0" * 65536
        sent = 0
        try:
            while sent < 8 << 20:  # bounded: 8 MiB at most
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server answered and closed: expected
            pass
        reply = read_until_closed(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert call(server, "GET", "/api/health")[0] == 200  # still serving


def test_uploads_of_odd_images(server):
    from tests.test_io import bomb_png

    status, info = post_image(server, png_bytes(np.full((1, 5000, 3), 200, np.uint8)))
    assert status == 200 and (info["width"], info["height"]) == (5000, 1)
    status, answer = post_json(
        server, f"/api/images/{info['image_id']}/predict", {"points": [[10, 0]], "labels": [1]}
    )
    assert status == 200 and (answer["width"], answer["height"]) == (5000, 1)
    for bomb in (bomb_png(30000, 30000), bomb_png(3000, 2000, 8, 2)):
        status, answer = post_image(server, bomb)
        assert status == 413 and "more than the limit" in answer["error"]
    status, answer = post_image(server, b"GIF89a not really")
    assert status == 415


def test_sigterm_stops_the_server_during_heavy_work(vit_t_checkpoint, golden):
    import contextlib
    import signal
    import threading
    import time

    process, port = start_server(vit_t_checkpoint, "--everything-points", "64")
    try:
        _, info = post_image(port, (golden / "images" / "picture2.jpg").read_bytes())

        def everything() -> None:
            with contextlib.suppress(OSError):  # the server goes away mid-request
                call(port, "POST", f"/api/images/{info['image_id']}/everything")

        threading.Thread(target=everything, daemon=True).start()
        for _ in range(100):
            if call(port, "GET", "/api/health")[1]["busy"]:
                break
            time.sleep(0.1)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        assert time.monotonic() - start < 10, "shutdown waited on the everything run"
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_listening_address_is_named_correctly():
    from tinysam.cli.serve import is_loopback, url

    assert url("::", 8000) == "http://[::]:8000/" and url("::1", 80) == "http://[::1]:80/"
    assert url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
