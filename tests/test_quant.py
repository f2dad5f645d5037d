"""Post-training quantization: quantizers, the prepared model, calibration records, the scale
search, saved models, the int8 ONNX export and ``tinysam quantize``.

The golden checkpoint and images are the calibration and test data. Searches run with few
candidates here (the method is the same at any grid size); one ``tinysam quantize`` run is
shared by the tests that read its outputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch

from tinysam import SamPredictor
from tinysam.quant.calibrate import answer_boxes, collect, fisher_loss
from tinysam.quant.layers import QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantMatMul
from tinysam.quant.model import (
    prepare,
    quant_layers,
    set_deploy,
    set_quantization,
)
from tinysam.quant.quantizers import GELU_MIN, ActQuantizer, fake_quant, twin_quant
from tinysam.quant.search import SearchConfig, search_scales

from conftest import one_error_line, run_cli, saturating_int8_graph

FAST = SearchConfig(candidates=12, rounds=2)


# ---------------------------------------------------------------------------- quantizers


def test_fake_quant_is_the_symmetric_uniform_quantizer():
    x = torch.tensor([-2.0, -0.26, -0.04, 0.0, 0.05, 0.16, 1.0, 3.0])
    got = fake_quant(x, 0.1, 4)  # grid -0.8 .. 0.7
    want = torch.clamp(torch.round(x / 0.1), -8, 7) * 0.1
    assert torch.allclose(got, want)
    assert got.min() == pytest.approx(-0.8) and got.max() == pytest.approx(0.7)


def test_twin_softmax_keeps_small_probabilities_and_large_ones():
    probs = torch.tensor([1e-4, 3e-4, 2e-3, 0.4, 0.97])
    twin = twin_quant(probs, 1e-4, "softmax", 8)
    one_scale = fake_quant(probs, 1 / 127, 8)
    # The low group resolves what one scale rounds to zero; the high group still reaches ~1.
    assert twin[:3].tolist() == pytest.approx([1e-4, 3e-4, 2e-3], rel=1e-3)
    assert one_scale[:3].tolist() == [0.0, 0.0, 0.0]
    assert twin[3:].tolist() == pytest.approx(probs[3:].tolist(), abs=0.5 / 127)


def test_twin_gelu_gives_negatives_their_own_scale():
    x = torch.tensor([-0.17, -0.05, -0.001, 0.0, 0.5, 6.0])
    got = twin_quant(x, 0.05, "gelu", 8)
    negative = GELU_MIN / 128
    assert got[:3].tolist() == pytest.approx(
        (torch.round(x[:3] / negative) * negative).tolist(), abs=1e-7
    )
    assert got[3:].tolist() == pytest.approx([0.0, 0.5, 6.0], abs=1e-6)
    assert got[1] != 0  # one 0.05 scale would round -0.05 ... to -0.05; -0.001 vanishes either way


def test_quantizer_inactive_until_calibrated_and_rejects_bad_scales():
    q = ActQuantizer(8)
    x = torch.randn(10)
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError, match="positive"):
        q.set_scale(0.0)
    q.set_scale(0.01)
    assert not torch.equal(q(x), x)
    q.enabled = False
    assert torch.equal(q(x), x)


# ---------------------------------------------------------------------------- prepared model


def test_prepared_model_without_scales_is_the_float_model(vit_t_model, golden_image):
    qmodel = prepare(vit_t_model)
    kinds = {type(m) for m in quant_layers(qmodel).values()}
    assert kinds == {QuantLinear, QuantConv2d, QuantConvTranspose2d, QuantMatMul}
    assert not any(n.startswith("prompt_encoder") for n in quant_layers(qmodel))
    ref, got = SamPredictor(vit_t_model), SamPredictor(qmodel)
    ref.set_image(golden_image)
    got.set_image(golden_image)
    assert torch.allclose(got.features, ref.features, atol=1e-4)
    point = (np.array([[300, 200]]), np.array([1]))
    _, ref_scores, ref_logits = ref.predict(*point)
    _, scores, logits = got.predict(*point)
    assert np.abs(logits - ref_logits).max() < 1e-3
    assert np.abs(scores - ref_scores).max() < 1e-4
    # the float model is untouched
    assert not quant_layers(vit_t_model)


def test_prepare_rejects_bit_widths_out_of_range(vit_t_model):
    with pytest.raises(ValueError, match="between 2 and 8"):
        prepare(vit_t_model, weight_bits=16)


@pytest.fixture(scope="module")
def calibrated(vit_t_model, golden):
    """The golden model calibrated on picture1 (few prompts and rows) and searched."""
    from tinysam.io import load_image

    qmodel = prepare(vit_t_model)
    image = load_image(golden / "images" / "picture1.jpg")
    records = collect(qmodel, [image], prompts_per_image=4, rows=96, slices=2, seed=0)
    results = search_scales(qmodel, records, FAST)
    return qmodel, records, results


def test_records_reproduce_each_layer_as_a_grouped_matrix_product(calibrated):
    """input_rows / matrix / output_rows describe every layer kind exactly (conv, depthwise,
    transposed conv, linear, products), so the search scores the real computation."""
    qmodel, records, _ = calibrated
    layers = quant_layers(qmodel)
    assert set(records) == set(layers) - {"image_encoder.head"}  # the unused classifier
    seen = set()
    for name, record in records.items():
        data = record.tensors()
        layer = layers[name]
        if isinstance(layer, QuantMatMul):
            approx = data["a"] @ data["b"]
        else:
            weight = layer.weight.detach()
            bias = 0 if layer.bias is None else layer.bias.detach()[layer.column_channel()]
            approx = torch.einsum("rgk,gok->rgo", data["a"], layer.matrix(weight)).flatten(1)
            approx = approx + bias
            seen.add((layer.kind, getattr(layer, "groups", 1) > 1))
        scale = data["out"].abs().max()
        assert (approx - data["out"]).abs().max() <= 1e-4 * scale + 1e-5, name
        assert data["grad"].abs().sum() > 0, f"{name} got no gradient"
    assert {("conv", True), ("conv", False), ("linear", False), ("conv_transpose", False)} <= seen


def test_post_gelu_and_post_softmax_inputs_get_twin_quantizers(calibrated):
    qmodel, _, results = calibrated
    twins = {r.name: r.twin for r in results}
    assert twins["image_encoder.layers.1.blocks.0.mlp.fc2"] == "gelu"
    assert twins["image_encoder.layers.0.blocks.0.conv2"] == "gelu"  # after the expand conv
    assert twins["image_encoder.layers.1.blocks.0.mlp.fc1"] == "none"  # after a LayerNorm
    assert twins["image_encoder.layers.1.blocks.0.attn.weighted"] == "softmax"
    assert twins["mask_decoder.transformer.layers.0.cross_attn_token_to_image.weighted"] == (
        "softmax"
    )
    assert twins["mask_decoder.output_upscaling.3"] == "gelu"


def test_search_beats_min_max_scales_on_its_objective(calibrated):
    _, _, results = calibrated
    assert len(results) == 153
    for r in results:
        assert r.searched_distance <= r.minmax_distance * (1 + 1e-6), r.name
    better = [r for r in results if r.searched_distance < 0.99 * r.minmax_distance]
    assert len(better) > 0.8 * len(results)
    assert all(r.weighted for r in results)  # every layer got Fisher weights


def _plain_grid_search(layer, record, config):
    """The alternating grid search written the plain way (one candidate at a time, every
    distance from the full products), as docs/method.md states it: the oracle for the
    search's shared and batched work."""
    from tinysam.quant.quantizers import fake_quant_channels
    from tinysam.quant.search import _act

    data = record.tensors()
    out, weights = data["out"], data["grad"].square()
    weights = weights if weights.sum() > 0 else torch.ones_like(out)

    def columns(approx):
        return ((approx - out) ** 2 * weights).reshape(-1, out.shape[-1]).sum(0)

    thetas = config.thetas()
    if isinstance(layer, QuantMatMul):
        a, b = data["a"], data["b"]
        twin = layer.a_quant.twin
        step_a, step_b = record.a_absmax / 128, record.b_absmax / 128
        s_a, s_b = step_a, step_b
        best = float(columns(_act(a, s_a, twin, 8) @ _act(b, s_b, "none", 8)).sum())
        for _ in range(config.rounds):
            for t in thetas:
                d = float(
                    columns(_act(a, float(t) * step_a, twin, 8) @ _act(b, s_b, "none", 8)).sum()
                )
                if d < best:
                    best, s_a = d, float(t) * step_a
            for t in thetas:
                d = float(
                    columns(_act(a, s_a, twin, 8) @ _act(b, float(t) * step_b, "none", 8)).sum()
                )
                if d < best:
                    best, s_b = d, float(t) * step_b
        return s_a, s_b
    a, weight = data["a"], layer.weight.detach()
    axis, channel = layer.weight_quant.axis, layer.column_channel()
    channels = layer.weight_quant.scale.numel()
    bias = 0.0 if layer.bias is None else layer.bias.detach()[channel]
    twin = "gelu" if record.post_gelu else "none"
    dims = [d for d in range(weight.ndim) if d != axis]
    step_a, step_w = record.a_absmax / 128, weight.abs().amax(dim=dims).clamp_min(1e-12) / 128

    def output(a_q, s_w):
        w_q = fake_quant_channels(weight, s_w, axis, 8)
        return torch.einsum("rgk,gok->rgo", a_q, layer.matrix(w_q)).flatten(1) + bias

    def per_channel(cols):
        return torch.zeros(channels).index_add_(0, channel, cols)

    s_a, s_w = step_a, step_w.clone()
    best = float(columns(output(_act(a, s_a, twin, 8), s_w)).sum())
    for _ in range(config.rounds):
        for t in thetas:
            d = float(columns(output(_act(a, float(t) * step_a, twin, 8), s_w)).sum())
            if d < best:
                best, s_a = d, float(t) * step_a
        a_q = _act(a, s_a, twin, 8)
        best_w = per_channel(columns(output(a_q, s_w)))
        for t in thetas:
            d = per_channel(columns(output(a_q, t * step_w)))
            s_w = torch.where(d < best_w, t * step_w, s_w)
            best_w = torch.minimum(d, best_w)
        best = float(best_w.sum())
    return s_a, s_w


