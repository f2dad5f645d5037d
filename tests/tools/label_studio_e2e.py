"""End to end with a real Label Studio server: a project created through its API, an image
task uploaded, ``tinysam label-studio`` connected as its ML backend (Label Studio itself calls
/health and /setup), and an interactive prediction requested through Label Studio's API
(``POST /api/ml/{id}/interactive-annotating``, what its labeling screen calls on a click).
The brush mask that comes back is decoded and compared with ``tinysam segment``'s.

    python tests/tools/label_studio_e2e.py LS_URL TOKEN BACKEND_URL CHECKPOINT IMAGE X Y \
        [SCREENSHOT.png USER PASSWORD]

With a screenshot path (and the Label Studio login), the answer is also stored as a prediction
and Label Studio's editor, opened in headless Chromium (playwright), is captured showing it.

Label Studio must be running with the legacy token TOKEN (``label-studio start
--user-token TOKEN --enable-legacy-api-token``) and, for a backend on 127.0.0.1, with
``SSRF_PROTECTION_ENABLED=false`` (it refuses private addresses otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from label_studio_sdk.converter import brush
from PIL import Image

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true"/>
  </KeyPointLabels>
</View>"""


def api(base: str, token: str, method: str, path: str, body=None, files=None) -> dict:
    headers = {"Authorization": f"Token {token}"}
    data = None
    if files is not None:
        boundary = uuid.uuid4().hex
        name, content = files
        data = (
            (
                f"--{boundary}\r\nContent-Disposition: form-data; "
                f'name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read() or b"null")


def main() -> None:
    base, token, backend, checkpoint, image, x, y = sys.argv[1:8]
    x, y = float(x), float(y)
    project = api(
        base, token, "POST", "/api/projects", {"title": "tinysam e2e", "label_config": CONFIG}
    )
    print("project", project["id"])
    imported = api(
        base, token, "POST", f"/api/projects/{project['id']}/import",
        files=(Path(image).name, Path(image).read_bytes()),
    )  # fmt: skip
    task_id = imported["task_ids"][0] if imported.get("task_ids") else None
    if task_id is None:
        tasks = api(base, token, "GET", f"/api/tasks?project={project['id']}")
        task_id = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]
    task = api(base, token, "GET", f"/api/tasks/{task_id}")
    print("task", task_id, task["data"]["image"])
    ml = api(
        base, token, "POST", "/api/ml",
        {"project": project["id"], "url": backend, "title": "tinysam", "is_interactive": True},
    )  # fmt: skip
    print("ml backend", ml["id"], ml.get("state"))
    width, height = Image.open(image).size
    context = {
        "result": [
            {
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {"x": x * 100 / width, "y": y * 100 / height, "width": 0.5,
                          "keypointlabels": ["Object"]},
                "is_positive": True,
                "id": "e2e1",
                "from_name": "tag2",
                "to_name": "image",
                "type": "keypointlabels",
                "origin": "manual",
            }
        ]
    }  # fmt: skip
    answer = api(
        base, token, "POST", f"/api/ml/{ml['id']}/interactive-annotating",
        {"task": task_id, "context": context},
    )  # fmt: skip
    region = answer["data"]["result"][0]
    got = brush.decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "mask.png"
        subprocess.run(
            ["tinysam", "segment", image, "--point", f"{x},{y}", "--out", str(out),
             "--checkpoint", checkpoint],
            check=True, capture_output=True,
        )  # fmt: skip
        want = np.asarray(Image.open(out)) > 0
    print(
        json.dumps(
            {
                "region_type": region["type"],
                "labels": region["value"]["brushlabels"],
                "mask_pixels": int(got.sum()),
                "segment_pixels": int(want.sum()),
                "differing_pixels": int((got != want).sum()),
            }
        )
    )
    if len(sys.argv) > 10:
        api(
            base, token, "POST", "/api/predictions",
            {"task": task_id, "result": [region], "score": answer["data"]["score"],
             "model_version": region_version(answer)},
        )  # fmt: skip
        screenshot(base, project["id"], task_id, *sys.argv[8:11])
    # The click goes through percent and back, so its last bits change: a pixel or two on the
    # 0 threshold may flip.
    sys.exit(0 if (got != want).mean() < 1e-3 else 1)


def region_version(answer: dict) -> str:
    return answer["data"].get("model_version") or "tinysam"


def screenshot(base: str, project: int, task: int, path: str, user: str, password: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(base + "/user/login/")
        page.fill("input[name=email]", user)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{base}/projects/{project}/data?task={task}")
        page.wait_for_timeout(8000)
        page.get_by_text("tinysam-").first.click()  # the prediction's tab
        page.mouse.move(1300, 850)
        page.wait_for_timeout(3000)
        page.screenshot(path=path)
        browser.close()
    print("screenshot", path)


if __name__ == "__main__":
    main()
