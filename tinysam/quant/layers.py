"""Fake-quantized layers: every matrix multiplication ``O = A . B`` of the model with a quantizer
on each side (docs/method.md §2).

Linear, convolution and transposed convolution layers quantize their input (per tensor) and
their weight (per output channel); ``QuantMatMul`` quantizes both activations (the attention
products). Layers keep their class's parameters and names, so a prepared model loads the float
checkpoint's tensors unchanged.

For the scale search every layer also describes itself as a grouped matrix product on a sample
of output positions: ``input_rows`` (R x G x K), ``matrix`` (G x O_g x K, the weight as rows of
output columns), ``output_rows`` (R x O) and ``column_channel`` (the weight channel of each
output column). Convolutions become products on gathered patches, so one search covers all
kinds.

``recorder``: while set, ``forward`` hands the call to it (calibration records inputs, outputs
and gradients of the float model through it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, WeightQuantizer


class QuantLayer:
    """What the weight layers share: their quantizers, switches and sampled views."""

    kind = "layer"
    recorder: Callable | None
    input_quant: ActQuantizer
    weight_quant: WeightQuantizer
    output_quant: ActQuantizer

    def _init_quant(self, channels: int, axis: int, weight_bits: int, act_bits: int) -> None:
        self.input_quant = ActQuantizer(act_bits)
        self.weight_quant = WeightQuantizer(channels, axis, weight_bits)
        # Only in deploy mode, where ONNX Runtime's int8 convolution needs a quantized output.
        self.output_quant = ActQuantizer(act_bits)
        self.quantize_output = False
        self.recorder = None

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recorder is not None:
            return self.recorder(self, x)
        out = self.compute(self.input_quant(x), self.weight_quant(self.weight))
        return self.output_quant(out) if self.quantize_output else out

    def column_channel(self) -> torch.Tensor:
        return torch.arange(self.weight_quant.scale.numel())


class QuantLinear(QuantLayer, nn.Linear):
    kind = "linear"

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def num_positions(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def input_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[idx][:, None]

    def output_rows(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return out.reshape(-1, out.shape[-1])[idx]

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[None]


class QuantConv2d(QuantLayer, nn.Conv2d):
    kind = "conv"

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _out_hw(self, x: torch.Tensor) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1

    def num_positions(self, x: torch.Tensor) -> int:
        h, w = self._out_hw(x)
        return x.shape[0] * h * w

    def input_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The receptive fields of the sampled output positions: R x groups x (C_g*kh*kw)."""
        if self.dilation != (1, 1) or self.padding_mode != "zeros":
            raise NotImplementedError("dilated or non-zero-padded convolutions")
        h, w = self._out_hw(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        b, yo, xo = idx // (h * w), (idx // w) % h, idx % w
        padded = F.pad(x, (pw, pw, ph, ph))
        taps = [
            padded[b, :, yo * sh + dy, xo * sw + dx] for dy in range(kh) for dx in range(kw)
        ]  # each R x C
        patches = torch.stack(taps, dim=-1)  # R x C x (kh*kw), weight order (c, dy, dx)
        return patches.reshape(len(idx), self.groups, -1)

    def output_rows(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])[idx]

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.groups, self.out_channels // self.groups, -1)


class QuantConvTranspose2d(QuantLayer, nn.ConvTranspose2d):
    """Transposed convolutions whose stride equals the kernel (SAM's 2x upscaling): each input
    pixel makes its own output patch, a matrix product with kh*kw*C_out columns."""

    kind = "conv_transpose"

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups
        )

    def check_supported(self) -> None:
        if (
            tuple(self.stride) != tuple(self.kernel_size)
            or self.padding != (0, 0)
            or self.output_padding != (0, 0)
            or self.groups != 1
        ):
            raise NotImplementedError("only transposed convolutions with stride == kernel size")

    def num_positions(self, x: torch.Tensor) -> int:
        return x.shape[0] * x.shape[2] * x.shape[3]

    def input_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[idx][:, None]

    def output_rows(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        b, c, h, w = out.shape
        patches = out.view(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(-1, c * kh * kw)[idx]

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        c_in = weight.shape[0]
        return weight.permute(1, 2, 3, 0).reshape(1, -1, c_in)  # columns (c_out, dy, dx)

    def column_channel(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        return torch.arange(self.out_channels).repeat_interleave(kh * kw)


class QuantMatMul(nn.Module):
    """``A @ B`` of two activations (attention scores, attention-weighted values, the
    hypernetwork's mask product), each side quantized per tensor."""

    kind = "matmul"

    def __init__(self, bits: int = 8, a_twin: str = "none") -> None:
        super().__init__()
        self.a_quant = ActQuantizer(bits, a_twin)
        self.b_quant = ActQuantizer(bits)
        self.recorder: Callable | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.recorder is not None:
            return self.recorder(self, a, b)
        if self.a_quant.float_in_deploy:  # see tinysam.quant.quantizers: no int8 form
            return a @ b
        return self.a_quant(a) @ self.b_quant(b)


class QuantGELU(nn.GELU):
    """GELU that marks its output, so calibration can give the layers it feeds the two-group
    post-GELU quantizer (the mark survives views that return the same tensor, e.g. Dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.gelu(x, approximate=self.approximate)
        if not torch.compiler.is_compiling():
            out._tinysam_post_gelu = True
        return out


def is_post_gelu(x: torch.Tensor) -> bool:
    return bool(getattr(x, "_tinysam_post_gelu", False))


FLOAT_TO_QUANT = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
}


def to_quant_layer(module: nn.Module, weight_bits: int, act_bits: int) -> nn.Module:
    """Turn a float Linear/Conv2d/ConvTranspose2d into its quantized class, in place (its
    parameters stay the same tensors)."""
    cls = FLOAT_TO_QUANT[type(module)]
    module.__class__ = cls
    if isinstance(module, QuantConvTranspose2d):
        module.check_supported()
        module._init_quant(module.out_channels, 1, weight_bits, act_bits)
    else:
        module._init_quant(module.weight.shape[0], 0, weight_bits, act_bits)
    return module