def test_search_picks_what_the_plain_grid_search_picks(calibrated):
    """The search shares work between candidates (batched products, depthwise layers scored
    from second moments, a stop after a round that moved nothing): the scales it picks are
    the plain search's."""
    from tinysam.quant.search import search_layer

    qmodel, records, _ = calibrated
    layers = quant_layers(qmodel)
    names = [
        "image_encoder.patch_embed.seq.2",  # conv
        "image_encoder.layers.0.blocks.0.conv2",  # depthwise conv, post-GELU
        "image_encoder.layers.1.blocks.0.local_conv",  # depthwise conv
        "image_encoder.layers.1.blocks.0.mlp.fc2",  # linear, post-GELU
        "image_encoder.layers.1.blocks.0.attn.weighted",  # product, post-softmax
        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.scores",  # product
        "mask_decoder.output_upscaling.0",  # transposed conv
    ]
    config = SearchConfig(candidates=16, rounds=3)
    for name in names:
        layer = copy.deepcopy(layers[name])  # the shared fixture keeps its scales
        expected = _plain_grid_search(layer, records[name], config)
        search_layer(name, layer, records[name], config)
        if isinstance(layer, QuantMatMul):
            got = (float(layer.a_quant.scale), float(layer.b_quant.scale))
            assert got == pytest.approx(expected, rel=1e-6), name
        else:
            assert float(layer.input_quant.scale) == pytest.approx(expected[0], rel=1e-6), name
            same = torch.isclose(layer.weight_quant.scale, expected[1], rtol=1e-6)
            assert same.float().mean() >= 0.99, (name, int((~same).sum()))


