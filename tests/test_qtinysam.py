"""Q-TinySAM as the authors publish it: a whole pickled model with their ``InferQuant*`` layers
(tests/golden/qtinysam/README.md), read without running anything in the file, and computing
what their ``quant_forward`` computes."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinysam.backends import load_model
from tinysam.checkpoint import CheckpointError
from tinysam.pickled_modules import flatten, read_pickled_module
from tinysam.predictor import SamPredictor

from conftest import GOLDEN, one_error_line, run_cli

QT = GOLDEN / "qtinysam"
FILE = QT / "qtinysam_seed0.pth"


@pytest.fixture(scope="module")
def published():
    sam, _ = load_model(None, FILE, progress=False)
    return sam


@pytest.fixture(scope="module")
def meta():
    return json.loads((QT / "qtinysam_seed0_meta.json").read_text())


# ---------------------------------------------------------------- the authors' semantics, restated
# Written here from the format's description (tests/golden/qtinysam/README.md), independently of
# tinysam.quant: an oracle for every layer.


def _q(x, interval, lo=-128, hi=127):
    return torch.clamp(torch.round(x / interval), lo, hi) * interval


def oracle_linear(layer, x, post_gelu):
    b = layer["_buffers"]
    w = layer["_parameters"]["weight"].detach()
    n_v, n_h, n_a = int(b["n_V"]), int(b["n_H"]), int(b["n_a"])
    w_q = _q(w.reshape(n_v, w.shape[0] // n_v, n_h, w.shape[1] // n_h), b["w_interval"])
    parts = torch.stack(x.chunk(n_a, dim=-1), dim=-2)
    if post_gelu:
        x_q = _q(parts, b["a_interval"], 0, 127) + _q(parts, b["a_neg_interval"], -128, 0)
    else:
        x_q = _q(parts, b["a_interval"])
    bias = layer["_parameters"].get("bias")
    return F.linear(x_q.reshape(x.shape), w_q.reshape(w.shape), bias)


def oracle_conv(layer, x, transposed, module):
    b = layer["_buffers"]
    w_q = _q(layer["_parameters"]["weight"].detach(), b["w_interval"])
    x_q = _q(x - b["a_bias"], b["a_interval"]) + b["a_bias"]
    bias = layer["_parameters"].get("bias")
    if transposed:
        return F.conv_transpose2d(x_q, w_q, bias, module.stride, module.padding)
    return F.conv2d(x_q, w_q, bias, module.stride, module.padding, module.dilation, module.groups)


def _records(root, prefix=""):
    for name, child in vars(root)["_modules"].items():
        path = f"{prefix}{name}"
        kind = type(child).class_name.rsplit(".", 1)[-1]
        if kind.startswith("InferQuant"):
            yield path, kind, vars(child)
        elif child is not None:
            yield from _records(child, path + ".")


def test_every_quantized_layer_computes_the_authors_formula_exactly(published, meta):
    root = read_pickled_module(FILE)
    layers = list(_records(root))
    assert len(layers) == len(meta["layers"]) == published.published_quantization["layers"]
    generator = torch.Generator().manual_seed(0)
    for path, kind, layer in layers:
        module = published.get_submodule(path)
        if kind.startswith("InferQuantLinear"):
            x = torch.randn(2, 3, module.in_features, generator=generator) * 2
            expected = oracle_linear(layer, x, kind == "InferQuantLinearPost")
        else:
            channels = module.in_channels
            x = torch.randn(1, channels, 6, 6, generator=generator) * 2
            expected = oracle_conv(layer, x, kind == "InferQuantConvTranspose2d", module)
        with torch.no_grad():
            assert torch.equal(module(x), expected), path


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_the_authors_outputs_are_reproduced(published, meta, golden):
    """Against what the authors' SamPredictor answered with this file (on another machine): the
    masks and scores. The image embedding follows the authors' float order, and their 8-bit
    layers round the CPU's float noise to one level or the next: the authors' own code, run on
    this repository's AVX2 EPYC, is 3% of the embedding's largest value away from the fixture
    too, and our model equals it bit for bit (docs: README "Q-TinySAM, the published file")."""
    from tinysam.io import load_image

    reference = np.load(QT / "qtinysam_seed0_outputs.npz")
    predictor = SamPredictor(published)
    predictor.set_image(load_image(golden / "images" / meta["image"]))
    embedding = predictor.get_image_embedding().numpy()
    largest = np.abs(reference["image_embedding"]).max()
    assert np.abs(embedding - reference["image_embedding"]).max() < 0.05 * largest
    ious = []
    for name, prompt in meta["prompts"].items():
        masks, scores, _ = predictor.predict(**{k: np.array(v) for k, v in prompt.items()})
        assert np.abs(scores - reference[f"{name}_scores"]).max() < 5e-3, name
        ious += [_iou(m, r) for m, r in zip(masks, reference[f"{name}_masks"])]
    assert min(ious) > 0.96 and np.mean(ious) > 0.98, ious


def test_the_file_loads_wherever_a_checkpoint_does(capsys, tmp_path, published):
    from tinysam import sam_model_registry
    from tinysam.build_sam import build_sam_vit_t

    for build in (sam_model_registry["vit_t"], build_sam_vit_t):
        sam = build(checkpoint=FILE)
        assert sam.published_quantization == published.published_quantization
    with pytest.raises(CheckpointError, match="is a vit_t model, not vit_b"):
        sam_model_registry["vit_b"](checkpoint=FILE)
    code, out, _ = run_cli(capsys, "info", "--checkpoint", FILE)
    assert code == 0 and "quantized:   Q-TinySAM (the authors' pickled W8A8 model)" in out
    image = GOLDEN / "images" / "picture1.jpg"
    mask = tmp_path / "m.png"
    args = ["segment", image, "--point", "346,423", "--checkpoint", FILE, "--out", mask]
    code, out, err = run_cli(capsys, *args, "--backend", "torch")
    assert code == 0, err
    assert json.loads(out)["masks"] == [str(mask)] and mask.is_file()


# --------------------------------------------------------------------------- hostile files


class _Payload:
    """Pickles as a call of ``function(*args)``: what a malicious file does on load."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _NotAModule:
    pass


