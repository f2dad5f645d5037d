"""``--backend auto``: which backends compete, the one-time timing, the cache and its hostile
contents. Which backend wins is the machine's business; the tests check that the winner is the
one the timing (or the cache) names, never a particular one."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import pytest
import torch

from tinysam import backend_choice
from tinysam.backend_choice import BackendChoiceError, choice_file, choice_key, choose_backend
from tinysam.backends import BackendError, _threads, auto_candidates, load_predictor
from tinysam.predictor import SamPredictor
from tinysam.predictor_base import PredictorBase
from tinysam.runtime import OnnxPredictor
from tinysam.runtime.predictor import OpenVinoEncoder

from conftest import REPO, one_error_line, run_cli

SAMPLE = REPO / "assets" / "picture1.jpg"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder, and one timed run per backend (the tests check logic, not speed)."""
    monkeypatch.setenv("TINYSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backend_choice, "MEASURE_REPEATS", 1)
    return tmp_path / "cache"


def engine(predictor) -> str:
    """Which engine encodes images (a SamPredictor may hold an export's encoder)."""
    if isinstance(predictor, SamPredictor):
        encoder = predictor.image_encoder
        if encoder is None:
            return "torch"
    else:
        assert isinstance(predictor, OnnxPredictor)
        encoder = predictor.encoder
    return "openvino" if isinstance(encoder, OpenVinoEncoder) else "onnx"


def remember(backend: str, onnx_dir, threads: int | None, checkpoint=None) -> None:
    """Write the cache entry ``--backend auto`` will look up for this export (and checkpoint)."""
    factories, model_key = auto_candidates(
        checkpoint=checkpoint, onnx_dir=onnx_dir, threads=threads
    )
    key = choice_key(factories, model_key, _threads(threads))
    choice_file().parent.mkdir(parents=True, exist_ok=True)
    entries = {key: {"backend": backend}}
    choice_file().write_text(
        json.dumps({"format": "tinysam-backend-choice", "version": 1, "choices": entries})
    )


def stored() -> dict:
    return json.loads(choice_file().read_text())["choices"]


def test_an_export_is_timed_once_on_both_engines_then_the_cache_decides(
    cache, capsys, onnx_dir, golden_image, vit_t_outputs, vit_t_meta
):
    predictor = load_predictor("auto", onnx_dir=onnx_dir, threads=2)
    err = capsys.readouterr().err
    assert "choosing a backend for this machine" in err
    (key, entry), *others = stored().items()
    assert not others
    assert set(entry["encoder_ms"]) == {"onnx", "openvino"}
    fastest = min(entry["encoder_ms"], key=entry["encoder_ms"].get)
    assert entry["backend"] == fastest == engine(predictor)
    assert "export vit_t float" in key and "2 threads" in key
    assert f"-> {fastest}" in err

    # The predictor chosen answers as the golden reference does.
    predictor.set_image(golden_image)
    prompt = vit_t_meta["prompts"][0]
    _, scores, _ = predictor.predict(np.asarray(prompt["points"]), np.asarray(prompt["labels"]))
    assert np.allclose(scores, vit_t_outputs["p0_scores"], atol=1e-4)

    # Second time: nothing timed; the cache decides, even when it names the slower one.
    again = load_predictor("auto", onnx_dir=onnx_dir, threads=2)
    assert engine(again) == fastest and capsys.readouterr().err == ""
    other = ({"onnx", "openvino"} - {fastest}).pop()
    data = json.loads(choice_file().read_text())
    data["choices"][key]["backend"] = other
    choice_file().write_text(json.dumps(data))
    assert engine(load_predictor("auto", onnx_dir=onnx_dir, threads=2)) == other


def test_a_checkpoint_alone_runs_on_torch_without_timing(cache, capsys, vit_t_checkpoint):
    predictor = load_predictor("auto", checkpoint=vit_t_checkpoint)
    assert engine(predictor) == "torch"
    assert capsys.readouterr().err == "" and not cache.exists()


@pytest.mark.slow  # three engines timed, about 20 s
def test_a_checkpoint_and_its_export_compete_three_ways(cache, vit_t_checkpoint, onnx_dir):
    factories, key = auto_candidates(checkpoint=vit_t_checkpoint, onnx_dir=onnx_dir)
    assert set(factories) == {"torch", "onnx", "openvino"}
    assert str(vit_t_checkpoint.resolve()) in key and str(onnx_dir.resolve()) in key
    predictor = load_predictor("auto", checkpoint=vit_t_checkpoint, onnx_dir=onnx_dir)
    (entry,) = stored().values()
    assert set(entry["encoder_ms"]) == {"torch", "onnx", "openvino"}
    assert engine(predictor) == entry["backend"]


@pytest.mark.parametrize("winner", ["onnx", "openvino"])  # torch alone: the other tests
def test_with_both_the_winning_encoder_runs_images_and_torch_the_prompts(
    cache, vit_t_checkpoint, onnx_dir, golden_image, vit_t_meta, vit_t_outputs, winner
):
    remember(winner, onnx_dir, None, checkpoint=vit_t_checkpoint)
    predictor = load_predictor("auto", checkpoint=vit_t_checkpoint, onnx_dir=onnx_dir)
    assert isinstance(predictor, SamPredictor) and engine(predictor) == winner
    predictor.set_image(golden_image)
    embedding = predictor.get_image_embedding()
    assert isinstance(embedding, torch.Tensor)
    assert np.abs(embedding.numpy() - vit_t_outputs["image_embedding"]).max() < 1e-4
    prompt = vit_t_meta["prompts"][0]
    _, scores, _ = predictor.predict(np.asarray(prompt["points"]), np.asarray(prompt["labels"]))
    assert np.allclose(scores, vit_t_outputs["p0_scores"], atol=1e-4)
    # The everything mode's path: many one-point prompts through torch's decoder.
    coords = (
        torch.tensor([[[365.0, 225.0]]]).repeat(16, 1, 1)
        * torch.linspace(0.5, 1.5, 16)[:, None, None]
    )
    _, many, low_res = predictor.predict_torch(
        coords, torch.ones(16, 1, dtype=torch.int), upscale=False
    )
    assert many.shape == (16, 3) and low_res.shape == (16, 3, 256, 256)


def test_with_both_the_model_is_loaded_once_and_the_exports_decoders_never(
    vit_t_checkpoint, onnx_dir
):
    """The candidates share one torch model; an export candidate loads encoder.onnx alone
    (the decoders would only take memory: torch answers the prompts)."""
    factories, _ = auto_candidates(checkpoint=vit_t_checkpoint, onnx_dir=onnx_dir)
    torch_predictor = factories["torch"]()
    for name in ("onnx", "openvino"):
        predictor = factories[name]()
        assert predictor.model is torch_predictor.model
        assert engine(predictor) == name
        assert not hasattr(predictor.image_encoder, "many_prompt_decoder")
    session = factories["onnx"]().image_encoder
    assert [i.name for i in session.get_inputs()] == ["image"]


def test_an_export_encoder_needs_the_model_on_the_cpu():
    from tinysam import build_sam_vit_t

    with pytest.raises(ValueError, match="runs on the CPU"):
        SamPredictor(build_sam_vit_t().to("meta"), image_encoder=object())


def test_a_checkpoint_and_an_export_of_another_model_are_refused(cache, tmp_path, onnx_dir):
    from tinysam import build_sam_vit_t

    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_sam_vit_t().state_dict(), other)
    with pytest.raises(BackendChoiceError, match="hold different models"):
        load_predictor("auto", checkpoint=other, onnx_dir=onnx_dir)
    assert not choice_file().exists()  # nothing remembered from a refused comparison