def test_calibration_boxes_surround_the_answered_masks():
    masks = torch.full((2, 4, 256, 256), -5.0)
    masks[0, 2, 10:20, 30:50] = 5.0  # the best multimask output of prompt 0
    masks[0, 0, :, :] = 5.0  # the single-mask output is not what a point prompt answers
    iou = torch.tensor([[0.99, 0.1, 0.9, 0.2], [0.5, 0.5, 0.5, 0.5]])
    boxes = answer_boxes(masks, iou, 1024)
    assert boxes[0].tolist() == [120.0, 40.0, 200.0, 80.0]
    assert boxes[1].tolist() == [0.0, 0.0, 1024.0, 1024.0]  # empty answer: the whole frame


def test_fisher_loss_gradients_are_nonzero_at_the_float_model():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    iou = torch.rand(2, 4, requires_grad=True)
    fisher_loss(logits, iou, torch.Generator().manual_seed(0)).backward()
    assert logits.grad.abs().sum() > 0 and iou.grad.abs().sum() > 0


@pytest.mark.slow  # 13-25 s end to end: CI's slow phase (the fast suite's budget)
def test_quantized_masks_agree_with_float_and_switches_work(calibrated, vit_t_model, golden):
    from tinysam.io import load_image
    from tinysam.quant.report import mask_agreement

    qmodel, _, _ = calibrated
    image = load_image(golden / "images" / "picture3.jpg")  # not a calibration image
    result = mask_agreement(SamPredictor(vit_t_model), {"q": SamPredictor(qmodel)}, [image], 8)
    assert result["q"]["point"].mean_iou > 0.9
    assert result["q"]["box"].mean_iou > 0.9
    assert result["q"]["point"].prompts == 8 and result["q"]["box"].prompts > 0

    ref, got = SamPredictor(vit_t_model), SamPredictor(qmodel)
    ref.set_image(image)
    got.set_image(image)
    assert not torch.allclose(got.features, ref.features, atol=1e-3)  # it does quantize
    set_quantization(qmodel, False, layers=["image_encoder"])
    try:
        got.set_image(image)
        assert torch.allclose(got.features, ref.features, atol=1e-4)
    finally:
        set_quantization(qmodel, True)
    with pytest.raises(ValueError, match="no quantized layer"):
        set_quantization(qmodel, False, layers=["image_encoder.nope"])


