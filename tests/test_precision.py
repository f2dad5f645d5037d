"""``--precision {fp32,bf16,int8}``: one setting in ``PredictorSpec``; fp32 stays the exact
default, bf16 and int8 run correctly on any CPU (slowly where it lacks the hardware, with one
note saying so), and a precision that cannot apply to the model given is one line."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from tinysam import perf
from tinysam.backends import BackendError, PredictorSpec, auto_candidates
from tinysam.predictor import SamPredictor
from tinysam.runtime.predictor import OnnxModelError, OpenVinoEncoder, load_encoder

from conftest import mask_iou, run_cli


def test_fp32_is_the_default_everywhere(monkeypatch):
    monkeypatch.delenv("TINYSAM_PRECISION", raising=False)
    assert PredictorSpec().precision == "fp32"
    assert PredictorSpec.from_env().precision == "fp32"
    monkeypatch.setenv("TINYSAM_PRECISION", "bf16")
    assert PredictorSpec.from_env().precision == "bf16"
    monkeypatch.setenv("TINYSAM_PRECISION", "fp16")
    with pytest.raises(BackendError, match="precision must be one of fp32, bf16, int8"):
        PredictorSpec.from_env()


class _RecordingEncoder(torch.nn.Module):
    """Stands in for the image encoder: a linear layer, and what autocast was when it ran."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.project = torch.nn.Linear(3, 256)
        self.seen = []

    def forward(self, x):
        out = self.project(x[:, :, :64, :64].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        self.seen.append(out.dtype)
        return out


def test_bf16_runs_the_encoder_products_in_bf16_and_returns_fp32(vit_t_model):
    """The wiring (the full encoder in emulated bf16 takes ~40 s on CPUs without it: the
    slow test below checks its masks)."""
    import copy

    sam = copy.deepcopy(vit_t_model)
    sam.image_encoder = _RecordingEncoder(vit_t_model.image_encoder)
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    bf16 = SamPredictor(sam, precision="bf16")
    bf16.set_image(image)
    fp32 = SamPredictor(sam)
    fp32.set_image(image)
    assert sam.image_encoder.seen == [torch.bfloat16, torch.float32]
    assert bf16.features.dtype == fp32.features.dtype == torch.float32
    error = float((bf16.features - fp32.features).abs().max() / fp32.features.abs().max())
    assert 0 < error < 0.02  # bf16 products: close to fp32, not equal
    with pytest.raises(ValueError, match="precision must be"):
        SamPredictor(sam, precision="fp16")


@pytest.mark.slow  # bf16 is emulated on CPUs without AVX512-BF16/AMX: ~40 s an image there
def test_bf16_masks_agree_with_fp32(vit_t_model, golden_image):
    fp32, bf16 = SamPredictor(vit_t_model), SamPredictor(vit_t_model, precision="bf16")
    fp32.set_image(golden_image)
    bf16.set_image(golden_image)
    h, w = golden_image.shape[:2]
    ious = []
    for point in ([w // 3, h // 2], [2 * w // 3, h // 3]):
        prompt = {"point_coords": np.array([point]), "point_labels": np.array([1])}
        ious.append(mask_iou(fp32.predict(**prompt)[0][0], bf16.predict(**prompt)[0][0]))
    box = {"box": np.array([w // 4, h // 4, 3 * w // 4, 3 * h // 4]), "multimask_output": False}
    ious.append(mask_iou(fp32.predict(**box)[0][0], bf16.predict(**box)[0][0]))
    assert min(ious) > 0.95, ious


@pytest.mark.parametrize("native", [True, False])
def test_bf16_many_prompt_masks_only_where_bf16_is_native(vit_t_model, monkeypatch, native):
    """Everything mode's masks (the many-prompt decoder) run in bf16 only where it pays."""
    import tinysam.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "bf16_is_fast", lambda: native)
    image = (np.random.default_rng(1).random((96, 128, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(vit_t_model, many_prompts=2)
    predictor.set_image(image)  # fp32 features: this test is about the decoder
    points = torch.as_tensor(np.random.default_rng(2).uniform(0, 1000, (12, 1, 2)))
    labels = torch.ones(12, 1, dtype=torch.int)
    _, fp32_scores, fp32_logits = predictor.predict_torch(points.float(), labels, upscale=False)
    predictor.precision = "bf16"
    _, scores, logits = predictor.predict_torch(points.float(), labels, upscale=False)
    assert logits.dtype == torch.float32
    assert torch.equal(scores, fp32_scores)  # prompt decoding stays fp32
    if not native:
        assert torch.equal(logits, fp32_logits)  # emulated bf16 would not pay: fp32
        return
    assert not torch.equal(logits, fp32_logits)
    ious = [mask_iou(a.numpy() > 0, b.numpy() > 0) for a, b in zip(fp32_logits, logits)]
    assert np.mean(ious) > 0.98, ious


def test_int8_needs_a_quantized_model_and_bf16_a_float_one(vit_t_checkpoint, onnx_dir, tmp_path):
    with pytest.raises(BackendError, match="needs a quantized model"):
        PredictorSpec(checkpoint=vit_t_checkpoint, precision="int8").load()
    with pytest.raises(OnnxModelError, match="needs an int8 export"):
        PredictorSpec("onnx", onnx_dir=onnx_dir, precision="int8").load()
    int8 = tmp_path / "int8"
    shutil.copytree(onnx_dir, int8)
    manifest = json.loads((int8 / "tinysam_onnx.json").read_text())
    manifest["quantization"] = {"note": "marks the export as int8"}
    (int8 / "tinysam_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(OnnxModelError, match="runs in int8, not bf16"):
        PredictorSpec("onnx", onnx_dir=int8, precision="bf16").load()


def test_a_slow_precision_says_so_in_one_note(vit_t_checkpoint, monkeypatch):
    monkeypatch.setattr(perf, "bf16_is_fast", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PredictorSpec(checkpoint=vit_t_checkpoint, precision="bf16").load()
    notes = [w for w in caught if issubclass(w.category, perf.PrecisionWarning)]
    assert len(notes) == 1 and "emulated" in str(notes[0].message)
    monkeypatch.setattr(perf, "bf16_is_fast", lambda: True)
    assert perf.precision_note("bf16", "torch") is None
    assert "fp32" in perf.precision_note("bf16", "onnxruntime")
    assert perf.precision_note("fp32", "onnxruntime") is None
    monkeypatch.setattr(perf, "int8_products_saturate", lambda: True)
    assert "u8 x u8" in perf.precision_note("int8", "onnxruntime")
    monkeypatch.setattr(perf, "int8_products_saturate", lambda: False)
    assert perf.precision_note("int8", "onnxruntime") is None


def test_the_command_line_prints_the_note_once(capsys, onnx_dir, golden, tmp_path):
    code, out, err = run_cli(
        capsys, "segment", golden / "images" / "picture1.jpg", "--backend", "onnx",
        "--onnx-dir", onnx_dir, "--precision", "bf16", "--point", "10,10",
        "--out", tmp_path / "m.png",
    )  # fmt: skip
    assert code == 0, err
    assert err.strip().splitlines() == [
        "tinysam segment: note: ONNX Runtime has no bf16 kernels for the CPU: the encoder runs "
        "in fp32 (--backend torch or openvino run bf16)"
    ]
    assert (tmp_path / "m.png").is_file() and json.loads(out)["masks"]


def test_the_cli_refuses_an_unknown_precision(capsys, vit_t_checkpoint, golden):
    code, _, err = run_cli(
        capsys, "segment", golden / "images" / "picture1.jpg", "--checkpoint", vit_t_checkpoint,
        "--precision", "fp8", "--point", "10,10",
    )  # fmt: skip
    assert code == 2 and "invalid choice: 'fp8'" in err


def test_openvino_compiles_the_encoder_in_the_precision_asked(onnx_dir):
    pytest.importorskip("openvino")
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        encoder = load_encoder(onnx_dir, engine="openvino", threads=1, precision=precision)
        assert isinstance(encoder, OpenVinoEncoder) and encoder.precision_hint == hint
        compiled = str(encoder.compiled.get_property("INFERENCE_PRECISION_HINT"))
        # OpenVINO keeps float32 where the CPU has no bf16 units (the note says so).
        native = hint == "bf16" and perf.bf16_is_fast()
        assert compiled == ("<Type: 'bfloat16'>" if native else "<Type: 'float32'>")
    if not perf.bf16_is_fast():
        assert "runs in fp32" in perf.precision_note("bf16", "openvino")


def test_auto_keeps_a_winner_per_precision(onnx_dir, monkeypatch):
    monkeypatch.setattr(perf, "bf16_is_fast", lambda: True)  # else auto runs fp32 (below)
    _, fp32_key = auto_candidates(onnx_dir=onnx_dir)
    _, bf16_key = auto_candidates(onnx_dir=onnx_dir, precision="bf16")
    assert bf16_key == fp32_key + " precision bf16"


def test_auto_never_picks_an_emulated_bf16(monkeypatch, vit_t_checkpoint):
    """Where bf16 would be emulated, auto runs fp32 (and says so); a named backend runs bf16."""
    monkeypatch.setattr(perf, "bf16_is_fast", lambda: False)
    assert PredictorSpec("auto", checkpoint=vit_t_checkpoint, precision="bf16").checked() == (
        PredictorSpec("torch", checkpoint=vit_t_checkpoint)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = PredictorSpec("auto", checkpoint=vit_t_checkpoint, precision="bf16").load()
    assert predictor.precision == "fp32"
    assert any("auto runs fp32" in str(w.message) for w in caught)
    assert PredictorSpec("torch", precision="bf16").checked().precision == "bf16"
    monkeypatch.setattr(perf, "bf16_is_fast", lambda: True)
    spec = PredictorSpec("auto", checkpoint=vit_t_checkpoint, precision="bf16").checked()
    assert spec.precision == "bf16"