def test_the_environment_export_never_replaces_a_named_checkpoint(
    cache, monkeypatch, onnx_dir, vit_t_checkpoint
):
    monkeypatch.setenv("TINYSAM_ONNX_DIR", str(onnx_dir))
    factories, _ = auto_candidates(checkpoint=vit_t_checkpoint)
    assert set(factories) == {"torch"}
    factories, _ = auto_candidates(model_type="vit_t")
    assert set(factories) == {"torch"}
    factories, _ = auto_candidates()
    assert set(factories) == {"onnx", "openvino"}


class Timed(PredictorBase):
    """A predictor whose encoder takes a set time and returns a set embedding: the cache and
    ranking logic under test, without a model's minutes of timing."""

    def __init__(self, seconds: float = 0.0, value: float = 1.0) -> None:
        super().__init__(64)
        self.seconds, self.value = seconds, value

    def _encode(self, resized, original_size) -> None:
        time.sleep(self.seconds)
        self.features = np.full((1, 8, 4, 4), self.value, np.float32)
        self.is_image_set = True

    def _prompt_arrays(self, coords, labels, boxes, mask):
        raise NotImplementedError("only encodes")

    def predict_torch(self, *args, **kwargs):
        raise NotImplementedError("only encodes")

    def _upscale(self, low_res):
        raise NotImplementedError("only encodes")

    def _empty(self, shape, logits):
        raise NotImplementedError("only encodes")

    @staticmethod
    def _numpy(value):
        return value