@pytest.mark.slow  # 13-25 s end to end: CI's slow phase (the fast suite's budget)
def test_everything_generator_runs_on_the_quantized_model(calibrated, vit_t_model, golden):
    from tinysam import SamAutomaticMaskGenerator
    from tinysam.io import load_image

    qmodel, _, _ = calibrated
    image = load_image(golden / "images" / "picture2.jpg")
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masks = SamAutomaticMaskGenerator(qmodel, **options).generate(image)
    reference = SamAutomaticMaskGenerator(vit_t_model, **options).generate(image)
    assert masks and all(m["segmentation"].shape == image.shape[:2] for m in masks)
    assert abs(len(masks) - len(reference)) <= max(2, len(reference) // 4)


@pytest.mark.slow
def test_six_bit_model_runs_and_is_further_from_float(vit_t_model, golden, calibrated):
    from tinysam.io import load_image

    image = load_image(golden / "images" / "picture1.jpg")
    q6 = prepare(vit_t_model, weight_bits=6, act_bits=6)
    search_scales(q6, collect(q6, [image], 4, rows=96, slices=2), FAST)
    assert q6.image_encoder.layers[1].blocks[0].mlp.fc1.weight_quant.bits == 6
    ref, p8, p6 = (SamPredictor(m) for m in (vit_t_model, calibrated[0], q6))
    errors = []
    for p in (p8, p6):
        p.set_image(image)
    ref.set_image(image)
    for p in (p8, p6):
        errors.append(float((p.features - ref.features).norm() / ref.features.norm()))
    assert errors[0] < errors[1] < 0.5


# ---------------------------------------------------------------------------- saved models


def test_saved_model_reloads_identically_with_int8_weights(calibrated, tmp_path, golden_image):
    from tinysam.quant.store import load_quantized, save_quantized

    qmodel, _, _ = calibrated
    save_quantized(qmodel, tmp_path, "vit_t", note="test")
    state = torch.load(tmp_path / "quantized.pt", weights_only=True)
    assert state["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].dtype == torch.int8
    assert state["image_encoder.head.weight"].dtype == torch.float32  # never calibrated
    config = json.loads((tmp_path / "quant.json").read_text())
    assert config["model_type"] == "vit_t" and config["note"] == "test"
    fc2 = config["layers"]["image_encoder.layers.1.blocks.0.mlp.fc2"]
    assert fc2["input"]["twin"] == "gelu" and fc2["weight"]["channels"] == 128

    reloaded = load_quantized(tmp_path / "quantized.pt")
    a, b = SamPredictor(qmodel), SamPredictor(reloaded)
    a.set_image(golden_image)
    b.set_image(golden_image)
    assert torch.allclose(a.features, b.features, atol=1e-5)
    point = (np.array([[250, 300]]), np.array([1]))
    assert np.allclose(a.predict(*point)[2], b.predict(*point)[2], atol=1e-4)


def test_broken_quantized_folders_give_one_line_errors(calibrated, tmp_path):
    from tinysam.build import CheckpointError
    from tinysam.quant.store import load_quantized, save_quantized

    qmodel, _, _ = calibrated
    save_quantized(qmodel, tmp_path, "vit_t")
    (tmp_path / "quant.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_quantized(tmp_path)
    save_quantized(qmodel, tmp_path, "vit_t")
    (tmp_path / "quantized.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized(tmp_path / "elsewhere")
    (tmp_path / "quant.json").unlink()
    with pytest.raises(CheckpointError, match="no quant.json"):
        load_quantized(tmp_path)


def test_onnx_export_refuses_other_bit_widths(vit_t_model, tmp_path):
    from tinysam.quant.onnx_int8 import export_quantized_onnx

    with pytest.raises(ValueError, match="needs 8-bit"):
        export_quantized_onnx(prepare(vit_t_model, 6, 6), tmp_path, "vit_t")


# ---------------------------------------------------------------------------- tinysam quantize


@pytest.fixture(scope="module")
def quantize_run(golden, vit_t_checkpoint, tmp_path_factory):
    """One `tinysam quantize` run: calibration on picture1, report on picture3, ONNX export."""
    from tinysam.cli import main

    root = tmp_path_factory.mktemp("quantize")
    calib, test = root / "calib", root / "test"
    calib.mkdir()
    test.mkdir()
    shutil.copy(golden / "images" / "picture1.jpg", calib)
    shutil.copy(golden / "images" / "picture3.jpg", test)
    out = root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(
            ["quantize", "--checkpoint", str(vit_t_checkpoint), "--calib", str(calib)]
            + ["--test", str(test), "--out", str(out), "--candidates", "10", "--rounds", "1"]
            + ["--prompts", "4", "--rows", "64", "--test-prompts", "8"]
        )
    assert code == 0
    summary = json.loads(stdout.getvalue())
    summary["stage_lines"] = stderr.getvalue().splitlines()
    return out, summary


@pytest.mark.slow
def test_quantize_writes_model_onnx_and_report(quantize_run):
    out, summary = quantize_run
    for name in ("quantized.pt", "quant.json", "report.md", "report.json", "onnx/encoder.onnx"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 153 and report["test_images"] == ["picture3.jpg"]
    assert not report["test_is_calibration_set"]
    for name, kinds in report["agreement"].items():
        for kind in ("point", "box"):
            assert kinds[kind]["mean_iou"] > 0.9, (name, kind, kinds[kind])
    assert set(summary["agreement"]) == set(report["agreement"])
    # Not a terminal: no progress bars, one line per stage as it ends.
    lines = summary["stage_lines"]
    stages = [line.split(":")[0] for line in lines]
    assert stages[:4] == ["calibrate", "search", "saved", "onnx"], lines
    assert stages[4:-1] == ["report"] * len(report["agreement"]), lines
    assert "64 sampled positions per layer and image" in lines[0]  # --rows 64, one image
    assert lines[-1].startswith("done in ")
    assert not any("\r" in line for line in lines)
    assert "| layer |" in (out / "report.md").read_text()
    config = json.loads((out / "quant.json").read_text())
    assert config["search"]["candidates"] == 10 and config["calibration"]["images"] == [
        "picture1.jpg"
    ]


@pytest.mark.slow
def test_int8_onnx_runs_integer_kernels_and_agrees_with_deploy_mode(quantize_run, golden):
    import onnx
    import onnxruntime as ort

    from tinysam.io import load_image
    from tinysam.quant.report import mask_agreement
    from tinysam.quant.store import load_quantized
    from tinysam.runtime import OnnxPredictor
    from tinysam.runtime.predictor import disabled_optimizers, session_options

    out, _ = quantize_run
    model = onnx.load(out / "onnx" / "encoder.onnx")
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 79  # every conv and linear weight of the encoder
    assert not any(
        n.op_type == "QuantizeLinear" and "weight" in n.input[0] for n in model.graph.node
    )

    weight_zero_points = [
        n.input[2]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")
    ]
    assert len(weight_zero_points) == len(set(weight_zero_points))  # see test below

    options = session_options(2, quantized=True)
    optimized = out / "optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(
        str(out / "onnx" / "encoder.onnx"), options, disabled_optimizers=disabled_optimizers(True)
    )
    ops = {n.op_type for n in onnx.load(optimized).graph.node}
    assert {"QLinearConv", "MatMulIntegerToFloat"} <= ops
    assert "Gemm" not in ops and "Conv" not in ops  # nothing fell back to float kernels

    image = load_image(golden / "images" / "picture3.jpg")
    deploy = load_quantized(out)
    set_deploy(deploy)
    onnx_predictor = OnnxPredictor(out / "onnx")
    sim = SamPredictor(deploy)
    sim.set_image(image)
    onnx_predictor.set_image(image)
    got = torch.as_tensor(onnx_predictor.get_image_embedding())
    rel = float((got - sim.features).norm() / sim.features.norm())
    assert rel < 0.08  # rounding differences (x/s vs x*(1/s), int32 bias) compound, see note
    agreement = mask_agreement(sim, {"onnx": onnx_predictor}, [image], 8)
    assert agreement["onnx"]["point"].mean_iou > 0.9
    assert agreement["onnx"]["box"].mean_iou > 0.9


def test_int8_sessions_do_not_saturate_without_vnni(tmp_path):
    """u8 x s8 products of values at the ends of their ranges: x86 CPUs without VNNI saturate
    them at int16 unless the session asks for exact kernels (``session.x64quantprecision``)."""
    import onnxruntime as ort

    from tinysam.runtime.predictor import disabled_optimizers, session_options

    exact = saturating_int8_graph(tmp_path / "saturation.onnx")
    session = ort.InferenceSession(
        str(tmp_path / "saturation.onnx"),
        session_options(1, quantized=True),
        disabled_optimizers=disabled_optimizers(True),
    )
    (y,) = session.run(None, {"image": np.full((4, 64), 127.0, np.float32)})
    np.testing.assert_array_equal(y, exact)


class _ConvThenFloat(torch.nn.Module):
    """A deploy-mode block in miniature: an int8 convolution with a quantized output whose
    float value goes through a Reshape and Transpose to a LayerNorm and a residual Add."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(16, 16, 1, 1, generator=generator) * 0.2)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)
        scales = self.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
        w = torch.fake_quantize_per_channel_affine(
            self.weight, scales, torch.zeros(16, dtype=torch.int32), 0, -128, 127
        )
        y = torch.nn.functional.conv2d(q, w)
        y = torch.fake_quantize_per_tensor_affine(y, 0.03, 0, -128, 127)
        tokens = y.flatten(2).transpose(1, 2)
        return tokens + self.norm(tokens)


def test_int8_sessions_skip_the_qdq_copies_around_shape_ops(tmp_path):
    """ONNX Runtime's QDQ propagation copies Q/DQ pairs across the Reshape/Transpose after an
    int8 convolution: our sessions turn it off, for the same integer kernels and outputs."""
    import onnx
    import onnxruntime as ort

    from tinysam.quant.onnx_int8 import to_int8
    from tinysam.runtime.onnx_export import DEFAULT_OPSET, onnx_program
    from tinysam.runtime.predictor import disabled_optimizers, session_options

    x = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(1))
    model = to_int8(onnx_program(_ConvThenFloat().eval(), (x,), DEFAULT_OPSET))
    results = {}
    for name, disabled in (
        ("ours", disabled_optimizers(True)),
        ("propagating", [o for o in disabled_optimizers(True) if "Propagation" not in o]),
    ):
        options = session_options(1, quantized=True)
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        session = ort.InferenceSession(
            model.SerializeToString(), options, disabled_optimizers=disabled
        )
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        ops = [n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node]
        results[name] = out, ops
    (ours, ours_ops), (theirs, their_ops) = results["ours"], results["propagating"]
    np.testing.assert_array_equal(ours, theirs)
    assert ours_ops.count("QLinearConv") == their_ops.count("QLinearConv") == 1
    qdq = ("QuantizeLinear", "DequantizeLinear")
    assert sum(ours_ops.count(op) for op in qdq) < sum(their_ops.count(op) for op in qdq)


def test_int8_sessions_force_the_exact_kernels_only_where_products_saturate(monkeypatch):
    """With VNNI or AMX the fast u8 x s8 kernels are exact: forcing u8 x u8 there only slows."""
    from tinysam import perf
    from tinysam.runtime.predictor import X64_QUANT_PRECISION, session_options

    def setting(options):
        try:
            return options.get_session_config_entry(X64_QUANT_PRECISION)
        except RuntimeError:  # not set
            return None

    for saturate, expected in ((True, "1"), (False, None)):
        monkeypatch.setattr(perf, "int8_products_saturate", lambda saturate=saturate: saturate)
        assert setting(session_options(1, quantized=True)) == expected
        assert setting(session_options(1)) is None


@pytest.mark.slow
def test_segment_accepts_a_quantized_folder(quantize_run, golden, capsys, tmp_path):
    out, _ = quantize_run
    code, stdout, err = run_cli(
        capsys,
        "segment",
        golden / "images" / "picture3.jpg",
        "--checkpoint",
        out,
        "--point",
        "300,200",
        "--out",
        tmp_path / "mask.png",
    )
    assert code == 0, err
    assert (tmp_path / "mask.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calib", "MISSING"], "is not a folder of images"),
        (["--calib", "EMPTY"], "no images"),
        (["--calib", "CALIB", "--bits", "12"], "between 2 and 8"),
        (["--calib", "CALIB", "--rows", "0"], "--rows must be at least 1"),
    ],
)
def test_quantize_usage_errors(extra, message, capsys, tmp_path, golden, vit_t_checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "calib").mkdir()
    shutil.copy(golden / "images" / "picture1.jpg", tmp_path / "calib")
    paths = {"MISSING": tmp_path / "nope", "EMPTY": tmp_path / "empty", "CALIB": tmp_path / "calib"}
    argv = [paths.get(a, a) for a in extra]
    code, _, err = run_cli(
        capsys, "quantize", "--checkpoint", vit_t_checkpoint, "--out", tmp_path / "o", *argv
    )
    assert code == 2
    assert message in one_error_line(err, "quantize")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": 7}, "model_type must be a string"),
        ({"model_type": "vit_q"}, "model_type 'vit_q' is not a known model type"),
        ({"model_type": "vit_t", "bits": [8, 8]}, "bits must be an object"),
        ({"model_type": "vit_t", "bits": {"weight": "8"}}, "bits.weight must be an integer"),
        ({"model_type": "vit_t", "bits": {"activation": 12}}, "bits.activation must be between"),
        ({"model_type": "vit_t", "layers": ["a"]}, "layers must be an object"),
        ({"model_type": "vit_t", "layers": {"a": 1}}, "layers.a must be an object"),
        ({"model_type": "vit_t", "layers": {"a": {"input": 3}}}, "layers.a.input must be"),
        (
            {"model_type": "vit_t", "layers": {"a": {"input": {"twin": "odd"}}}},
            "layers.a.input.twin must be one of",
        ),
        ({"model_type": "small"}, "image_size is missing"),
        ({"model_type": "small", "image_size": "64"}, "image_size must be an integer"),
        ({"model_type": "small", "image_size": 72}, "image_size must be a multiple of 16"),
        ({"model_type": "small", "image_size": 10**9}, "image_size must be a multiple of 16"),
    ],
)
def test_malformed_quant_json_names_the_field(tmp_path, config, message):
    from tinysam.build import CheckpointError
    from tinysam.quant.store import CONFIG_FILE, FORMAT, FORMAT_VERSION, read_config

    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message) as err:
        read_config(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(err.value) and "quantize again" in str(err.value)


def test_the_small_demo_student_quantizes_saves_and_reloads(tmp_path, golden):
    """Q-TinySAM of ``tinysam distill demo``'s student: quant.json records its image size and
    the folder reloads into the same fake-quantized model."""
    from tinysam.build import CheckpointError
    from tinysam.distill.models import small_student, small_teacher
    from tinysam.quant.pipeline import QuantizeSettings, quantize
    from tinysam.quant.store import check_architecture, load_quantized

    student = small_student(64, seed=3).eval()
    image = golden / "images" / "picture1.jpg"
    # The int8 ONNX export of the small model runs in the demo's slow test (minutes here).
    search = SearchConfig(candidates=4, rounds=1)
    settings = QuantizeSettings(prompts=2, rows=8, search=search, test_prompts=2, onnx=False)
    summary = quantize(student, [image], tmp_path / "q", settings, model_type="small")
    config = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert config["model_type"] == "small" and config["image_size"] == 64
    assert set(summary["agreement"]) == {"W8A8 simulated", "deploy mode (as the int8 ONNX model)"}
    reloaded = load_quantized(tmp_path / "q")
    assert reloaded.image_encoder.img_size == 64
    picture = torch.rand(1, 3, 64, 64)
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded.image_encoder(picture), again.image_encoder(picture))
        assert not torch.equal(reloaded.image_encoder(picture), student.image_encoder(picture))
    # A model that is not the small student is refused before any search.
    with pytest.raises(CheckpointError, match="does not match a small"):
        check_architecture(small_teacher(64), "small")
