"""Q-TinySAM converted: ``tinysam quantize --from tinysam_w8a8.pth`` writes our quantized
folder (no pickle), which loads back as the same model, and the int8 ONNX model computes the
authors' layers as split integer products."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tinysam.backends import load_model
from tinysam.checkpoint import CheckpointError
from tinysam.pickled_modules import QuantizedLayerRecord
from tinysam.predictor import SamPredictor
from tinysam.quant.published import quantize_layer
from tinysam.quant.split_products import GridInputConv, SplitProductLinear

from conftest import GOLDEN, one_error_line, run_cli

FILE = GOLDEN / "qtinysam" / "qtinysam_seed0.pth"


@pytest.fixture(scope="module")
def published():
    sam, _ = load_model(None, FILE, progress=False)
    return sam


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted by the command line, without the ONNX export (the slow part)."""
    out = tmp_path_factory.mktemp("converted")
    from tinysam.cli import main

    assert main(["quantize", "--from", str(FILE), "--out", str(out), "--no-onnx"]) == 0
    return out


def test_the_converted_folder_holds_tensors_only_and_int8_weights(converted, published):
    config = json.loads((converted / "quant.json").read_text())
    assert config["scheme"] == "published" and config["format_version"] == 2
    assert len(config["layers"]) == len(published.published_layers) == 118
    state = torch.load(converted / "quantized.pt", weights_only=True)  # no pickled objects
    for path, record in published.published_layers.items():
        levels = state[f"{path}.weight"]
        assert levels.dtype == torch.int8
        module = published.get_submodule(path)
        grid = module.weight_quant(module.weight.detach())
        assert torch.equal(module.weight_quant.dequantize(levels), grid)
        entry = config["layers"][path]
        assert entry["kind"] == record.kind
        if record.kind.startswith("linear"):
            assert entry["blocks"] == [record.n_V, record.n_H] and entry["chunks"] == record.n_a


def test_the_converted_folder_is_the_same_model(converted, published, capsys):
    ours, _ = load_model(None, converted, progress=False)
    assert ours.published_layers.keys() == published.published_layers.keys()
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours.image_encoder(image), published.image_encoder(image))
    a, b = SamPredictor(ours), SamPredictor(published)
    picture = (np.random.default_rng(4).random((200, 300, 3)) * 255).astype(np.uint8)
    a.set_image(picture)
    b.set_image(picture)
    for prompt in ({"point_coords": np.array([[100, 60]]), "point_labels": np.array([1])},
                   {"box": np.array([20, 30, 250, 180])}):  # fmt: skip
        np.testing.assert_array_equal(a.predict(**prompt)[2], b.predict(**prompt)[2])
    code, out, _ = run_cli(capsys, "info", "--checkpoint", converted)
    assert code == 0 and "Q-TinySAM" in out and "118 layers" in out


def _damaged_copy(converted, tmp_path, config_change=None, state_change=None):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(converted, out)
    if config_change:
        config = json.loads((out / "quant.json").read_text())
        config_change(config)
        (out / "quant.json").write_text(json.dumps(config))
    if state_change:
        state = torch.load(out / "quantized.pt", weights_only=True)
        state_change(state)
        torch.save(state, out / "quantized.pt")
    return out


