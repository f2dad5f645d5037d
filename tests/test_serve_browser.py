"""The demo page in a real headless browser (Debian's chromium, driven by Playwright): open a
golden image, click, see the mask drawn on a screenshot, then run Everything.

``.ci/run`` installs chromium; elsewhere set ``TINYSAM_CHROMIUM`` or install it
(``apt-get install chromium``). ``TINYSAM_SCREENSHOT=PATH`` keeps the screenshot (the README's
``docs/serve.png`` is made this way).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra: pip install 'tinysam[serve]'")
pytest.importorskip("playwright", reason="playwright: pip install playwright")

MASK_RGB = np.array([30, 144, 255], np.float32)  # index.html's MASK_COLOR
MASK_ALPHA = 140 / 255
CLICK = (300, 200)


def chromium_path() -> str:
    path = os.environ.get("TINYSAM_CHROMIUM") or shutil.which("chromium")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium not found: .ci/run should have installed it")
        pytest.skip("chromium not installed (apt-get install chromium, or set TINYSAM_CHROMIUM)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(vit_t_checkpoint):
    import uvicorn

    from tinysam import SamPredictor, build_sam_vit_t
    from tinysam.serve.app import create_app
    from tinysam.serve.service import DemoService

    service = DemoService(
        SamPredictor(build_sam_vit_t(vit_t_checkpoint).eval()), everything_points=8
    )
    port = free_port()
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="error")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        if time.time() > deadline:
            pytest.fail("the demo server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    uv.should_exit = True
    thread.join(timeout=10)


def test_click_draws_a_mask_then_everything(server, golden, tmp_path):
    from playwright.sync_api import sync_playwright

    from tinysam.io import load_image

    url, service = server
    image_path = golden / "images" / "picture1.jpg"
    image = load_image(image_path).astype(np.float32)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.set_input_files("#file", str(image_path))
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('ready')", timeout=60_000
        )
        canvas = page.locator("#canvas")
        box = canvas.bounding_box()
        assert box["width"] == 769  # drawn 1:1, so screenshot pixels are image pixels
        canvas.click(position={"x": CLICK[0], "y": CLICK[1]})
        page.wait_for_function("document.getElementById('canvas').dataset.maskArea", timeout=60_000)
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"), np.float32)

        # The mask the server computed for that click: tinted inside, untouched outside.
        (image_id,) = service.cache._items
        mask = _decode(service.predict(image_id, [list(CLICK)], [1], None, True)["mask_png"])
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        far = np.hypot(xx - CLICK[0], yy - CLICK[1]) > 20  # away from the drawn click marker
        shot = shot[: mask.shape[0], : mask.shape[1]]  # the element box may round up a pixel
        inside, outside = mask & far, ~mask & far
        assert inside.sum() > 1000 and outside.sum() > 1000
        expected = image * (1 - MASK_ALPHA) + MASK_RGB * MASK_ALPHA

        def close(a: np.ndarray, b: np.ndarray) -> float:
            """Share of pixels within 8 levels (the browser's JPEG decoder and the edges of
            textures differ from Pillow's by a few levels, rarely more)."""
            return float((np.abs(a - b).max(axis=1) <= 8).mean())

        assert close(shot[inside], expected[inside]) > 0.9
        assert close(shot[outside], image[outside]) > 0.9
        assert close(shot[inside], image[inside]) < 0.1  # visibly tinted

        page.click("#everything")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('everything:')",
            timeout=120_000,
        )
        assert page.locator("#canvas").get_attribute("data-everything") is not None
        assert page.locator("#download-coco").is_enabled()
        keep = os.environ.get("TINYSAM_SCREENSHOT")
        if keep:
            page.click("#clear")
            canvas.click(position={"x": CLICK[0], "y": CLICK[1]})
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('mask')"
            )
            page.screenshot(path=keep)
        browser.close()


def _decode(b64: str) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


def test_screenshot_in_docs_exists():
    assert (Path(__file__).resolve().parents[1] / "docs" / "serve.png").is_file()
