"""Q-TinySAM as the TinySAM authors publish it (``tinysam_w8a8.pth``): their ``InferQuant*``
layers rebuilt as this package's quantized layers, computing what their ``quant_forward``
computes (divide, round half to even, clamp, multiply, in float32).

- linear layers: block-wise weight intervals ``[n_V, 1, n_H, 1]``, the input's last dimension
  in ``n_a`` chunks with an interval each (``BlockWeightQuantizer``, ``ChunkActQuantizer``);
- the linear layer after a GELU: the same, with negative inputs on GELU's fixed interval;
- convolutions and the decoder's transposed convolutions: an interval per output channel and an
  asymmetric input ``q(x - a_bias) + a_bias`` (``OffsetActQuantizer``). BatchNorm stays a
  separate float step after the quantized convolution, as in their model.

The file is read by ``tinysam.pickled_modules`` (nothing in it runs); the float tensors load
into our model strictly, then each listed layer becomes quantized in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..build import sam_from_state_dict
from ..modeling import Sam, transformer
from ..modeling.common import LayerNorm2d
from ..pickled_modules import QuantizedLayerRecord
from .layers import to_quant_layer
from .model import QuantDecoderAttention, QuantMaskDecoder
from .quantizers import BlockWeightQuantizer, ChunkActQuantizer, OffsetActQuantizer

FLOAT_CLASS = {
    "linear": nn.Linear,
    "linear_post_gelu": nn.Linear,
    "conv": nn.Conv2d,
    "conv_transpose": nn.ConvTranspose2d,
}
FORMAT_NAME = "Q-TinySAM (the authors' pickled W8A8 model)"


class ReferenceLayerNorm2d(LayerNorm2d):
    """segment-anything's LayerNorm2d order: a division by the square root. Ours multiplies by
    its reciprocal, which ONNX Runtime's graphs and our exports keep; an 8-bit layer after it
    would round that float neighbour to another level in places."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        centered = x - mean
        x = centered / torch.sqrt(centered.pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def load_published(
    state_dict: dict, layers: dict[str, QuantizedLayerRecord], model_type: str, source: str,
    device="cpu",
) -> Sam:  # fmt: skip
    """Our model holding the pickled model's float tensors (``state_dict``), with its quantized
    ``layers`` (by module path) rebuilt."""
    sam = sam_from_state_dict(state_dict, model_type, source)
    for path, record in layers.items():
        try:
            module = sam.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{source}: a quantized layer {path} that {model_type} lacks"
            ) from None
        expected = FLOAT_CLASS[record.kind]
        if type(module) is not expected:
            raise ValueError(
                f"{source}: {path} is a quantized {record.kind} layer, but {model_type} has a "
                f"{type(module).__name__} there"
            )
        quantize_layer(module, record)
    reference_order(sam)
    sam.published_quantization = {"format": FORMAT_NAME, "layers": len(layers)}
    return sam.to(device).eval()


def reference_order(sam: Sam) -> Sam:
    """Run ``sam`` in the reference's order of float operations, so that 8-bit inputs round as
    the authors' model rounds them: NCHW convolutions (not channels-last), explicit attention
    products (not the fused kernel), LayerNorm2d's division and the mask decoder's layers as
    modules (its fast paths read raw weights). Measured on the fixture: the image embedding
    then equals the authors' code's bit for bit on the same CPU and thread count
    (``MKL_CBWR`` strict in both)."""
    if hasattr(sam.image_encoder, "channels_last"):
        sam.image_encoder.channels_last = False
    for module in sam.modules():
        if type(module) is LayerNorm2d:
            module.__class__ = ReferenceLayerNorm2d
    decoder = sam.mask_decoder
    if type(decoder) is not QuantMaskDecoder:
        decoder.__class__ = QuantMaskDecoder
        decoder._init_quant(8)  # its hypernetwork product stays float (never calibrated)
    for module in list(decoder.modules()):
        if type(module) is transformer.Attention:
            module.__class__ = QuantDecoderAttention
            module._init_quant(8)  # float products, in the reference's order
    return sam


def quantize_layer(module: nn.Module, record: QuantizedLayerRecord) -> nn.Module:
    """Make one float layer the quantized layer ``record`` describes, in place."""
    to_quant_layer(module, record.weight_bits, min(record.act_bits, 8))
    if record.kind.startswith("linear"):
        module.weight_quant = BlockWeightQuantizer(
            record.w_interval, record.weight_bits, (record.n_V, record.n_H)
        )
        module.input_quant = ChunkActQuantizer(
            record.a_interval, record.act_bits, record.a_neg_interval
        )
    else:
        module.weight_quant = BlockWeightQuantizer(record.w_interval, record.weight_bits, None)
        module.input_quant = (
            nn.Identity()  # the authors' layers skip 32-bit inputs
            if record.act_bits > 8
            else OffsetActQuantizer(record.a_interval, record.a_bias, record.act_bits)
        )
    return module


__all__ = ["FORMAT_NAME", "load_published", "quantize_layer"]