QKV = "image_encoder.layers.1.blocks.0.attn.qkv"
CONV = "image_encoder.neck.0"


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize(
    "config_change, state_change, message",
    [
        (lambda c: _set(c["layers"][QKV], "blocks", [7, 1]), None, "do not divide"),
        (lambda c: _set(c["layers"][QKV], "blocks", "2x2"), None, "blocks must be"),
        (lambda c: _set(c["layers"][QKV], "kind", "exec"), None, "kind must be one of"),
        (lambda c: _set(c["layers"][QKV], "weight_bits", 9), None, "not a supported bit width"),
        (lambda c: _set(c["layers"][QKV], "weight_bits", 4), None, "levels outside 4 bits"),
        (lambda c: _set(c, "format_version", 1), None, "format version 1"),
        (None, lambda s: s[f"{QKV}.weight_quant.interval"].fill_(float("nan")), "NaN or infinite"),
        (None, lambda s: s[f"{CONV}.weight_quant.interval"].zero_(), "finite positive"),
        (None, lambda s: _set(s, f"{QKV}.weight", s[f"{QKV}.weight"].float()), "not int8"),
        (None, lambda s: s.pop(f"{CONV}.input_quant.offset"), "has no a_bias"),
        (lambda c: _set(c["layers"], "image_encoder.nowhere", c["layers"][QKV]), None, "lacks"),
    ],
)
def test_a_damaged_converted_folder_is_one_line(
    capsys, tmp_path, converted, config_change, state_change, message
):
    damaged = _damaged_copy(converted, tmp_path, config_change, state_change)
    with pytest.raises(CheckpointError, match=message):
        load_model(None, damaged, progress=False)
    code, _, err = run_cli(capsys, "info", "--checkpoint", damaged)
    assert code == 2 and message in one_error_line(err, "info")


def test_export_points_a_quantized_model_to_its_int8_onnx_model(capsys, tmp_path, converted):
    for checkpoint, hint in ((FILE, "tinysam quantize --from"), (converted, "onnx/ folder")):
        code, _, err = run_cli(capsys, "export", "--checkpoint", checkpoint, "--out-dir", tmp_path)
        assert code == 2 and hint in one_error_line(err, "export")
    assert not list(tmp_path.iterdir())


def test_quantize_from_refuses_what_it_cannot_convert(capsys, tmp_path, vit_t_checkpoint):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", "--from", vit_t_checkpoint, "--out", out)
    assert code == 2 and "not a Q-TinySAM file" in one_error_line(err, "quantize")
    code, _, err = run_cli(
        capsys, "quantize", "--from", FILE, "--calib", tmp_path, "--out", out
    )  # fmt: skip
    assert code == 2 and "--calib has no use with --from" in one_error_line(err, "quantize")
    code, _, err = run_cli(capsys, "quantize", "--out", out)
    assert code == 2 and "--calib is required" in one_error_line(err, "quantize")
    assert not (out / "quant.json").exists()


# ------------------------------------------- the int8 ONNX form of each layer, in ONNX Runtime