def choose(**factories):
    return choose_backend(factories, "a test model", 2, log=print)


def test_the_fastest_encoder_wins_and_is_remembered(cache, capsys):
    predictor, choice = choose(slow=lambda: Timed(0.25), fast=lambda: Timed(0.0))
    assert choice.backend == "fast" and choice.measured and isinstance(predictor, Timed)
    assert choice.encoder_ms["slow"] >= 250 > choice.encoder_ms["fast"]
    assert not predictor.is_image_set  # the timing image is not left behind
    assert "slow 2" in capsys.readouterr().out
    assert stored()[choice.key]["backend"] == "fast"
    _, again = choose(slow=lambda: Timed(0.25), fast=lambda: Timed(0.0))
    assert again.backend == "fast" and not again.measured and capsys.readouterr().out == ""
    _, again = choose_backend(
        {"slow": lambda: Timed(0.25), "fast": Timed}, "a test model", 2, remeasure=True, log=print
    )
    assert again.measured and "slow 2" in capsys.readouterr().out
    _, other_threads = choose_backend({"slow": Timed, "fast": Timed}, "a test model", 1, log=print)
    assert other_threads.measured and other_threads.key != choice.key
    assert len(stored()) == 2
    _, alone = choose(only=Timed)  # one candidate: nothing to time or remember
    assert alone.backend == "only" and not alone.measured
    assert len(stored()) == 2


def test_a_tie_in_the_kept_times_names_the_first_of_them(cache, monkeypatch):
    """The record decides as it reads: times equal to 0.1 ms name the first candidate, even
    when the unrounded second one was a few microseconds faster."""
    from tinysam import perf

    monkeypatch.setattr(perf, "interleaved_medians", lambda fns, _: {"a": 0.71484, "b": 0.71476})
    _, choice = choose(a=Timed, b=Timed)
    entry = stored()[choice.key]
    assert entry["encoder_ms"] == {"a": 714.8, "b": 714.8}
    assert choice.backend == entry["backend"] == "a"


def test_candidates_with_different_embeddings_are_refused(cache):
    with pytest.raises(BackendChoiceError, match="a and b backends hold different models"):
        choose(a=lambda: Timed(value=1.0), b=lambda: Timed(value=2.0))
    assert not choice_file().exists()
    _, choice = choose(a=lambda: Timed(value=1.0), b=lambda: Timed(value=1.01))  # int8-like
    assert choice.measured


@pytest.mark.parametrize(
    "content",
    [
        b"{ not json",
        b"\xff\xfe\x00garbage",
        b"",
        b'["a", "list"]',
        b'{"format": "something-else", "version": 1, "choices": {}}',
        b'{"format": "tinysam-backend-choice", "version": 99, "choices": {}}',
        b'{"format": "tinysam-backend-choice", "version": 1, "choices": []}',
    ],
    ids=["bad-json", "binary", "empty", "list", "foreign", "future", "choices-list"],
)
def test_a_damaged_cache_is_measured_again_and_rewritten(cache, content):
    cache.mkdir(parents=True)
    choice_file().write_bytes(content)
    _, choice = choose(slow=lambda: Timed(0.1), fast=Timed)
    assert choice.measured
    assert stored() == {choice.key: stored()[choice.key]}
    assert stored()[choice.key]["backend"] == "fast"


@pytest.mark.parametrize("backend", ["cuda-magic", 7, None, "../../etc/passwd", ["fast"]])
def test_an_entry_naming_no_candidate_is_ignored(cache, backend):
    key = choice_key(["slow", "fast"], "a test model", 2)
    cache.mkdir(parents=True)
    entries = {key: {"backend": backend}, "unrelated": "not an entry"}
    choice_file().write_text(
        json.dumps({"format": "tinysam-backend-choice", "version": 1, "choices": entries})
    )
    _, choice = choose(slow=lambda: Timed(0.1), fast=Timed)
    assert choice.measured and choice.key == key
    assert stored()[key]["backend"] == "fast"
    assert stored()["unrelated"] == "not an entry"  # other entries are kept as they were


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder's place is taken")
    monkeypatch.setenv("TINYSAM_CACHE_DIR", str(blocker))
    _, choice = choose(slow=lambda: Timed(0.1), fast=Timed)
    assert choice.backend == "fast"
    assert "warning: cannot keep the backend choice" in capsys.readouterr().out
    assert blocker.read_text() == "the cache folder's place is taken"


