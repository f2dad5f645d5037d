"""Uniform symmetric quantizers (docs/method.md §2):
``x_q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1)``.

Activations get one scale per tensor; weights one per output channel (the distance the scales
are searched with splits over output channels, so each channel's search is independent and
exact). Two inputs get two groups (the paper's twin quantizers):

- ``"softmax"``: attention probabilities, bunched near 0 and near 1. Values up to the low
  group's top ``s * (2^(b-1) - 1)`` use the searched scale ``s``; larger ones the fixed scale
  ``1 / (2^(b-1) - 1)`` that spans [0, 1].
- ``"gelu"``: GELU outputs, in [-0.17, large). Non-negative values use the searched scale,
  negative ones the fixed scale ``0.16997 / 2^(b-1)`` that spans GELU's minimum.

ONNX Runtime has no two-group int8 kernels, so ``deploy`` mode (what the int8 ONNX model
computes) falls back: a post-GELU input uses its searched scale for both signs, and a
post-softmax product runs in float (``QuantMatMul``), because no single 8-bit scale holds both
the ~1/4096 probabilities of the decoder's token-to-image attention and those near 1 (measured:
mask IoU with the float model 0.78 with one 1/127 scale, 0.98 with the twin quantizer).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
from torch import nn

GELU_MIN = 0.16997124254703522  # -min(GELU(x)), the negative group's range
TWIN_KINDS = ("none", "softmax", "gelu")


def qrange(bits: int) -> tuple[int, int]:
    """The integer range of a signed ``bits``-bit symmetric quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant(x: torch.Tensor, scale: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize with one scale (ONNX QuantizeLinear + DequantizeLinear).

    A Python float scale is what torch's exporter handles with dynamic shapes."""
    lo, hi = qrange(bits)
    if isinstance(scale, float) and torch.compiler.is_compiling():
        q = _decomposed().quantize_per_tensor(x, scale, 0, lo, hi, torch.int8)
        return _decomposed().dequantize_per_tensor(q, scale, 0, lo, hi, torch.int8)
    if isinstance(scale, float):
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, lo, hi)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_tensor_affine(x, scale.to(x.dtype), zero, lo, hi)


def fake_quant_channels(w: torch.Tensor, scale: torch.Tensor, axis: int, bits: int) -> torch.Tensor:
    """Per-channel fake quantization along ``axis`` (scales must be positive)."""
    lo, hi = qrange(bits)
    if torch.compiler.is_compiling():
        zero = torch.zeros(scale.shape, dtype=torch.int64, device=w.device)
        q = _decomposed().quantize_per_channel(w, scale, zero, axis, lo, hi, torch.int8)
        return _decomposed().dequantize_per_channel(q, scale, zero, axis, lo, hi, torch.int8)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.to(w.dtype), zero, axis, lo, hi)


def _decomposed():
    """torch's quantize/dequantize ops that its ONNX exporter turns into QuantizeLinear and
    DequantizeLinear (registered by the import at the top: before an export starts)."""
    return torch.ops.quantized_decomposed