def _hostile_files(tmp_path, marker):
    import builtins
    import os

    command = f"touch {marker}"
    yield "os.system", _Payload(os.system, command), "global posix.system"
    yield "eval", _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"
    yield "exec", {"model": _Payload(builtins.exec, "x = 1")}, "builtins.exec"
    yield "class", _NotAModule(), "test_qtinysam._NotAModule"
    yield "getattr", _Payload(getattr, "text", "upper"), "builtins.getattr"


@pytest.mark.parametrize("case", ["os.system", "eval", "exec", "class", "getattr"])
def test_a_file_that_names_anything_else_is_refused_and_nothing_runs(capsys, tmp_path, case):
    marker = tmp_path / "payload-ran"
    cases = {name: (obj, global_) for name, obj, global_ in _hostile_files(tmp_path, marker)}
    obj, global_ = cases[case]
    path = tmp_path / f"{case}.pth"
    torch.save(obj, path)
    code, _, err = run_cli(capsys, "info", "--checkpoint", path)
    line = one_error_line(err, "info")
    assert code == 2 and str(path) in line and "not allowed" in line
    assert global_.split(".")[-1] in line
    with pytest.raises(CheckpointError, match="not allowed"):
        load_model(None, path, progress=False)
    assert not marker.exists()


def test_truncated_and_foreign_pickles_are_one_line(capsys, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(FILE.read_bytes()[: 1 << 20])
    code, _, err = run_cli(capsys, "info", "--checkpoint", truncated)
    assert code == 2 and "corrupt or not a PyTorch file" in one_error_line(err, "info")
    other = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), other)  # a pickled module, not SAM
    code, _, err = run_cli(capsys, "info", "--checkpoint", other)
    assert code == 2 and "is not a SAM/TinySAM model" in one_error_line(err, "info")


