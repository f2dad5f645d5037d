"""Checkpoint reading: safe, strict, and one clear message for every way it can go wrong."""

from __future__ import annotations

import collections

import pytest
import torch

from tinysam import build_sam_vit_h, build_sam_vit_t, load_model
from tinysam.build import CheckpointError, detect_model_type, read_state_dict


class NotATensor:
    """Pickled by reference: weights_only loading must refuse it."""


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_sam_vit_t(tmp_path / "nope.pth")


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        read_state_dict(tmp_path)


def test_truncated_file(tmp_path, vit_t_checkpoint):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(vit_t_checkpoint.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        build_sam_vit_t(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_state_dict(bad)


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        read_state_dict(path)


def test_non_tensor_values_rejected(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a state_dict of tensors"):
        read_state_dict(path)


def test_wrong_model_type_names_what_it_is(vit_t_checkpoint):
    # Fails before building the 600M-parameter ViT-H.
    with pytest.raises(CheckpointError, match=r"is a vit_t model, not vit_h; use --model vit_t"):
        build_sam_vit_h(vit_t_checkpoint)


def test_teacher_checkpoint_into_student(tmp_path):
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, path)
    with pytest.raises(CheckpointError, match="is a vit_b model, not vit_t"):
        build_sam_vit_t(path)


def test_encoder_only_checkpoint(golden):
    with pytest.raises(CheckpointError, match="image encoder alone"):
        build_sam_vit_t(golden / "vit_small_seed3_encoder.pth")


def test_unknown_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.stem.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a SAM/TinySAM model.*backbone.stem.weight"):
        load_model(checkpoint=path)


def test_missing_key_is_named(tmp_path, vit_t_checkpoint):
    state = torch.load(vit_t_checkpoint, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. mask_decoder.iou_token.weight\)"):
        build_sam_vit_t(path)


def test_wrong_shape_is_named(tmp_path, vit_t_checkpoint):
    state = torch.load(vit_t_checkpoint, weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"wrong shape \(e.g. mask_decoder.iou_token.weight\)"
    ):
        build_sam_vit_t(path)


def test_training_wrappers_are_unwrapped(tmp_path, vit_t_checkpoint):
    state = torch.load(vit_t_checkpoint, weights_only=True)
    wrapped = {"model": collections.OrderedDict(("module." + k, v) for k, v in state.items())}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    sam = build_sam_vit_t(path)
    for key, value in sam.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_model_detects_type(vit_t_checkpoint):
    sam, resolved = load_model(checkpoint=vit_t_checkpoint)
    assert detect_model_type(sam.state_dict()) == "vit_t"
    assert resolved.source == "argument" and resolved.path == vit_t_checkpoint
    assert not sam.training


def test_non_finite_weights_are_refused_at_load(tmp_path, vit_t_checkpoint):
    state = torch.load(vit_t_checkpoint, weights_only=True)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=f"NaN or infinite values in {key}"):
        build_sam_vit_t(tmp_path / "nan.pth")


def test_safetensors_checkpoints_load(tmp_path, vit_t_checkpoint):
    from safetensors.torch import save_file

    state = torch.load(vit_t_checkpoint, weights_only=True)
    save_file(state, tmp_path / "tinysam.safetensors")
    loaded = read_state_dict(tmp_path / "tinysam.safetensors")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    save_file(state, tmp_path / "named.bin")  # recognised by its header, whatever the name
    assert read_state_dict(tmp_path / "named.bin").keys() == state.keys()
    model = build_sam_vit_t(tmp_path / "tinysam.safetensors")
    assert detect_model_type(model.state_dict()) == "vit_t"
    (tmp_path / "cut.safetensors").write_bytes(
        (tmp_path / "tinysam.safetensors").read_bytes()[:5000]
    )
    with pytest.raises(CheckpointError, match="damaged safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_a_raw_pickle_is_refused_without_torch_warnings(tmp_path, recwarn):
    import pickle

    with open(tmp_path / "raw.pth", "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f, protocol=4)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_state_dict(tmp_path / "raw.pth")
    assert not [w for w in recwarn if "torch" in str(w.filename)], [str(w.message) for w in recwarn]
