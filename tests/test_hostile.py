"""Hostile input at the two boundaries users reach: the command line and the web API.

Each row is one thing a careless user or an attacker can send, and what must come back: at the
command line a single ``tinysam CMD: error: ...`` line and exit status 2 (never a traceback,
never exit 0 with a wrong answer); over HTTP a 4xx status with a JSON ``{"error": ...}``. The
modules' own tests cover the same code paths in depth (formats of structured files, folders,
limits of a real server); this table keeps the count of cases visible in one place.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, one_error_line, run_cli

SAMPLE = REPO / "assets" / "picture1.jpg"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def _bomb(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG header claiming WxH pixels, with nothing behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))


def segment_fails(capsys, tmp_path, words: str, *argv) -> None:
    """``tinysam segment ARGV``: one error line containing ``words``, exit 2, nothing written."""
    code, out, err = run_cli(capsys, "segment", *argv, "--out", tmp_path / "m.png")
    assert code == 2 and out == ""
    assert words in one_error_line(err, "segment")
    assert not (tmp_path / "m.png").exists()


# --------------------------------------------------------------------------- files on disk
# name -> (how to make it in a folder, words the error must contain)
IMAGE_FILES = {
    "missing": (None, "image not found"),
    "directory": (lambda p: p.mkdir(), "is not a file"),
    "broken_link": (lambda p: p.symlink_to(p.parent / "gone.png"), "broken symbolic link"),
    "empty": (lambda p: p.write_bytes(b""), "is not an image"),
    "text": (lambda p: p.write_text("hello"), "is not an image"),
    "truncated": (
        lambda p: p.write_bytes(_png(np.full((64, 64, 3), 7, np.uint8))[:70]),
        "truncated",
    ),
    "bomb_900M_1bit": (lambda p: p.write_bytes(_bomb(30000, 30000)), "more than the limit"),
    "bomb_120M_rgb": (lambda p: p.write_bytes(_bomb(12000, 10000, 8, 2)), "120000000 pixels"),
    "float_out_of_range": (
        lambda p: p.write_bytes(_tiff(np.full((8, 8), 300.0, np.float32))),
        "only 0..1 floats",
    ),
    "float_nan": (
        lambda p: p.write_bytes(_tiff(np.full((8, 8), np.nan, np.float32))),
        "NaN or infinite",
    ),
    "int32_negative": (
        lambda p: p.write_bytes(_tiff(np.full((8, 8), -5, np.int32))),
        "outside 0..65535",
    ),
}


@pytest.mark.parametrize("case", sorted(IMAGE_FILES))
def test_segment_refuses_bad_image_files(capsys, tmp_path, vit_t_checkpoint, case):
    make, words = IMAGE_FILES[case]
    path = tmp_path / f"{case}.png"
    if make is not None:
        make(path)
    segment_fails(capsys, tmp_path, words, path, "--point", "1,1", "--checkpoint", vit_t_checkpoint)


# name -> (argv after `segment SAMPLE`, words)
PROMPTS = {
    "nan_point": (["--point", "nan,3"], "point must be"),
    "inf_point": (["--point", "1,inf"], "point must be"),
    "label_minus_one": (["--point", "10,10,-1"], "LABEL must be 1"),
    "label_seven": (["--point", "10,10,7"], "LABEL must be 1"),
    "label_half": (["--point", "10,10,0.5"], "LABEL must be 1"),
    "point_four_numbers": (["--point", "1,2,1,4"], "X,Y or X,Y,LABEL"),
    "point_outside": (["--point", "5000,10"], "outside the 769x770 image"),
    "negative_point": (["--point=-3,10"], "outside the 769x770 image"),
    "box_reversed": (["--box", "600,100,150,650"], "x0 <= x1"),
    "box_three_numbers": (["--box", "1,2,3"], "box must be X0,Y0,X1,Y1"),
    "box_nan": (["--box", "1,2,nan,4"], "box must be"),
    "no_prompt": ([], "give at least one --point or a --box"),
    "max_pixels_zero": (["--point", "1,1", "--max-pixels", "0"], "--max-pixels must be at least 1"),
    "max_pixels_small": (["--point", "1,1", "--max-pixels", "100"], "more than the limit of 100"),
    "threads_zero": (["--point", "1,1", "--threads", "0"], "--threads must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_segment_refuses_bad_prompts(capsys, tmp_path, vit_t_checkpoint, case):
    argv, words = PROMPTS[case]
    segment_fails(capsys, tmp_path, words, SAMPLE, *argv, "--checkpoint", vit_t_checkpoint)


class _NotAWeight:
    pass


def _checkpoints(good: Path) -> dict:
    state = torch.load(good, weights_only=True)

    def nan_weights(path: Path) -> None:
        damaged = dict(state)
        key = "mask_decoder.iou_token.weight"
        damaged[key] = torch.full_like(state[key], float("nan"))
        torch.save(damaged, path)

    def vit_h_keys(path: Path) -> None:
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1280)}, path)

    return {
        "missing": (None, "checkpoint not found"),
        "directory": (lambda p: p.mkdir(), "not a file"),
        "garbage": (lambda p: p.write_bytes(b"\x00garbage" * 100), "corrupt or not a PyTorch"),
        "truncated": (lambda p: p.write_bytes(good.read_bytes()[:4000]), "corrupt"),
        "raw_pickle": (
            lambda p: p.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4)),
            "corrupt or not a PyTorch file",
        ),
        "arbitrary_object": (
            lambda p: torch.save({"x": _NotAWeight()}, p),
            "will not be unpickled",
        ),
        "nan_weights": (nan_weights, "NaN or infinite values in mask_decoder.iou_token.weight"),
        "other_model": (vit_h_keys, "is not a SAM/TinySAM model"),
        "damaged_safetensors": (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
            "damaged safetensors file",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing", "directory", "garbage", "truncated", "raw_pickle", "arbitrary_object",
        "nan_weights", "other_model", "damaged_safetensors",
    ],
)  # fmt: skip
def test_segment_refuses_bad_checkpoints(capsys, tmp_path, vit_t_checkpoint, case):
    make, words = _checkpoints(vit_t_checkpoint)[case]
    path = tmp_path / ("c.safetensors" if case == "damaged_safetensors" else "c.pth")
    if make is not None:
        make(path)
    segment_fails(capsys, tmp_path, words, SAMPLE, "--point", "10,10", "--checkpoint", path)


# --------------------------------------------------------------------------- the web API

pytest.importorskip("fastapi", reason="the serve extra: pip install 'tinysam[serve]'")


@pytest.fixture(scope="module")
def api(vit_t_checkpoint):
    from fastapi.testclient import TestClient

    from tinysam import SamPredictor, build_sam_vit_t
    from tinysam.serve.app import create_app
    from tinysam.serve.service import DemoService

    service = DemoService(
        SamPredictor(build_sam_vit_t(vit_t_checkpoint).eval()),
        max_upload_bytes=200_000,
        max_pixels=1_000_000,
        max_points=20,
        max_json_bytes=4096,
        everything_points=8,
    )
    client = TestClient(create_app(service))
    image_id = _upload(client, _png(np.full((40, 60, 3), 90, np.uint8))).json()["image_id"]
    return client, image_id


def _upload(client, data: bytes):
    return client.post("/api/images", files={"file": ("a.png", data, "image/png")})


UPLOADS = {
    "empty": (b"", 400, "empty"),
    "text": (b"hello, I am not an image", 415, "not an image"),
    "truncated_png": (_png(np.full((64, 64, 3), 7, np.uint8))[:70], 415, "truncated"),
    "bomb_900M": (_bomb(30000, 30000), 413, "more than the limit"),
    "over_pixel_limit": (_bomb(2000, 1000, 8, 2), 413, "2000x1000"),
    "over_byte_limit": (b"\x89PNG" + bytes(300_000), 413, "limit"),
    "float_out_of_range": (_tiff(np.full((8, 8), 3.0, np.float32)), 415, "0..1 floats"),
    "float_nan": (_tiff(np.full((8, 8), np.nan, np.float32)), 415, "NaN"),
}


@pytest.mark.parametrize("case", sorted(UPLOADS))
def test_api_refuses_bad_uploads(api, case):
    client, _ = api
    data, status, words = UPLOADS[case]
    response = _upload(client, data)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


CLICKS = {
    "no_prompt": ({"points": [], "labels": []}, 400, "at least one point or a box"),
    "labels_mismatch": ({"points": [[1, 2]], "labels": []}, 400, "1 points but 0 labels"),
    "three_coordinates": ({"points": [[1, 2, 3]], "labels": [1]}, 400, "[x, y]"),
    "label_seven": ({"points": [[1, 2]], "labels": [7]}, 400, "labels must be 1"),
    "label_minus_one": ({"points": [[1, 2]], "labels": [-1]}, 400, "labels must be 1"),
    "string_coordinate": ({"points": [[1, "x"]], "labels": [1]}, 422, "malformed request"),
    "box_three_numbers": ({"box": [1, 2, 3]}, 400, "box must be"),
    "box_reversed": ({"box": [50, 30, 10, 5]}, 400, "x0 <= x1"),
    "outside_image": ({"points": [[500, 2]], "labels": [1]}, 400, "outside"),
    "too_many_points": ({"points": [[1, 1]] * 21, "labels": [1] * 21}, 422, "at most 20"),
    "body_too_large": ({"points": [[1.25, 1.5]] * 400, "labels": [1] * 400}, 413, "limit"),
    "nan_literal": (b'{"points": [[NaN, 2]], "labels": [1]}', 400, "NaN or infinite"),
    "huge_number": (b'{"points": [[1e999, 2]], "labels": [1]}', 400, "NaN or infinite"),
    "not_json": (b"{not json", 422, "malformed"),
    "json_list": (b"[1, 2]", 422, "malformed"),
}


@pytest.mark.parametrize("case", sorted(CLICKS))
def test_api_refuses_bad_clicks(api, case):
    client, image_id = api
    body, status, words = CLICKS[case]
    url = f"/api/images/{image_id}/predict"
    if isinstance(body, bytes):
        response = client.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(url, json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_api_unknown_and_odd_image_ids(api):
    client, _ = api
    for image_id in ("nope", "..%2F..%2Fetc%2Fpasswd", "a" * 5000):
        response = client.post(
            f"/api/images/{image_id}/predict", json={"points": [[1, 2]], "labels": [1]}
        )
        assert response.status_code in (404, 413, 414), response.text
        if response.status_code == 404:
            assert "error" in response.json()


def test_the_table_is_counted():
    """The closing note of issue 15 quotes this count."""
    count = len(IMAGE_FILES) + len(PROMPTS) + 9 + len(UPLOADS) + len(CLICKS) + 3
    assert count == 61
    print(json.dumps({"hostile_cases": count}))
