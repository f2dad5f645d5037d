"""X-AnyLabeling and CVAT: the files ``tinysam export --format x-anylabeling|cvat`` writes,
used the way each tool uses them, give the mask ``tinysam segment`` gives.

X-AnyLabeling (``sam_onnx.py`` of x-anylabeling-cvhub 4.2): the image drawn on a 684x1024
canvas, fed as HxWx3 float32 0..255; the decoder gets the click plus a padding point and
``orig_im_size`` = the canvas; mask 0 > 0 is the object. The slow test runs X-AnyLabeling's
own loading code in a virtual environment (it needs PyQt6).

CVAT (``serverless/pytorch/facebookresearch/sam/nuclio/main.py`` and
``cvat-ui/plugins/sam``): the function gets ``{"image": base64}`` and returns ``{"blob":
base64 float32}``; the browser decoder gets the clicks scaled to the 1024 frame (box corners
labelled 2, 3 first, no padding point) and returns a uint8 mask cropped to ``xtl..xbr``,
``ytl..ybr``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, run_cli

ort = pytest.importorskip("onnxruntime")
CANVAS = (684, 1024)


@pytest.fixture(scope="module")
def canvas_image(golden_image) -> np.ndarray:
    """An image exactly X-AnyLabeling's canvas size, so its warp is the identity."""
    resized = Image.fromarray(golden_image).resize(CANVAS[::-1], Image.BILINEAR)
    return np.asarray(resized)


def export_for(tool: str, checkpoint: Path, out: Path) -> Path:
    """``tinysam export --format TOOL`` into ``out``."""
    from tinysam.cli import main

    argv = ["export", "--format", tool, "--out-dir", str(out), "--checkpoint", str(checkpoint)]
    assert main(argv) in (0, None)
    return out


@pytest.fixture(scope="module")
def anylabeling_dir(vit_t_checkpoint, tmp_path_factory) -> Path:
    return export_for("x-anylabeling", vit_t_checkpoint, tmp_path_factory.mktemp("xal"))


@pytest.fixture(scope="module")
def cvat_dir(vit_t_checkpoint, tmp_path_factory) -> Path:
    return export_for("cvat", vit_t_checkpoint, tmp_path_factory.mktemp("cvat"))


def best_mask(model, image, points=None, labels=None, box=None, multimask=True) -> np.ndarray:
    """What ``tinysam segment`` writes for these prompts."""
    from tinysam import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=None if points is None else np.asarray(points, float),
        point_labels=None if labels is None else np.asarray(labels, float),
        box=None if box is None else np.asarray(box, float),
        multimask_output=multimask,
    )
    return masks[int(np.argmax(scores))]


# The X-AnyLabeling export takes ~40 s (two graphs), so its tests run with the slow ones,
# beside the check through X-AnyLabeling's own code.
@pytest.mark.slow
def test_anylabeling_files_and_config(anylabeling_dir):
    names = sorted(p.name for p in anylabeling_dir.iterdir())
    assert names == [
        "tinysam_vit_t.decoder.onnx",
        "tinysam_vit_t.encoder.onnx",
        "tinysam_vit_t.yaml",
    ]
    config = dict(
        line.split(": ", 1)
        for line in (anylabeling_dir / "tinysam_vit_t.yaml").read_text().splitlines()
    )
    # SegmentAnything.Meta.required_config_names, and the sizes it reads.
    assert config["type"] == "segment_anything"
    for key in ("name", "display_name", "input_size", "max_width", "max_height"):
        assert config[key]
    assert (anylabeling_dir / config["encoder_model_path"]).is_file()
    assert (anylabeling_dir / config["decoder_model_path"]).is_file()
    encoder = ort.InferenceSession(str(anylabeling_dir / config["encoder_model_path"]))
    assert encoder.get_inputs()[0].shape == [*CANVAS, 3]
    decoder = ort.InferenceSession(str(anylabeling_dir / config["decoder_model_path"]))
    assert {i.name for i in decoder.get_inputs()} == {
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
        "orig_im_size",
    }  # fmt: skip