def _run_int8(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    from tinysam.quant.onnx_int8 import to_int8
    from tinysam.runtime.onnx_export import DEFAULT_OPSET, onnx_program
    from tinysam.runtime.predictor import disabled_optimizers, session_options

    model = to_int8(onnx_program(module, (x,), DEFAULT_OPSET))
    int8_weights = [
        i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims
        and not i.name.endswith("_zero_point")
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(2, quantized=True)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=disabled_optimizers(True),
        )
        ran = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return out, model, int8_weights, ran


def _linear_record(layer, kind, blocks, generator):
    n_v, n_h, n_a = blocks
    out_features, in_features = layer.weight.shape
    rows = layer.weight.detach().reshape(n_v, out_features // n_v, n_h, in_features // n_h)
    w_interval = rows.abs().amax(dim=(1, 3), keepdim=True) / 127
    a_interval = 0.01 + 0.03 * torch.rand(n_a, 1, generator=generator)
    record = QuantizedLayerRecord(kind, 8, 8, w_interval, a_interval, n_v, n_h, n_a)
    if kind == "linear_post_gelu":
        record.a_neg_interval = torch.tensor(0.16997124254703522 / 128)
    return record


@pytest.mark.parametrize(
    "kind, blocks",
    [
        ("linear", (1, 1, 1)),  # one product, per-channel scales
        ("linear", (4, 2, 4)),
        ("linear", (2, 3, 2)),  # lcm(n_a, n_H) = 6 parts
        ("linear_post_gelu", (2, 4, 2)),
        ("linear_post_gelu", (1, 1, 3)),
    ],
)
def test_a_linear_layer_in_onnx_runtime_computes_its_levels(kind, blocks):
    """Split products: every part an int8 MatMul; the sum equals the simulated layer."""
    generator = torch.Generator().manual_seed(sum(blocks))
    layer = nn.Linear(96, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 96, generator=generator) * 0.2)
    quantize_layer(layer, _linear_record(layer, kind, blocks, generator))
    x = torch.randn(2, 7, 96, generator=generator)
    if kind == "linear_post_gelu":
        x = torch.nn.functional.gelu(x * 3)  # GELU's range, with values past 127 a
    with torch.no_grad():
        simulated = layer(x)
        split = SplitProductLinear(layer)
        assert torch.allclose(split(x), simulated, atol=1e-5)
    out, model, int8_weights, ran = _run_int8(split, x)
    n_v, n_h, n_a = blocks
    products = np.lcm(n_h, n_a) * (2 if kind == "linear_post_gelu" else 1)
    assert len(int8_weights) == products  # every product's weight is stored as int8
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == products
    assert ran.count("MatMulIntegerToFloat") == products  # each an integer kernel in ORT
    scale = float(simulated.abs().max())
    np.testing.assert_allclose(out, simulated.numpy(), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_convolution_in_onnx_runtime_computes_on_its_grid(transposed):
    generator = torch.Generator().manual_seed(7)
    if transposed:
        layer = nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
    else:
        layer = nn.Conv2d(16, 24, kernel_size=3, padding=1)
    axis = 1 if transposed else 0
    dims = [d for d in range(4) if d != axis]
    w_interval = layer.weight.detach().abs().amax(dim=dims, keepdim=True) / 127
    record = QuantizedLayerRecord(
        "conv_transpose" if transposed else "conv", 8, 8, w_interval, torch.tensor(0.02),
        a_bias=torch.tensor(0.37),
    )  # fmt: skip
    quantize_layer(layer, record)
    x = torch.randn(1, 16, 12, 10, generator=generator)
    with torch.no_grad():
        simulated = layer(x)
        grid = GridInputConv(layer)
    out, _, _, _ = _run_int8(grid, x)
    np.testing.assert_allclose(out, simulated.numpy(), atol=1e-5 * float(simulated.abs().max()))


# ------------------------------------------------------------------------ the whole conversion


class _OtherThreadCount(SamPredictor):
    """The simulated model encoding with one thread: how far float summation order alone
    moves an 8-bit model's masks."""

    def set_image(self, image):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().set_image(image)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_int8_onnx_model_agrees_with_the_simulated_model(capsys, tmp_path, golden):
    """The whole command: convert, export int8 ONNX, report on images other than the
    fixture's (picture1), points and boxes. The int8 model must agree with the simulated one
    (mean mask IoU >= 0.98) as closely as the simulated model agrees with itself at another
    thread count (the file's random weights make the 8-bit network turn float noise into
    whole levels)."""
    from tinysam.io import load_image
    from tinysam.quant.report import mask_agreement
    from tinysam.quant.store import load_quantized

    images = tmp_path / "images"
    images.mkdir()
    for name in ("picture2.jpg", "picture3.jpg"):
        (images / name).write_bytes((golden / "images" / name).read_bytes())
    out = tmp_path / "q"
    code, stdout, err = run_cli(
        capsys, "quantize", "--from", FILE, "--out", out, "--test", images,
        "--checkpoint", golden / "vit_t_seed0_checkpoint.pth",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())["agreement"]
    onnx_vs_simulated = report["int8 ONNX Runtime vs the simulated model"]
    assert set(report) == {
        "int8 ONNX Runtime vs the simulated model",
        "simulated vs the float model",
        "int8 ONNX Runtime vs the float model",
    }
    simulated = load_quantized(out)
    floor = mask_agreement(
        SamPredictor(simulated),
        {"other threads": _OtherThreadCount(simulated)},
        [load_image(p) for p in sorted(images.iterdir())],
        16,
        seed=0,
    )["other threads"]
    for kind in ("point", "box"):
        assert onnx_vs_simulated[kind]["prompts"] == 32
        achieved = onnx_vs_simulated[kind]["mean_iou"]
        assert achieved >= min(0.98, floor[kind].mean_iou - 0.005), (kind, achieved, floor)
        assert achieved >= 0.97
    manifest = json.loads((out / "onnx" / "tinysam_onnx.json").read_text())
    assert manifest["quantization"]["layers"] == 118
    assert "report: int8 ONNX Runtime vs the simulated model" in err
