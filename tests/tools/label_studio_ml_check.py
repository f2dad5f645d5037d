"""``TinySAMBackend`` (a ``LabelStudioMLBase`` subclass) served by label-studio-ml's own Flask
app (``label_studio_ml.api.init_app``): Label Studio's keypoint and rectangle payloads, decoded
with Label Studio's RLE decoder, against SamPredictor. label-studio-ml 2.x is not on PyPI:

    pip install "label-studio-ml @ git+https://github.com/HumanSignal/label-studio-ml-backend"
    export TINYSAM_CHECKPOINT=tests/golden/vit_t_seed0_checkpoint.pth
    python tests/tools/label_studio_ml_check.py
"""

import base64
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from label_studio_ml.api import init_app
from label_studio_sdk.converter import brush
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from test_label_studio import CONFIG, keypoint, predict_request, rectangle  # noqa: E402

from tinysam import SamPredictor, sam_model_registry  # noqa: E402
from tinysam.integrations.label_studio_ml import TinySAMBackend  # noqa: E402
from tinysam.io import load_image  # noqa: E402


def main() -> None:
    os.chdir(tempfile.mkdtemp())  # label-studio-ml keeps its cache.db in the working folder
    image = load_image(TESTS / "golden" / "images" / "picture1.jpg")
    h, w = image.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = init_app(model_class=TinySAMBackend).test_client()
    print("health", client.get("/health").json)
    setup = {"project": "1.1", "schema": CONFIG, "hostname": "", "access_token": ""}
    print("setup", client.post("/setup", json=setup).json)

    model = sam_model_registry["vit_t"](checkpoint=os.environ["TINYSAM_CHECKPOINT"])
    predictor = SamPredictor(model)
    predictor.set_image(image)
    click = {"point_coords": np.array([[0.475 * w, 0.292 * h]]), "point_labels": np.array([1])}
    box = {"box": np.array([0.195 * w, 0.13 * h, 0.78 * w, 0.844 * h])}
    cases = [
        ("keypoint", [keypoint(47.5, 29.2, True, w, h)], click),
        ("rectangle", [rectangle(19.5, 13.0, 58.5, 71.4, w, h)], box),
    ]
    failed = False
    for name, regions, prompt in cases:
        response = client.post("/predict", json=predict_request(regions, image_url=url))
        region = response.json["results"][0]["result"][0]
        got = brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
        masks, scores, _ = predictor.predict(**prompt)
        want = masks[int(np.argmax(scores))]
        differing = int((got != want).sum())
        failed |= differing > 0.001 * got.size
        print(name, response.status_code, region["value"]["brushlabels"], "differing", differing)
    response = client.post("/predict", json=predict_request(None, image_url=url))
    print("no context", response.status_code, response.json)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