def test_auto_arguments_that_cannot_work_are_refused(cache, tmp_path, onnx_dir):
    with pytest.raises(BackendError, match="runs on the CPU"):
        auto_candidates(onnx_dir=onnx_dir, device="cuda")
    with pytest.raises(BackendError, match="give the checkpoint too"):
        auto_candidates(onnx_dir=onnx_dir, model_type="vit_t")
    with pytest.raises(ValueError, match="not a tinysam ONNX export"):
        auto_candidates(onnx_dir=tmp_path)
    assert not cache.exists()


def test_cli_default_backend_takes_an_export_folder(cache, capsys, tmp_path, onnx_dir):
    remember("onnx", onnx_dir, None)
    out = tmp_path / "mask.png"
    code, stdout, err = run_cli(
        capsys, "segment", SAMPLE, "--point", "365,225", "--out", out, "--onnx-dir", onnx_dir
    )
    assert code == 0 and err == ""
    assert json.loads(stdout)["masks"] == [str(out)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda"], "--device is for the torch backend"),
        (["--model", "vit_t"], "give the checkpoint too"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_cli_auto_errors(capsys, cache, onnx_dir, extra, message):
    args = ["segment", SAMPLE, "--point", "1,2", "--out", "m.png", "--onnx-dir", onnx_dir]
    code, _, err = run_cli(capsys, *args, *extra)
    assert code == 2
    assert message in one_error_line(err, "segment")


def test_ray_workers_get_the_backend_decided_once(cache, onnx_dir):
    """``predictor_spec(resolve=True)``: the driver decides, the workers load that backend."""
    import argparse

    from tinysam.cli.common import add_model_args, predictor_spec

    parser = argparse.ArgumentParser()
    add_model_args(parser, backend=True)
    args = parser.parse_args(["--onnx-dir", str(onnx_dir), "--threads", "1"])
    assert args.backend == "auto"
    remember("onnx", onnx_dir, 1)
    spec = predictor_spec(args, resolve=True)
    assert spec.backend == "onnx"
    assert os.path.isabs(spec.onnx_dir)
    assert engine(pickle.loads(pickle.dumps(spec.load))()) == "onnx"


def test_int8_exports_skip_openvino_where_its_int8_saturates(tmp_path, monkeypatch, onnx_dir):
    import shutil

    from tinysam import perf

    int8 = tmp_path / "int8"
    shutil.copytree(onnx_dir, int8)
    manifest = json.loads((int8 / "tinysam_onnx.json").read_text())
    manifest["quantization"] = {"note": "marks the export as int8"}
    (int8 / "tinysam_onnx.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(perf, "int8_products_saturate", lambda: True)
    factories, key = auto_candidates(onnx_dir=int8)
    assert set(factories) == {"onnx"} and key == "export vit_t int8"
    monkeypatch.setattr(perf, "int8_products_saturate", lambda: False)
    factories, _ = auto_candidates(onnx_dir=int8)
    assert set(factories) == {"onnx", "openvino"}
    monkeypatch.setattr(perf, "int8_products_saturate", lambda: True)
    factories, _ = auto_candidates(onnx_dir=onnx_dir)  # float exports are not affected
    assert set(factories) == {"onnx", "openvino"}


def test_ray_workers_with_both_files_read_the_cached_choice(cache, onnx_dir, vit_t_checkpoint):
    import argparse

    from tinysam.cli.common import add_model_args, predictor_spec

    parser = argparse.ArgumentParser()
    add_model_args(parser, backend=True)
    argv = ["--onnx-dir", str(onnx_dir), "--checkpoint", str(vit_t_checkpoint), "--threads", "1"]
    remember("openvino", onnx_dir, 1, checkpoint=vit_t_checkpoint)
    spec = predictor_spec(parser.parse_args(argv), resolve=True)
    assert spec.backend == "auto" and os.path.isabs(spec.checkpoint)
    predictor = pickle.loads(pickle.dumps(spec.load))()
    assert isinstance(predictor, SamPredictor) and engine(predictor) == "openvino"
