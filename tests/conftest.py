"""Shared fixtures: the golden reference data and a predictor loaded with its checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The reference outputs ship with the tests (tests/golden/README.md); TINYSAM_GOLDEN may point
# at another copy.
GOLDEN = Path(os.environ.get("TINYSAM_GOLDEN") or REPO / "tests" / "golden")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``tinysam ARGV`` in this process: (exit status, stdout, stderr)."""
    from tinysam.cli import main

    threads = torch.get_num_threads()  # --threads sets it for the whole process
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    finally:
        torch.set_num_threads(threads)  # ... so later tests run as they would alone
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    """The single ``tinysam COMMAND: error: ...`` line every user error must be."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tinysam {command}: error: ")
    return lines[0]


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # Remembered choices (--backend auto) and downloads stay out of the user's own cache.
    os.environ["TINYSAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinysam-test-cache-")


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden reference data not found at {GOLDEN}; set TINYSAM_GOLDEN")
    return GOLDEN


@pytest.fixture(scope="session")
def vit_t_checkpoint(golden) -> Path:
    return golden / "vit_t_seed0_checkpoint.pth"


@pytest.fixture(scope="session")
def vit_t_meta(golden) -> dict:
    return json.loads((golden / "vit_t_seed0_meta.json").read_text())


@pytest.fixture(scope="session")
def vit_t_outputs(golden):
    return np.load(golden / "vit_t_seed0_outputs.npz")


@pytest.fixture(scope="session")
def golden_image(golden, vit_t_meta) -> np.ndarray:
    from tinysam.io import load_image

    return load_image(golden / "images" / vit_t_meta["image"])


@pytest.fixture(scope="session")
def vit_t_model(vit_t_checkpoint):
    from tinysam import sam_model_registry

    return sam_model_registry["vit_t"](checkpoint=vit_t_checkpoint)


@pytest.fixture(scope="session")
def predictor(vit_t_model, golden_image):
    """A predictor with the golden image already set (the encoder runs once per session)."""
    from tinysam import SamPredictor

    p = SamPredictor(vit_t_model)
    p.set_image(golden_image)
    return p


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1)[..., :width].astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="session")
def onnx_dir(vit_t_checkpoint, tmp_path_factory) -> Path:
    """The golden model exported with `tinysam export`, once per session (about 20 s)."""
    from tinysam.cli import main

    out = tmp_path_factory.mktemp("onnx")
    code = main(["export", "--checkpoint", str(vit_t_checkpoint), "--out-dir", str(out)])
    assert code == 0, "tinysam export failed"
    return out


@pytest.fixture(scope="session")
def onnx_predictor(onnx_dir, golden_image):
    """An OnnxPredictor with the golden image already set."""
    from tinysam.runtime import OnnxPredictor

    p = OnnxPredictor(onnx_dir, threads=2)
    p.set_image(golden_image)
    return p


def _installed_backends() -> list[str]:
    from tinysam.backends import installed_backends

    return installed_backends()


@pytest.fixture(scope="session", params=_installed_backends())
def any_predictor(request, golden_image):
    """Every backend installed here (a new one joins by being in ``backends.BACKENDS``), with
    the golden image set, for the checks they must share."""
    if request.param == "torch":
        return request.getfixturevalue("predictor")
    if request.param == "onnx":
        return request.getfixturevalue("onnx_predictor")
    from tinysam.backends import load_predictor

    predictor = load_predictor(
        request.param, onnx_dir=request.getfixturevalue("onnx_dir"), threads=2
    )
    predictor.set_image(golden_image)
    return predictor


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tinysam(command: str, checkpoint, health: str, *options) -> tuple:
    """A real ``tinysam COMMAND`` server on 127.0.0.1 (a free port), once ``health`` answers:
    (process, port). Stop it with ``stop_server``."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tinysam.cli", command, "--checkpoint", str(checkpoint),
         "--port", str(port), "--threads", "2", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):  # up to 60 s to import torch and load the model
        if process.poll() is not None:
            pytest.fail(f"tinysam {command} exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(base + health, timeout=1):
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"tinysam {command} did not start in 60 s")


def stop_server(process) -> None:
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stderr.close()


def saturating_int8_graph(path) -> np.ndarray:
    """A QDQ product whose u8 x s8 pairs (255 x 127, twice) overflow int16: an "image" in,
    what its exact product is out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 16
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["image", "s", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
            helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        ],
        "saturation",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "zx"),
            numpy_helper.from_array(np.full((k, n), 127, np.int8), "w"),
            numpy_helper.from_array(np.ones(n, np.float32), "sw"),
            numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return np.full((4, n), 127.0 * 127 * k, np.float32)
