"""ONNX export and the torch-free ONNX Runtime predictor: same numbers as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from test_golden_parity import EMBED_TOL, LOGIT_TOL, MIN_MASK_IOU, SCORE_TOL, _prompt_kwargs

from tinysam.runtime import OnnxModelError, OnnxPredictor
from tinysam.runtime.contract import DECODER_INPUTS, DECODER_OUTPUTS, MANIFEST
from tinysam.runtime.onnx_export import export_onnx

from conftest import REPO, mask_iou, saturating_int8_graph, unpack_masks

MODEL_FILES = (
    "encoder.onnx",
    "decoder.onnx",
    "decoder_single.onnx",
    "decoder_many.onnx",
    "decoder_many_masks.onnx",
    "upscale_masks.onnx",
)


def test_export_writes_the_contract(onnx_dir):
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    assert manifest["model_type"] == "vit_t" and manifest["opset"] == 20
    for variant, masks in (("multimask", 4), ("single", 1)):  # segment-anything's counts
        decoder = manifest["decoders"][variant]
        assert decoder["num_masks"] == masks
        model = onnx.load(onnx_dir / decoder["file"])
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == list(DECODER_INPUTS)
        assert [o.name for o in model.graph.output] == list(DECODER_OUTPUTS)
        coords = model.graph.input[1].type.tensor_type.shape.dim
        assert all(d.dim_param for d in coords[:2])  # batch and points are dynamic
    many = onnx.load(onnx_dir / manifest["many_prompt_decoder"]["file"])
    assert [i.name for i in many.graph.input] == [
        "image_embeddings",
        "point_coords",
        "point_labels",
    ]
    assert many.graph.input[1].type.tensor_type.shape.dim[0].dim_param  # batch is dynamic
    encoder = onnx.load(onnx_dir / manifest["encoder"]["file"])
    assert [i.name for i in encoder.graph.input] == ["image"]
    ops = {node.op_type for node in encoder.graph.node}
    assert "Gelu" in ops and "Erf" not in ops  # GELU stays one op (opset 20)


def test_golden_parity(onnx_predictor, vit_t_meta, vit_t_outputs):
    """The ONNX graphs meet the golden tolerances, mask prompts included."""
    embedding = onnx_predictor.get_image_embedding()
    assert isinstance(embedding, np.ndarray) and embedding.shape == (1, 256, 64, 64)
    assert np.abs(embedding - vit_t_outputs["image_embedding"]).max() < EMBED_TOL
    height, width = vit_t_meta["orig_hw"]
    best_low_res = {}
    for i, prompt in enumerate(vit_t_meta["prompts"]):
        masks, scores, low_res = onnx_predictor.predict(**_prompt_kwargs(prompt, best_low_res))
        best_low_res[i] = low_res[np.argmax(scores)][None]
        assert masks.shape == (3, height, width) and masks.dtype == bool
        assert np.abs(scores - vit_t_outputs[f"p{i}_scores"]).max() < SCORE_TOL, f"prompt {i}"
        assert np.abs(low_res - vit_t_outputs[f"p{i}_low_res_logits"]).max() < LOGIT_TOL
        expected = unpack_masks(vit_t_outputs[f"p{i}_masks"], width)
        for k in range(3):
            assert mask_iou(masks[k], expected[k]) >= MIN_MASK_IOU, f"prompt {i} mask {k}"


def test_golden_batch_of_boxes(onnx_predictor, vit_t_meta, vit_t_outputs):
    boxes = onnx_predictor.transform.apply_boxes(
        vit_t_outputs["batch_boxes"], onnx_predictor.original_size
    )
    masks, scores, low_res = onnx_predictor.predict_torch(
        None, None, boxes=boxes, return_logits=True
    )
    assert isinstance(masks, np.ndarray)  # numpy in, numpy out
    assert np.abs(scores - vit_t_outputs["batch_iou_predictions"]).max() < SCORE_TOL
    assert np.abs(low_res - vit_t_outputs["batch_low_res_logits"]).max() < LOGIT_TOL
    width = vit_t_meta["orig_hw"][1]
    expected = unpack_masks(vit_t_outputs["batch_masks"], width)
    for b in range(4):
        for k in range(3):
            assert mask_iou(masks[b, k] > 0, expected[b, k]) >= MIN_MASK_IOU, f"box {b} mask {k}"
    mean_std = np.stack([masks.mean(axis=(-2, -1)), masks.std(axis=(-2, -1), ddof=1)])
    assert np.allclose(mean_std, vit_t_outputs["batch_mask_logits_stats"], atol=1e-3, rtol=1e-4)


def test_matches_torch_on_point_batches(onnx_predictor, predictor):
    """Many prompts at once (the everything mode's call), torch tensors in and out."""
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(12, 2, 2, generator=generator) * 1000
    labels = torch.tensor([[1, 0]] * 12)
    for multimask in (True, False):
        ours = onnx_predictor.predict_torch(
            coords, labels, multimask_output=multimask, upscale=False
        )
        reference = predictor.predict_torch(
            coords, labels, multimask_output=multimask, upscale=False
        )
        assert ours[0] is None and isinstance(ours[1], torch.Tensor)
        assert ours[1].shape == reference[1].shape == (12, 3 if multimask else 1)
        assert (ours[1] - reference[1]).abs().max() < SCORE_TOL
        assert (ours[2] - reference[2]).abs().max() < LOGIT_TOL


def test_many_prompt_graph_matches_torch(onnx_predictor, predictor, monkeypatch):
    """Bulk one-point prompts (the everything mode's call) take decoder_many.onnx, in chunks
    of 16; same numbers as the torch predictor and as the web-demo decoder graph."""
    generator = torch.Generator().manual_seed(2)
    coords = torch.rand(21, 1, 2, generator=generator) * 1000
    labels = torch.ones(21, 1)
    calls = []
    session = onnx_predictor.many_prompt_decoder
    monkeypatch.setattr(
        onnx_predictor, "many_prompt_decoder", _Recording(session, calls), raising=True
    )
    for multimask in (True, False):
        ours = onnx_predictor.predict_torch(
            coords, labels, multimask_output=multimask, upscale=False
        )
        reference = predictor.predict_torch(
            coords, labels, multimask_output=multimask, upscale=False
        )
        assert ours[1].shape == reference[1].shape == (21, 3 if multimask else 1)
        assert (ours[1] - reference[1]).abs().max() < SCORE_TOL
        assert (ours[2] - reference[2]).abs().max() < LOGIT_TOL
    assert calls == [16, 5, 16, 5]
    # With min_iou, masks only for prompts that pass it, NaN elsewhere, as SamPredictor.
    full = reference
    # A threshold between two scores, far from both (the backends differ by ~1e-7).
    ordered = reference[1].flatten().sort().values
    middle = int(torch.argmax(ordered[6:15].diff())) + 6
    threshold = float(ordered[middle : middle + 2].mean())
    ours = onnx_predictor.predict_torch(
        coords, labels, multimask_output=False, upscale=False, min_iou=threshold
    )
    reference = predictor.predict_torch(
        coords, labels, multimask_output=False, upscale=False, min_iou=threshold
    )
    made = ~ours[2].isnan().flatten(1).all(dim=1)
    assert torch.equal(made, ~reference[2].isnan().flatten(1).all(dim=1))
    assert 0 < int(made.sum()) < 21
    assert (ours[2][made] - reference[2][made]).abs().max() < LOGIT_TOL
    assert calls == [16, 5, 16, 5, 16, 5]
    monkeypatch.setattr(onnx_predictor, "many_prompts", 1 << 30)  # the plain decoder instead
    plain = onnx_predictor.predict_torch(coords, labels, multimask_output=False, upscale=False)
    assert calls == [16, 5, 16, 5, 16, 5]
    assert (plain[2] - full[2]).abs().max() < LOGIT_TOL


class _Recording:
    """An ONNX Runtime session that records the batch size of every run."""

    def __init__(self, session, calls: list) -> None:
        self.session, self.calls = session, calls

    def run(self, outputs, feeds):
        self.calls.append(feeds["point_coords"].shape[0])
        return self.session.run(outputs, feeds)


def test_single_mask_and_mask_batches(onnx_predictor, predictor):
    point = np.array([[400.0, 300.0]])
    ours = onnx_predictor.predict(point, [1], multimask_output=False)
    reference = predictor.predict(point, [1], multimask_output=False)
    assert ours[0].shape[0] == 1
    assert np.abs(ours[1] - reference[1]).max() < SCORE_TOL
    assert mask_iou(ours[0][0], reference[0][0]) >= MIN_MASK_IOU
    # A batch whose prompt sets carry their own mask inputs runs them one by one.
    masks = torch.from_numpy(np.stack([reference[2], -reference[2]]))
    coords = torch.tensor([[[400.0, 300.0]], [[200.0, 100.0]]])
    args = (coords, torch.ones(2, 1), None, masks)
    ours = onnx_predictor.predict_torch(*args, upscale=False)
    reference = predictor.predict_torch(*args, upscale=False)
    assert (ours[1] - reference[1]).abs().max() < SCORE_TOL
    assert (ours[2] - reference[2]).abs().max() < LOGIT_TOL


def test_everything_runs_on_the_onnx_backend(onnx_predictor, predictor, golden_image):
    from tinysam import SamAutomaticMaskGenerator

    kwargs = dict(points_per_side=4, pred_iou_thresh=0.3, stability_score_thresh=0.3)
    ours = SamAutomaticMaskGenerator(onnx_predictor, **kwargs).generate(golden_image)
    reference = SamAutomaticMaskGenerator(predictor, **kwargs).generate(golden_image)
    assert len(ours) == len(reference) > 0
    for a, b in zip(ours, reference):
        assert mask_iou(a["segmentation"], b["segmentation"]) >= MIN_MASK_IOU
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=SCORE_TOL)
    # The generator leaves the predictor's image set: put the golden one back for others.
    onnx_predictor.set_image(golden_image)
    predictor.set_image(golden_image)


