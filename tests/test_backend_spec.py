"""``backends.PredictorSpec``: one home for every backend's rules, used by the command line,
the integrations and the Ray workers; and the checkpoint argument followed top-down."""

from __future__ import annotations

import pickle
import sys
from collections import Counter
from pathlib import Path

import pytest

from tinysam.backends import BackendError, PredictorSpec, load_model
from tinysam.predictor import SamPredictor


def test_the_environment_gives_a_checked_spec(monkeypatch, tmp_path, vit_t_checkpoint):
    monkeypatch.setenv("TINYSAM_CHECKPOINT", str(vit_t_checkpoint))
    monkeypatch.setenv("TINYSAM_ONNX_DIR", str(tmp_path))  # for the export backends only
    monkeypatch.setenv("TINYSAM_THREADS", "2")
    spec = PredictorSpec.from_env()
    assert (spec.backend, spec.onnx_dir, spec.threads) == ("torch", None, 2)
    assert spec.checkpoint == str(vit_t_checkpoint)
    monkeypatch.setenv("TINYSAM_BACKEND", "onnx")
    with pytest.raises(BackendError, match="are for the torch backend"):
        PredictorSpec.from_env()
    monkeypatch.delenv("TINYSAM_CHECKPOINT")
    assert PredictorSpec.from_env().onnx_dir == str(tmp_path)
    monkeypatch.setenv("TINYSAM_BACKEND", "tensorflow")
    with pytest.raises(BackendError, match="backend must be one of auto, torch, onnx"):
        PredictorSpec.from_env()
    monkeypatch.setenv("TINYSAM_BACKEND", "torch")
    monkeypatch.setenv("TINYSAM_THREADS", "many")
    with pytest.raises(ValueError, match=r"\$TINYSAM_THREADS='many' is not a positive"):
        PredictorSpec.from_env()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(backend="onnx"), "--backend onnx needs --onnx-dir DIR"),
        (dict(backend="openvino", model_type="vit_t", onnx_dir="x"), "for the torch backend"),
        (dict(backend="torch", onnx_dir="x"), "--onnx-dir is for --backend auto, onnx"),
        (dict(backend="auto", onnx_dir="x", device="cuda"), "runs on the CPU"),
        (dict(backend="torch", threads=0), "--threads must be at least 1"),
        (dict(backend="torch", device="gpu0"), "--device 'gpu0' is not a torch device"),
    ],
)
def test_rules_that_do_not_fit_the_backend_are_one_error(monkeypatch, settings, message):
    monkeypatch.delenv("TINYSAM_ONNX_DIR", raising=False)
    with pytest.raises(BackendError, match=message):
        PredictorSpec(**settings).checked()


def test_auto_without_an_export_is_torch(monkeypatch):
    monkeypatch.delenv("TINYSAM_ONNX_DIR", raising=False)
    assert PredictorSpec("auto").checked().backend == "torch"
    monkeypatch.setenv("TINYSAM_ONNX_DIR", "/an/export")
    assert PredictorSpec("auto").checked().onnx_dir == "/an/export"
    # A checkpoint named explicitly is never swapped for the environment's export.
    assert PredictorSpec("auto", checkpoint="a.pth").checked().backend == "torch"


def test_a_resolved_spec_travels_to_workers_and_loads_there(monkeypatch, vit_t_checkpoint):
    monkeypatch.setenv("TINYSAM_CHECKPOINT", str(vit_t_checkpoint))
    monkeypatch.delenv("TINYSAM_ONNX_DIR", raising=False)
    spec = PredictorSpec("auto", threads=1).resolve()
    assert spec.backend == "torch" and Path(spec.checkpoint).is_absolute()
    assert Path(spec.checkpoint) == Path(vit_t_checkpoint).resolve()
    predictor = pickle.loads(pickle.dumps(spec.load))()
    assert isinstance(predictor, SamPredictor)


def _module_entries(call) -> Counter:
    """How many times ``call`` enters each tinysam module from another module (a call whose
    caller lives elsewhere): the path an argument takes through the package."""
    package = str(Path(__import__("tinysam").__file__).parent)
    entries = Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        here = frame.f_code.co_filename
        caller = frame.f_back.f_code.co_filename if frame.f_back else ""
        if here.startswith(package) and here != caller and frame.f_code.co_name[0] != "<":
            module = Path(here).relative_to(package).as_posix()
            entries[module] += 1
            entries[f"{module}:{frame.f_code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entries


def test_a_checkpoint_enters_each_module_once_top_down(vit_t_checkpoint):
    entries = _module_entries(lambda: load_model(None, vit_t_checkpoint, progress=False))
    # backends.load_model -> checkpoint.read_checkpoint -> build.sam_from_state_dict (which
    # builds the modules and loads the checked state dict with checkpoint.load_strict).
    assert entries["checkpoint.py:read_checkpoint"] == 1, entries
    assert entries["build.py"] == entries["build.py:sam_from_state_dict"] == 1, entries
    assert entries["checkpoint.py:load_strict"] == 1, entries  # called by build
    # Nothing else: the property saying whether it is a quantized folder is the third entry.
    assert entries["checkpoint.py"] == 2 + entries["checkpoint.py:quantized"] == 3, entries
    assert not any(name.startswith("quant/") for name in entries), entries


def test_a_quantized_folder_goes_to_the_quant_store_once(tmp_path, vit_t_model):
    from tinysam.quant.model import prepare
    from tinysam.quant.store import save_quantized

    save_quantized(prepare(vit_t_model), tmp_path / "q", "vit_t")
    entries = _module_entries(lambda: load_model(None, tmp_path / "q", progress=False))
    assert entries["quant/store.py"] == 1, entries
    with pytest.raises(ValueError, match="is a quantized vit_t, not vit_b"):
        load_model("vit_b", tmp_path / "q", progress=False)