class _Claim:
    """Pickles as a tensor that claims ``n`` elements of a 4-element storage."""

    def __init__(self, n):
        self.storage = torch.zeros(4).untyped_storage()
        self.n = n

    def __reduce__(self):
        import collections

        typed = torch.storage.TypedStorage(
            wrap_storage=self.storage, dtype=torch.float32, _internal=True
        )
        args = (typed, 0, (self.n,), (1,), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


@pytest.mark.parametrize("whole_model", [False, True])
def test_a_tensor_claiming_more_than_its_storage_is_refused(tmp_path, whole_model):
    """A 2 KB file claiming an 8 GB tensor: one line, and nothing allocated (the command's own
    peak memory, read inside its process)."""
    import subprocess

    from test_memory_bounds import CLI_WITH_PEAK

    from conftest import REPO

    path = tmp_path / "claim.pth"
    claim = {"image_encoder.x": _Claim(2_000_000_000)}
    torch.save([nn.ReLU(), claim] if whole_model else claim, path)  # a module: the pickle path
    assert path.stat().st_size < 4096
    result = subprocess.run(
        [sys.executable, "-c", CLI_WITH_PEAK, "info", "--checkpoint", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    *lines, peak = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "corrupt or not a PyTorch file" in lines[0] and str(path) in lines[0]
    assert int(peak.split()[1]) < 2 << 20, peak  # KiB: well under the 8 GB claimed


# ---------------------------------------------------------- files made like the authors' file


@pytest.fixture
def authors_classes(monkeypatch):
    """Classes named as the authors' layers (``quantization_layer.layers.InferQuant*``) that
    compute their semantics (the oracles above), so ``torch.save`` writes their format."""
    module = types.ModuleType("quantization_layer.layers")
    package = types.ModuleType("quantization_layer")
    package.layers = module

    def make(name, base, forward):
        cls = type(name, (base,), {"forward": forward, "__module__": module.__name__})
        setattr(module, name, cls)
        return cls

    def linear(post):
        def forward(self, x):
            return oracle_linear(vars(self), x, post)

        return forward

    def conv(transposed):
        def forward(self, x):
            return oracle_conv(vars(self), x, transposed, self)

        return forward

    classes = {
        "linear": make("InferQuantLinear", nn.Linear, linear(False)),
        "post": make("InferQuantLinearPost", nn.Linear, linear(True)),
        "conv": make("InferQuantConv2d", nn.Conv2d, conv(False)),
        "conv_transpose": make("InferQuantConvTranspose2d", nn.ConvTranspose2d, conv(True)),
    }
    monkeypatch.setitem(sys.modules, "quantization_layer", package)
    monkeypatch.setitem(sys.modules, "quantization_layer.layers", module)
    return classes


# Paths, kinds and block layouts (n_V, n_H, n_a) other than the fixture's.
LAYOUTS = [
    ("image_encoder.layers.1.blocks.0.attn.qkv", "linear", (4, 2, 4)),
    ("image_encoder.layers.1.blocks.1.mlp.fc2", "post", (2, 8, 2)),
    ("image_encoder.layers.2.blocks.3.attn.proj", "linear", (1, 1, 1)),
    ("image_encoder.patch_embed.seq.2.c", "conv", None),
    ("image_encoder.layers.2.blocks.0.local_conv.c", "conv", None),
    ("image_encoder.neck.0", "conv", None),
    ("mask_decoder.transformer.layers.0.mlp.lin2", "post", (8, 1, 4)),
    ("mask_decoder.transformer.final_attn_token_to_image.q_proj", "linear", (2, 4, 1)),
    ("mask_decoder.output_upscaling.0", "conv_transpose", None),
]


def _authors_file(sam, classes, path, layouts=LAYOUTS, interval=None):
    import copy

    model = copy.deepcopy(sam)
    for name, kind, blocks in layouts:
        layer = model.get_submodule(name)
        layer.__class__ = classes[kind]
        layer.mode, layer.w_bit, layer.a_bit = "quant_forward", 8, 8
        weight = layer.weight.detach()
        if kind in ("linear", "post"):
            n_v, n_h, n_a = blocks
            if interval is None:
                rows = weight.reshape(n_v, weight.shape[0] // n_v, n_h, weight.shape[1] // n_h)
                w_interval = rows.abs().amax(dim=(1, 3), keepdim=True) / 127
            layer.register_buffer("w_interval", w_interval if interval is None else interval)
            layer.register_buffer("a_interval", torch.linspace(0.02, 0.05, n_a).reshape(n_a, 1))
            for key, value in zip(("n_V", "n_H", "n_a"), blocks):
                layer.register_buffer(key, torch.tensor(value, dtype=torch.int32))
            if kind == "post":
                layer.register_buffer("a_neg_interval", torch.tensor(0.16997124254703522 / 128))
        else:
            axis = 1 if kind == "conv_transpose" else 0
            dims = [d for d in range(weight.ndim) if d != axis]
            w_interval = weight.abs().amax(dim=dims, keepdim=True) / 127
            layer.register_buffer("w_interval", w_interval)
            layer.register_buffer("a_interval", torch.tensor(0.03))
            layer.register_buffer("a_bias", torch.tensor(0.1))
            layer.register_buffer("n_V", torch.tensor(1, dtype=torch.int32))
            layer.register_buffer("n_H", torch.tensor(1, dtype=torch.int32))
    torch.save(model, path)
    return model


def test_another_file_with_other_layouts_equals_its_oracle(tmp_path, vit_t_model, authors_classes):
    """A file written like the authors' (their class names, other layouts and placements): our
    model from it equals the model it was saved from, run in the reference's float order."""
    from tinysam.quant.published import reference_order

    oracle = reference_order(_authors_file(vit_t_model, authors_classes, tmp_path / "q.pth"))
    ours, _ = load_model(None, tmp_path / "q.pth", progress=False)
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embedding = ours.image_encoder(image)
        assert torch.equal(embedding, oracle.image_encoder(image))
    a, b = SamPredictor(ours), SamPredictor(oracle)
    picture = (np.random.default_rng(2).random((300, 400, 3)) * 255).astype(np.uint8)
    a.set_image(picture)
    b.set_image(picture)
    for prompt in ({"point_coords": np.array([[120, 80]]), "point_labels": np.array([1])},
                   {"box": np.array([30, 40, 250, 200])}):  # fmt: skip
        masks_a, scores_a, low_a = a.predict(**prompt)
        masks_b, scores_b, low_b = b.predict(**prompt)
        np.testing.assert_array_equal(scores_a, scores_b)
        np.testing.assert_array_equal(low_a, low_b)


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"blocks": (7, 1, 1), "interval": "ones"}, "do not divide its"),
        ({"interval": "nan"}, "finite positive intervals"),
        ({"interval": "zero"}, "finite positive intervals"),
    ],
)
def test_impossible_layers_are_one_line(
    capsys, tmp_path, vit_t_model, authors_classes, damage, message
):
    name = "image_encoder.layers.1.blocks.0.attn.qkv"
    blocks = damage.get("blocks", (2, 2, 1))
    interval = None
    if "interval" in damage:
        interval = torch.full((blocks[0], 1, blocks[1], 1), 0.01)
        if damage["interval"] != "ones":
            interval[0] = float("nan") if damage["interval"] == "nan" else 0.0
    path = tmp_path / "bad.pth"
    _authors_file(vit_t_model, authors_classes, path, [(name, "linear", blocks)], interval)
    code, _, err = run_cli(capsys, "info", "--checkpoint", path)
    line = one_error_line(err, "info")
    assert code == 2 and message in line and name in line and str(path) in line


def test_the_record_tree_holds_no_real_module(tmp_path):
    root = read_pickled_module(FILE)
    assert type(root).__mro__[1].__name__ == "ModuleRecord"
    assert not isinstance(root, nn.Module)
    flat = flatten(root, "x")
    assert len(flat.quantized) == 118 and "image_encoder.neck.0.weight" in flat.state_dict
