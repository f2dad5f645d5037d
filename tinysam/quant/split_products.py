"""The published Q-TinySAM's layers as ONNX Runtime can run them (the int8 ONNX model of a
converted ``tinysam_w8a8.pth``).

ONNX Runtime's integer products take one scale per activation tensor and one per weight column.
The authors' linear layers have ``n_a`` input chunks, each with its own interval, and weight
intervals per block of ``n_V`` rows by ``n_H`` columns. Cut the input dimension into
``lcm(n_a, n_H)`` equal parts: within a part the input has one interval and each output row one
weight interval, so each part is an ordinary int8 product (per-tensor input, per-channel
weight), and the layer's output is the parts' sum plus the bias. A layout of ``n_a = n_H = 1``
is one product with per-channel weight scales. The post-GELU input's two groups become two
products of the same weights: the non-negative values clipped to ``[0, 127 a]`` on ``a``, the
negative ones clipped to ``[-128 a_neg, 0]`` on ``a_neg``. Every level is the reference's.

Convolutions and the decoder's transposed convolutions compute in float on the 8-bit grid
values (input ``q(x - a_bias) + a_bias``, weights on their per-channel grid): exact, but not
integer. An offset that is not a whole number of levels has no zero point; with zero padding
the explicit offset adds a border term per layer; and ONNX Runtime's integer convolution with a
float output (``ConvInteger``) measured 2-5x slower than its float convolution on an AVX2 EPYC
(its fast ``QLinearConv`` needs an 8-bit output, which the authors' layers do not have).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam
from .layers import QuantConv2d, QuantConvTranspose2d, QuantLayer, QuantLinear
from .quantizers import (
    BlockWeightQuantizer,
    ChunkActQuantizer,
    OffsetActQuantizer,
    fake_quant,
    fake_quant_channels,
)


class SplitProductLinear(nn.Module):
    """A published linear layer as a sum of per-channel int8 products (see the module doc)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        weight_quant: BlockWeightQuantizer = layer.weight_quant
        input_quant: ChunkActQuantizer = layer.input_quant
        out_features, in_features = layer.weight.shape
        n_v, n_h = weight_quant.blocks
        n_a = input_quant.interval.shape[0]
        parts = math.lcm(n_a, n_h)
        self.width = in_features // parts
        self.bits = input_quant.bits
        self.weight_bits = weight_quant.bits
        grid = weight_quant(layer.weight.detach())
        rows = weight_quant.interval.reshape(n_v, n_h).repeat_interleave(out_features // n_v, 0)
        self.input_intervals = [float(input_quant.interval[j * n_a // parts]) for j in range(parts)]
        negative = input_quant.negative_interval
        self.negative_interval = None if negative is None else float(negative)
        for j in range(parts):
            columns = slice(j * self.width, (j + 1) * self.width)
            self.register_buffer(f"weight{j}", grid[:, columns].clone())
            self.register_buffer(f"scale{j}", rows[:, j * n_h // parts].clone())
            if negative is not None:
                # The negative inputs' product gets its own copy: ONNX Runtime's u8 weight
                # rewrite (CPUs without VNNI) fails on an int8 weight shared by two products.
                self.register_buffer(f"negative_weight{j}", grid[:, columns].clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        qmax = 2 ** (self.bits - 1)
        for j, part in enumerate(x.split(self.width, dim=-1)):
            weight = self._weight(f"weight{j}", j)
            interval = self.input_intervals[j]
            if self.negative_interval is None:
                y = F.linear(fake_quant(part, interval, self.bits), weight)
            else:
                positive = fake_quant(part.clamp(0.0, (qmax - 1) * interval), interval, self.bits)
                low = -qmax * self.negative_interval
                negative = fake_quant(part.clamp(low, 0.0), self.negative_interval, self.bits)
                y = F.linear(positive, weight)
                y = y + F.linear(negative, self._weight(f"negative_weight{j}", j))
            out = y if out is None else out + y
        return out if self.bias is None else out + self.bias

    def _weight(self, name: str, part: int) -> torch.Tensor:
        scale = getattr(self, f"scale{part}")
        return fake_quant_channels(getattr(self, name), scale, 0, self.weight_bits)


class GridInputConv(nn.Module):
    """A published (transposed) convolution in float on the 8-bit grid values. Takes over
    ``layer`` (its weight becomes its grid values)."""

    def __init__(self, layer: QuantConv2d | QuantConvTranspose2d) -> None:
        super().__init__()
        with torch.no_grad():
            layer.weight.copy_(layer.weight_quant(layer.weight))
        self.layer = layer  # its settings (stride, padding, ...) and ``compute``
        input_quant = layer.input_quant
        self.offset = self.interval = None
        if isinstance(input_quant, OffsetActQuantizer):
            self.bits = input_quant.bits
            self.offset, self.interval = float(input_quant.offset), float(input_quant.interval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interval is not None:
            x = fake_quant(x - self.offset, self.interval, self.bits) + self.offset
        return self.layer.compute(x, self.layer.weight)


def for_export(sam: Sam) -> Sam:
    """A copy of a published model (``load_published``) whose quantized layers are the
    modules above; it computes what the int8 ONNX model computes."""
    model = copy.deepcopy(sam).cpu().eval()
    for path, module in list(model.named_modules()):
        if not isinstance(module, QuantLayer) or not isinstance(
            module.weight_quant, BlockWeightQuantizer
        ):
            continue
        replacement = (
            SplitProductLinear(module) if isinstance(module, QuantLinear) else GridInputConv(module)
        )
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, replacement)
    return model


def check_exportable(sam: Sam) -> None:
    """ONNX Runtime's integer products are 8-bit: every published layer must be W8A8 (a
    convolution may keep a float input, as the authors' 32-bit layers do)."""
    for path, module in sam.named_modules():
        if not isinstance(module, QuantLayer) or not isinstance(
            module.weight_quant, BlockWeightQuantizer
        ):
            continue
        act_bits = getattr(module.input_quant, "bits", 32)
        if module.weight_quant.bits != 8 or act_bits not in (8, 32):
            raise ValueError(
                f"{path} is W{module.weight_quant.bits}A{act_bits}: the int8 ONNX model needs "
                "8-bit layers; use the simulated model (torch backend) for other widths"
            )


def export_published_onnx(
    sam: Sam, out_dir: str | Path, model_type: str, activations: str = "uint8", step=None
) -> dict:
    """Write the int8 encoder and decoders of a published model, with the manifest that
    ``OnnxPredictor`` reads (see the module doc for what stays float)."""
    from .onnx_int8 import export_int8

    check_exportable(sam)
    layers = getattr(sam, "published_quantization", {}).get("layers", 0)
    return export_int8(
        for_export(sam),
        out_dir,
        model_type,
        activations,
        step=step,
        quantization={
            "source": "Q-TinySAM (the authors' layers)",
            "layers": layers,
            "weights": "int8, a scale per output row and column block (split products)",
            "convolutions": "float on the 8-bit grid values",
        },
    )
