"""State-dict keys, shapes and dtypes equal the reference checkpoints', for every registry name."""

from __future__ import annotations

import pytest
import torch

from tinysam import sam_model_registry
from tinysam.build import build_sam_model
from tinysam.modeling.tiny_vit import Attention


def _reference_keys(path):
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            rows[name] = (shape, dtype)
    return rows


@pytest.mark.parametrize("model_type", ["vit_t", "vit_b", "vit_l", "vit_h"])
def test_state_dict_matches_reference(golden, model_type):
    expected = _reference_keys(golden / f"state_dict_keys_{model_type}.txt")
    with torch.device("meta"):
        sam = build_sam_model(model_type)
    ours = {
        name: (str(list(t.shape)), str(t.dtype).removeprefix("torch."))
        for name, t in sam.state_dict().items()
    }
    assert list(ours) == list(expected)  # same keys, same order
    assert ours == expected


def test_registry_names():
    assert set(sam_model_registry) == {"default", "vit_t", "vit_b", "vit_l", "vit_h"}
    assert sam_model_registry["default"] is sam_model_registry["vit_h"]


def test_attention_bias_is_never_stale(vit_t_checkpoint):
    """A checkpoint loaded after .eval() takes effect, and later edits do too (no cached table)."""
    sam = sam_model_registry["vit_t"]()  # built and put in eval mode before any weights exist
    sam.eval()
    state = torch.load(vit_t_checkpoint, weights_only=True)
    sam.load_state_dict(state)
    attn = sam.image_encoder.layers[1].blocks[0].attn
    assert isinstance(attn, Attention)
    key = "image_encoder.layers.1.blocks.0.attn.attention_biases"
    x = torch.randn(2, attn.attention_bias_idxs.shape[0], attn.norm.normalized_shape[0])
    with torch.no_grad():
        loaded = attn(x)
        attn.attention_biases.zero_()
        zeroed = attn(x)
        attn.attention_biases.copy_(state[key])
        restored = attn(x)
    assert not torch.allclose(loaded, zeroed)
    assert torch.equal(loaded, restored)