def anylabeling_mask(folder: Path, image: np.ndarray, point) -> np.ndarray:
    """X-AnyLabeling's call sequence for an image of the canvas size (identity warp)."""
    encoder = ort.InferenceSession(str(folder / "tinysam_vit_t.encoder.onnx"))
    decoder = ort.InferenceSession(str(folder / "tinysam_vit_t.decoder.onnx"))
    name = encoder.get_inputs()[0].name
    embedding = encoder.run(None, {name: image.astype(np.float32)})[0]
    feeds = {
        "image_embeddings": embedding,
        "point_coords": np.array([[point, [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(CANVAS, np.float32),
    }
    masks = decoder.run(None, feeds)[0]
    return masks[0][0] > 0.0


@pytest.mark.slow
def test_anylabeling_click_gives_the_segment_mask(anylabeling_dir, canvas_image, vit_t_model):
    point = [480, 300]
    want = best_mask(vit_t_model, canvas_image, [point], [1])
    got = anylabeling_mask(anylabeling_dir, canvas_image, point)
    assert want.any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_anylabeling_loads_the_export_with_its_own_code(
    anylabeling_dir, canvas_image, vit_t_model, tmp_path
):
    """X-AnyLabeling itself (x-anylabeling-cvhub from PyPI, headless Qt) in its own venv."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinysam-tests"
    venv = cache / "x-anylabeling-4.2.1"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "x-anylabeling-cvhub==4.2.1",
             "onnxruntime", "onnx"],
            check=True, timeout=1500,
        )  # fmt: skip
    image = tmp_path / "canvas.png"
    Image.fromarray(canvas_image).save(image)
    out = tmp_path / "mask.npy"
    probe = Path(__file__).parent / "tools" / "anylabeling_probe.py"
    subprocess.run(
        [str(python), str(probe), str(anylabeling_dir / "tinysam_vit_t.yaml"), str(image),
         "480", "300", str(out)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    np.testing.assert_array_equal(
        np.load(out), best_mask(vit_t_model, canvas_image, [[480, 300]], [1])
    )


# --- CVAT -------------------------------------------------------------------------------------


def cvat_feeds(clicks, labels, height: int, width: int) -> dict:
    """The browser plug-in's ``modelData``: clicks times 1024 / the long side, no padding."""
    scale = 1024 / max(height, width)
    return {
        "image_embeddings": None,
        "point_coords": (np.array([clicks], np.float32) * scale).astype(np.float32),
        "point_labels": np.array([labels], np.float32),
        "orig_im_size": np.array([height, width], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
    }


def assert_same_mask(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for float noise: ONNX Runtime's logits differ from torch's in the last bits,
    so a few pixels sitting on the 0 threshold may flip (54 of 592,130 here)."""
    assert got.shape == want.shape and want.any()
    assert (got != want).mean() < 1e-3, (got != want).sum()


def cvat_mask(decoder, embedding, clicks, labels, height, width) -> np.ndarray:
    """Decode as the plug-in does and paint the cropped mask back at its bounds."""
    feeds = cvat_feeds(clicks, labels, height, width)
    feeds["image_embeddings"] = embedding
    out = dict(zip([o.name for o in decoder.get_outputs()], decoder.run(None, feeds)))
    crop = out["masks"][0, 0]
    assert crop.dtype == np.uint8 and set(np.unique(crop)) <= {0, 255}
    xtl, ytl, xbr, ybr = (int(out[k][0]) for k in ("xtl", "ytl", "xbr", "ybr"))
    assert crop.shape == (ybr - ytl + 1, xbr - xtl + 1)
    full = np.zeros((height, width), bool)
    full[ytl : ybr + 1, xtl : xbr + 1] = crop > 0
    return full


@pytest.fixture(scope="module")
def nuclio_platform(vit_t_checkpoint):
    nuclio_sdk = pytest.importorskip("nuclio_sdk")
    from nuclio_sdk.test import Platform

    saved = {key: os.environ.get(key) for key in ("TINYSAM_CHECKPOINT", "TINYSAM_THREADS")}
    os.environ["TINYSAM_CHECKPOINT"] = str(vit_t_checkpoint)
    os.environ["TINYSAM_THREADS"] = "2"
    yield nuclio_sdk, Platform()  # it runs the module's init_context first
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def call_function(nuclio_platform, body):
    from tinysam.integrations import cvat

    nuclio_sdk, platform = nuclio_platform
    event = nuclio_sdk.Event(body=body, content_type="application/json", method="POST")
    response = platform.call_handler(cvat.handler, event)
    return response.status_code, json.loads(response.body)


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_cvat_function_returns_the_embedding(nuclio_platform, golden_image, predictor):
    status, answer = call_function(nuclio_platform, {"image": png_b64(golden_image)})
    assert status == 200, answer
    blob = np.frombuffer(base64.b64decode(answer["blob"]), "<f4").reshape(1, 256, 64, 64)
    want = predictor.get_image_embedding().numpy()
    np.testing.assert_allclose(blob, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{broken", "not JSON"),
        ({"frame": 0}, '"image"'),
        ({"image": 42}, '"image"'),
        ({"image": "@@not base64@@"}, "not valid base64"),
        ({"image": ""}, "empty"),
        ({"image": base64.b64encode(b"GIF89a but not").decode()}, "not an image"),
    ],
)
def test_cvat_function_refuses_bad_requests(nuclio_platform, body, message):
    status, answer = call_function(nuclio_platform, body)
    assert status == 400 and message in answer["error"]


def test_cvat_decoder_gives_the_segment_mask(cvat_dir, golden_image, vit_t_model, predictor):
    decoder = ort.InferenceSession(str(cvat_dir / "decoder.onnx"))
    embedding = predictor.get_image_embedding().numpy()
    h, w = golden_image.shape[:2]
    one_click = cvat_mask(decoder, embedding, [[365, 225]], [1], h, w)
    want = best_mask(vit_t_model, golden_image, [[365, 225]], [1])
    assert_same_mask(one_click, want)
    box = cvat_mask(decoder, embedding, [[150, 100], [600, 650]], [2, 3], h, w)
    assert_same_mask(box, best_mask(vit_t_model, golden_image, box=[150, 100, 600, 650]))
    # Three points or more: segment-anything's single-mask rule takes the single-mask output.
    points = [[365, 225], [100, 600]]
    got = cvat_mask(decoder, embedding, points, [1, 0], h, w)
    assert_same_mask(got, best_mask(vit_t_model, golden_image, points, [1, 0], multimask=False))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.17.3", "1.30.0"])
def test_cvat_decoder_runs_in_onnxruntime_web(cvat_dir, predictor, golden_image, tmp_path, version):
    """The browser's runtime (onnxruntime-web, WebAssembly, in Node) loads the decoder and
    gives what ONNX Runtime gives; 1.17 refuses ONNX IR 10, so the file says IR 9."""
    import shutil

    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("this check needs Node.js and npm (the machine image has them)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinysam-tests"
    package = cache / f"onnxruntime-web-{version}"
    if not (package / "node_modules" / "onnxruntime-web").is_dir():
        package.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--prefix", str(package), f"onnxruntime-web@{version}"],
            check=True, timeout=600,
        )  # fmt: skip
    embedding = predictor.get_image_embedding().numpy().astype("<f4")
    (tmp_path / "embedding.bin").write_bytes(embedding.tobytes())
    h, w = golden_image.shape[:2]
    scale = 1024 / max(h, w)
    spec = {"coords": [[365 * scale, 225 * scale]], "labels": [1], "size": [h, w]}
    (tmp_path / "feeds.json").write_text(json.dumps(spec))
    script = Path(__file__).parent / "tools" / "ort_web_decode.cjs"
    run = subprocess.run(
        ["node", str(script), str(cvat_dir / "decoder.onnx"), str(tmp_path / "embedding.bin"),
         str(tmp_path / "feeds.json")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "NODE_PATH": str(package / "node_modules")},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    web = json.loads(run.stdout)
    decoder = ort.InferenceSession(str(cvat_dir / "decoder.onnx"))
    feeds = cvat_feeds([[365, 225]], [1], h, w)
    feeds["image_embeddings"] = embedding
    out = dict(zip([o.name for o in decoder.get_outputs()], decoder.run(None, feeds)))
    assert web["type"] == "uint8" and web["dims"] == list(out["masks"].shape)
    assert web["bounds"] == [int(out[k][0]) for k in ("xtl", "ytl", "xbr", "ybr")]
    assert abs(web["inside"] - int((out["masks"] > 0).sum())) <= 0.001 * out["masks"].size


def test_cvat_crop_of_an_empty_mask_is_all_zero():
    from onnx import TensorProto, helper

    from tinysam.integrations.cvat import add_cropped_mask

    graph = helper.make_graph(
        [helper.make_node("Identity", ["logits"], ["masks"]),
         helper.make_node("Identity", ["iou"], ["iou_predictions"]),
         helper.make_node("Identity", ["iou"], ["low_res_masks"])],
        "t",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 5, 7]),
         helper.make_tensor_value_info("iou", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("masks", "iou_predictions", "low_res_masks")],
    )  # fmt: skip
    model = add_cropped_mask(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    session = ort.InferenceSession(model.SerializeToString())
    logits = -np.ones((1, 1, 5, 7), np.float32)
    masks, _, _, xtl, ytl, xbr, ybr = session.run(
        None, {"logits": logits, "iou": np.zeros((1, 1), np.float32)}
    )
    assert not masks.any()
    logits[0, 0, 1:3, 2:6] = 1.0
    masks, _, _, xtl, ytl, xbr, ybr = session.run(
        None, {"logits": logits, "iou": np.zeros((1, 1), np.float32)}
    )
    assert (int(xtl[0]), int(ytl[0]), int(xbr[0]), int(ybr[0])) == (2, 1, 5, 2)
    assert masks.shape == (1, 1, 2, 4) and (masks == 255).all()


def test_cvat_function_folder(cvat_dir):
    names = {p.name for p in cvat_dir.iterdir()}
    assert names == {"decoder.onnx", "function.yaml", "main.py", "vit_t_seed0_checkpoint.pth"}
    text = (cvat_dir / "function.yaml").read_text()
    assert "name: pth-facebookresearch-sam-vit-h" in text and "type: interactor" in text
    assert "handler: main:handler" in text
    assert (
        "from tinysam.integrations.cvat import handler, init_context"
        in (cvat_dir / "main.py").read_text()
    )


def test_export_format_is_checked(capsys):
    code, _, err = run_cli(capsys, "export", "--format", "labelme", "--out-dir", "x")
    assert code == 2 and "--format" in one_error_line(err, "export")