def quant_grid(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clip(round(x / s), lo, hi) * s`` with ``scale`` broadcasting against ``x`` (the search
    evaluates many candidate scales at once this way)."""
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def twin_quant(x: torch.Tensor, scale: float | torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """Two-group quantization of post-softmax or post-GELU values (see the module doc)."""
    qmax = 2 ** (bits - 1)
    if kind == "softmax":
        high = 1.0 / (qmax - 1)
        low_top = scale * (qmax - 1)
        return torch.where(
            x <= low_top, quant_grid(x, scale, 0, qmax - 1), quant_grid(x, high, 0, qmax - 1)
        )
    if kind == "gelu":
        negative = GELU_MIN / qmax
        return torch.where(
            x >= 0, quant_grid(x, scale, 0, qmax - 1), quant_grid(x, negative, -qmax, 0)
        )
    raise ValueError(f"unknown twin kind {kind!r}; expected one of {TWIN_KINDS}")


class ActQuantizer(nn.Module):
    """Per-tensor quantizer of an activation (a layer input or output).

    Inactive until calibrated; ``enabled`` is the per-layer switch, ``deploy`` the one-scale
    fallback of twin quantizers (what ONNX Runtime runs).
    """

    def __init__(self, bits: int = 8, twin: str = "none") -> None:
        super().__init__()
        if twin not in TWIN_KINDS:
            raise ValueError(f"unknown twin kind {twin!r}; expected one of {TWIN_KINDS}")
        self.bits = bits
        self.twin = twin
        self.register_buffer("scale", torch.tensor(0.0))
        self.value = 0.0
        self.calibrated = False
        self.enabled = True
        self.deploy = False

    def set_scale(self, scale: float | torch.Tensor) -> None:
        value = float(scale)
        if not value > 0:
            raise ValueError(f"a quantizer scale must be positive, got {value}")
        self.scale.fill_(value)
        self.value = value  # the same scale as a Python float, for the exporter
        self.calibrated = True

    @property
    def active(self) -> bool:
        return self.enabled and self.calibrated

    @property
    def float_in_deploy(self) -> bool:
        return self.twin == "softmax" and self.deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or self.float_in_deploy:
            return x
        if self.twin == "none" or self.deploy:
            return fake_quant(x, self.value, self.bits)
        return twin_quant(x, self.value, self.twin, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, twin={self.twin}, scale={float(self.scale):.4g}"


class WeightQuantizer(nn.Module):
    """Per-output-channel quantizer of a weight tensor (channel axis 0, or 1 for transposed
    convolutions)."""

    def __init__(self, channels: int, axis: int = 0, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.axis = axis
        self.register_buffer("scale", torch.zeros(channels))
        self.calibrated = False
        self.enabled = True

    def set_scale(self, scale: torch.Tensor) -> None:
        scale = torch.as_tensor(scale, dtype=self.scale.dtype).reshape(self.scale.shape)
        if not bool((scale > 0).all()):
            raise ValueError("weight scales must be positive")
        self.scale.copy_(scale)
        self.calibrated = True

    @property
    def active(self) -> bool:
        return self.enabled and self.calibrated

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        return fake_quant_channels(w, self.scale, self.axis, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}, axis={self.axis}"


class BlockWeightQuantizer(nn.Module):
    """A weight quantized with one interval per block (the authors' Q-TinySAM layers): a
    linear weight viewed as ``[n_V, out/n_V, n_H, in/n_H]`` against intervals
    ``[n_V, 1, n_H, 1]``, or, with ``blocks`` None, intervals that broadcast against the weight
    as it is stored (one per output channel of a convolution)."""

    def __init__(self, interval: torch.Tensor, bits: int, blocks: tuple[int, int] | None) -> None:
        super().__init__()
        self.bits = bits
        self.blocks = blocks
        self.register_buffer("interval", interval.detach().clone().float())
        self.enabled = True

    def _blocked(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` viewed so that ``self.interval`` broadcasts against it."""
        if self.blocks is None:
            return w
        n_v, n_h = self.blocks
        return w.reshape(n_v, w.shape[0] // n_v, n_h, w.shape[1] // n_h)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        lo, hi = qrange(self.bits)
        return quant_grid(self._blocked(w), self.interval, lo, hi).reshape(w.shape)

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        """The integer levels ``forward`` puts ``w`` on (int8)."""
        lo, hi = qrange(self.bits)
        grid = torch.clamp(torch.round(self._blocked(w) / self.interval), lo, hi)
        return grid.reshape(w.shape).to(torch.int8)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        """Levels back to the weight ``forward`` gives (``forward`` of the result rounds to
        the same levels: ``k * s / s`` rounds to ``k`` for ``|k| <= 128``)."""
        return (self._blocked(levels.float()) * self.interval).reshape(levels.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, blocks={self.blocks}, intervals={self.interval.numel()}"


class ChunkActQuantizer(nn.Module):
    """An input quantized with one interval per equal chunk of its last dimension (intervals
    ``[n_a, 1]``). After a GELU (``negative_interval`` given), values below zero use that fixed
    interval on ``[-2^(b-1), 0]`` and the rest the chunk's interval on ``[0, 2^(b-1) - 1]``."""

    def __init__(
        self, interval: torch.Tensor, bits: int, negative_interval: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("interval", interval.detach().clone().float().reshape(-1, 1))
        if negative_interval is not None:
            negative_interval = negative_interval.detach().clone().float()
        self.register_buffer("negative_interval", negative_interval)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        lo, hi = qrange(self.bits)
        chunks = x.reshape(*x.shape[:-1], self.interval.shape[0], -1)
        if self.negative_interval is None:
            return quant_grid(chunks, self.interval, lo, hi).reshape(x.shape)
        positive = quant_grid(chunks, self.interval, 0, hi)
        negative = quant_grid(chunks, self.negative_interval, lo, 0)
        return (positive + negative).reshape(x.shape)

    def extra_repr(self) -> str:
        twin = ", post-GELU" if self.negative_interval is not None else ""
        return f"bits={self.bits}, chunks={self.interval.shape[0]}{twin}"


class OffsetActQuantizer(nn.Module):
    """An asymmetric input quantizer: ``q(x - offset) + offset`` with one interval (the
    authors' convolutions)."""

    def __init__(self, interval: torch.Tensor, offset: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("interval", interval.detach().clone().float().reshape(()))
        self.register_buffer("offset", offset.detach().clone().float().reshape(()))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        lo, hi = qrange(self.bits)
        levels = torch.clamp(torch.round((x - self.offset) / self.interval), lo, hi)
        return levels * self.interval + self.offset

    def extra_repr(self) -> str:
        interval, offset = float(self.interval), float(self.offset)
        return f"bits={self.bits}, interval={interval:.4g}, offset={offset:.4g}"