def test_bad_export_directories(tmp_path, onnx_dir):
    with pytest.raises(OnnxModelError, match="not found"):
        OnnxPredictor(tmp_path / "nowhere")
    with pytest.raises(OnnxModelError, match="not a tinysam ONNX export"):
        OnnxPredictor(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(OnnxModelError, match="unreadable"):
        OnnxPredictor(tmp_path)
    (tmp_path / MANIFEST).write_text((onnx_dir / MANIFEST).read_text())
    with pytest.raises(OnnxModelError, match="lacks encoder.onnx, decoder.onnx"):
        OnnxPredictor(tmp_path)
    for name in MODEL_FILES:
        (tmp_path / name).write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="cannot load .*encoder.onnx.*export again"):
        OnnxPredictor(tmp_path)


def test_predict_needs_a_point_or_box(onnx_predictor):
    with pytest.raises(ValueError, match="at least one point or a box"):
        onnx_predictor.predict()


def test_export_rejects_old_opsets(vit_t_model, tmp_path):
    with pytest.raises(ValueError, match="opset must be at least 18"):
        export_onnx(vit_t_model, tmp_path, "vit_t", opset=17)
    assert list(tmp_path.iterdir()) == []


BLOCK_TORCH = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"blocked: {name}", name=name)

sys.meta_path.insert(0, BlockTorch())
"""


def test_runtime_works_without_torch(onnx_dir, golden, tmp_path):
    """The ONNX predictor and `tinysam segment --backend onnx` never import torch."""
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        from tinysam.io import load_image
        from tinysam.runtime import OnnxPredictor

        p = OnnxPredictor({str(onnx_dir)!r}, threads=1)
        p.set_image(load_image({str(golden / "images" / "picture1.jpg")!r}))
        masks, scores, low_res = p.predict(np.array([[365, 225]]), np.array([1]))
        assert masks.shape[0] == 3 and masks.dtype == bool and masks.any()
        try:
            p.predict(np.array([[np.nan, 1.0]]), np.array([1]))
        except ValueError as err:
            assert "point_coords contains NaN" in str(err)
        else:
            raise AssertionError("NaN accepted")

        from tinysam.cli import main
        code = main(["segment", {str(golden / "images" / "picture1.jpg")!r},
                     "--point", "365,225", "--out", {str(tmp_path / "mask.png")!r},
                     "--backend", "onnx", "--onnx-dir", {str(onnx_dir)!r}, "--threads", "1"])
        assert code == 0, code
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    assert (tmp_path / "mask.png").is_file()


def test_torch_paths_say_which_extra_is_missing(tmp_path, golden):
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from tinysam.cli import main
        code = main(["segment", {str(golden / "images" / "picture1.jpg")!r},
                     "--point", "365,225", "--out", {str(tmp_path / "mask.png")!r}])
        sys.exit(code)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tinysam segment: error: this needs torch: pip install 'tinysam[torch]'"
    )


def test_no_slow_paths_in_the_exported_graphs(onnx_dir):
    from tinysam.runtime.profile import slow_ops

    for name in MODEL_FILES:
        assert slow_ops(onnx_dir / name, threads=1) == {}, name


def test_slow_path_check_finds_a_split_gelu(tmp_path):
    """A GELU exported below opset 20 (Erf and friends) is what the check exists to catch."""
    from onnx import TensorProto, helper

    from tinysam.runtime.profile import slow_ops

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "erf.onnx")
    assert slow_ops(tmp_path / "erf.onnx", threads=1) == {"Erf": 1}


def test_openvino_encoder_meets_the_golden_tolerances(onnx_dir, golden_image, vit_t_outputs):
    """OpenVINO runs encoder.onnx in float32 (not its bf16 default on AVX-512 CPUs)."""
    predictor = OnnxPredictor(onnx_dir, threads=2, encoder_engine="openvino")
    predictor.set_image(golden_image)
    embedding = predictor.get_image_embedding()
    assert embedding.dtype == np.float32
    assert np.abs(embedding - vit_t_outputs["image_embedding"]).max() < EMBED_TOL
    _, scores, low_res = predictor.predict(np.array([[365.0, 225.0]]), np.array([1]))
    assert np.abs(low_res - vit_t_outputs["p0_low_res_logits"]).max() < LOGIT_TOL


def test_openvino_runs_int8_graphs_only_where_they_are_exact(tmp_path, monkeypatch):
    from tinysam import perf
    from tinysam.runtime.predictor import OpenVinoEncoder

    path = tmp_path / "encoder.onnx"
    exact = saturating_int8_graph(path)
    x = np.full((4, 64), 127.0, np.float32)
    if perf.int8_products_saturate():  # this CPU: refused, and rightly so
        with pytest.raises(OnnxModelError, match="saturate on this CPU.*--backend onnx"):
            OpenVinoEncoder(path, 1, quantized=True)
        raw = OpenVinoEncoder(path, 1)  # the same graph, let through as if it were float
        assert not np.array_equal(raw.run(None, {"image": x})[0], exact), (
            "OpenVINO's int8 is exact on this CPU now: the guard can go"
        )
    else:
        encoder = OpenVinoEncoder(path, 1, quantized=True)
        np.testing.assert_array_equal(encoder.run(None, {"image": x})[0], exact)
    # The decision follows the CPU's flags.
    monkeypatch.setattr(perf.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(perf, "cpu_flags", lambda: ("an x86", {"avx2", "fma"}))
    assert perf.int8_products_saturate()
    monkeypatch.setattr(perf, "cpu_flags", lambda: ("an x86", {"avx512f", "avx512_vnni"}))
    assert not perf.int8_products_saturate()
    OpenVinoEncoder(path, 1, quantized=True)  # compiles
    monkeypatch.setattr(perf.platform, "machine", lambda: "aarch64")
    assert not perf.int8_products_saturate()


def test_sessions_share_one_arena_with_the_same_results(onnx_dir, onnx_predictor):
    """Sessions allocate from the process's shared arena (see ``use_shared_arena``); a session
    with its own arena gives the same numbers."""
    import onnxruntime as ort

    from tinysam.runtime.predictor import session_options

    shared, own = session_options(2), session_options(2, shared_arena=False)
    assert shared.get_session_config_entry("session.use_env_allocators") == "1"
    assert not shared.enable_mem_pattern and own.enable_mem_pattern
    path = str(onnx_dir / "decoder_many.onnx")
    feeds = {
        "image_embeddings": onnx_predictor.features,
        "point_coords": np.array([[[500.0, 300.0], [0.0, 0.0]]] * 3, np.float32),
        "point_labels": np.array([[1.0, -1.0]] * 3, np.float32),
    }
    results = [
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, feeds)
        for options in (shared, own)
    ]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_unknown_encoder_engine(onnx_dir):
    from tinysam.runtime.predictor import load_encoder

    message = "encoder_engine must be one of onnxruntime, openvino"
    with pytest.raises(ValueError, match=message):
        OnnxPredictor(onnx_dir, encoder_engine="tensorrt")
    with pytest.raises(ValueError, match=message):
        load_encoder(onnx_dir, engine="tensorrt")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_encoder_alone_and_after_its_memory_is_released(
    onnx_dir, onnx_predictor, golden_image, vit_t_outputs, engine
):
    """``load_encoder`` loads encoder.onnx alone; an engine that frees its activations between
    runs (OpenVINO's ``release_memory``) gives the same embedding after it."""
    from tinysam.runtime.predictor import load_encoder

    encoder = load_encoder(onnx_dir, engine=engine, threads=2)
    image = onnx_predictor.preprocess(onnx_predictor.transform.apply_image(golden_image))
    first = encoder.run(None, {"image": image})[0]
    assert np.abs(first - vit_t_outputs["image_embedding"]).max() < EMBED_TOL
    if engine == "openvino":
        encoder.release_memory()
        encoder.release_memory()  # nothing held: a no-op
    np.testing.assert_array_equal(encoder.run(None, {"image": image})[0], first)


def test_the_many_prompt_paths_free_the_encoders_activations_first(
    onnx_dir, vit_t_checkpoint, golden_image
):
    """Everything mode's decoder runs after the encoder: an encoder engine that keeps its
    activations is asked to free them before the many-prompt decoder, on both prompt paths
    (torch's, with an export's encoder, and ONNX Runtime's)."""
    from tinysam import SamPredictor
    from tinysam.backends import load_predictor
    from tinysam.runtime.predictor import load_encoder

    class Counting:
        def __init__(self, inner):
            self.inner, self.released = inner, 0

        def run(self, outputs, feeds):
            return self.inner.run(outputs, feeds)

        def release_memory(self):
            self.released += 1

    model = load_predictor("torch", checkpoint=vit_t_checkpoint).model
    hybrid_encoder = Counting(load_encoder(onnx_dir, threads=2))
    onnx = OnnxPredictor(onnx_dir, threads=2)
    onnx.encoder = Counting(onnx.encoder)
    cases = [
        (SamPredictor(model, image_encoder=hybrid_encoder), hybrid_encoder, torch.as_tensor),
        (onnx, onnx.encoder, np.asarray),
    ]
    coords = np.linspace([100.0, 100.0], [600.0, 500.0], 8)[:, None, :]
    for predictor, encoder, as_array in cases:
        predictor.set_image(golden_image)
        assert encoder.released == 0
        points = predictor.transform.apply_coords(coords, predictor.original_size)
        _, scores, _ = predictor.predict_torch(
            as_array(points.astype(np.float32)), as_array(np.ones((8, 1), np.int32)), upscale=False
        )
        assert tuple(scores.shape) == (8, 3) and encoder.released == 1


def test_sam_vit_encoder_exports(golden, tmp_path):
    """SAM's ViT (the golden small config: windowed and global attention, relative positions)
    exports and meets the golden tolerance under ONNX Runtime."""
    from functools import partial

    import onnxruntime as ort

    from tinysam.build import sam_around
    from tinysam.io import load_image
    from tinysam.modeling import ImageEncoderViT
    from tinysam.runtime import session_options
    from tinysam.runtime.onnx_export import export_encoder, save_onnx
    from tinysam.transforms import ResizeLongestSide

    meta = json.loads((golden / "vit_small_seed3_meta.json").read_text())
    encoder = ImageEncoderViT(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **meta["config"])
    state = torch.load(golden / "vit_small_seed3_encoder.pth", weights_only=True)
    encoder.load_state_dict(state, strict=True)
    sam = sam_around(encoder)
    save_onnx(export_encoder(sam), tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), session_options(2))

    image = load_image(golden / "images" / meta["image"])
    resized = ResizeLongestSide(1024).apply_image(image).astype(np.float32)
    x = np.zeros((1, 3, 1024, 1024), np.float32)
    mean = sam.pixel_mean.numpy()
    std = sam.pixel_std.numpy()
    x[0, :, : resized.shape[0], : resized.shape[1]] = (resized.transpose(2, 0, 1) - mean) / std
    out = session.run(None, {"image": x})[0]
    expected = np.load(golden / "vit_small_seed3_outputs.npz")["image_embedding"]
    assert np.abs(out - expected).max() < EMBED_TOL


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("encoder"), "encoder is missing"),
        (lambda m: m.__setitem__("decoders", []), "decoders must be an object"),
        (lambda m: m["decoders"].pop("multimask"), "decoders.multimask is missing"),
        (lambda m: m.__setitem__("image_size", "1024"), "image_size must be an integer"),
        (lambda m: m.__setitem__("pixel_mean", [1, 2]), "pixel_mean must be a list of 3"),
        (lambda m: m.__setitem__("mask_threshold", None), "mask_threshold must be a finite"),
        (lambda m: m.__setitem__("image_format", "CMYK"), "image_format must be RGB or BGR"),
        (
            lambda m: m["encoder"].__setitem__("file", "../../elsewhere.onnx"),
            "encoder.file must be a file name in the same folder",
        ),
        (lambda m: m["upscale"].pop("file"), "upscale.file must be a non-empty string"),
    ],
)
def test_malformed_manifests_name_the_field(tmp_path, onnx_dir, change, message):
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    change(manifest)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnnxModelError, match=message) as err:
        OnnxPredictor(tmp_path)
    assert str(tmp_path / MANIFEST) in str(err.value) and "export again" in str(err.value)
