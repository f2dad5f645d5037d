"""Turn a float ``Sam`` into its fake-quantized twin, and the switches that steer it.

``prepare`` works on a copy: BatchNorms are folded into their convolutions (what an int8
deployment multiplies with), every Linear/Conv2d/ConvTranspose2d of the image encoder and the
mask decoder becomes a quantized layer, and the attention products of TinyViT and of the two-way
transformer, and the decoder's hypernetwork product, become ``QuantMatMul``s. The prompt
encoder stays float (the paper quantizes the image encoder and the mask decoder). The SAM ViT
encoders (vit_b/l/h) get their linear and convolution layers quantized; their attention
products stay float.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..modeling import Sam, tiny_vit, transformer
from ..modeling.mask_decoder import MaskDecoder
from .layers import (
    FLOAT_TO_QUANT,
    QuantGELU,
    QuantLayer,
    QuantMatMul,
    to_quant_layer,
)

# Layer kinds whose output is quantized in deploy mode: ONNX Runtime's int8 convolution
# (QLinearConv) needs an int8 output; its matrix products can return floats.
DEPLOY_OUTPUT_KINDS = ("conv",)


class QuantTinyViTAttention(tiny_vit.Attention):
    """TinyViT attention with its two products quantized (the probabilities with the
    post-softmax twin quantizer)."""

    def _init_quant(self, bits: int) -> None:
        self.scores = QuantMatMul(bits)
        self.weighted = QuantMatMul(bits, a_twin="softmax")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.permute(0, 2, 1, 3).split([self.key_dim, self.key_dim, self.d], dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        attn = self.scores(q, k.transpose(-2, -1)) * self.key_dim**-0.5 + bias
        x = self.weighted(attn.softmax(dim=-1), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.dh))


class QuantDecoderAttention(transformer.Attention):
    """The two-way transformer's attention with explicit, quantized products."""

    def _init_quant(self, bits: int) -> None:
        self.scores = QuantMatMul(bits)
        self.weighted = QuantMatMul(bits, a_twin="softmax")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        batch, n = max(q.shape[0], k.shape[0]), q.shape[1]
        q, k, v = (t.expand(batch, -1, -1) for t in (q, k, v))
        q, k, v = self._separate_heads(q), self._separate_heads(k), self._separate_heads(v)
        attn = self.scores(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = self.weighted(attn.softmax(dim=-1), v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, self.internal_dim))


class QuantMaskDecoder(MaskDecoder):
    """The mask decoder on its plain path (upscaling as modules, the hypernetwork dot as a
    quantized product); the batched many-prompt shortcut reads raw weights, so it is off."""

    supports_many_prompts = False

    def _init_quant(self, bits: int) -> None:
        # upscaled (B x HW x C/8, post-GELU) @ hypernetwork outputs (B x C/8 x M)
        self.hyper_product = QuantMatMul(bits, a_twin="gelu")

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        return_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        hs, image_tokens, (c, h, w) = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        batch = hs.shape[0]
        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, c, h, w))
        hyper_in = torch.stack(
            [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c8, hh, ww = upscaled.shape
        pixels = upscaled.reshape(b, c8, hh * ww).transpose(1, 2)
        masks = self.hyper_product(pixels, hyper_in.transpose(1, 2)).transpose(1, 2)
        masks = masks.reshape(b, -1, hh, ww)
        iou = self.iou_prediction_head(hs[:, 0, :])
        return (masks, iou, hs) if return_tokens else (masks, iou)


def fold_conv_bn(module: nn.Module) -> None:
    """Replace every ``ConvBN`` under ``module`` by one Conv2d with the BatchNorm folded in."""
    for name, child in list(module.named_children()):
        if isinstance(child, tiny_vit.ConvBN):
            conv, bn = child.c, child.bn
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                groups=conv.groups,
                bias=True,
            )
            with torch.no_grad():
                folded.weight.copy_(conv.weight * scale[:, None, None, None])
                folded.bias.copy_(bn.bias - bn.running_mean * scale)
            setattr(module, name, folded.to(conv.weight.device))
        else:
            fold_conv_bn(child)


def _swap_class(module: nn.Module, cls: type, bits: int) -> None:
    module.__class__ = cls
    module._init_quant(bits)


def prepare(sam: Sam, weight_bits: int = 8, act_bits: int = 8) -> Sam:
    """A fake-quantized copy of ``sam`` (eval mode); quantizers stay inactive until scales are
    set (``tinysam.quant.calibrate``/``load_quantized``)."""
    for bits in (weight_bits, act_bits):
        if not 2 <= bits <= 8:
            raise ValueError(f"bit widths must be between 2 and 8, got {bits}")
    model = copy.deepcopy(sam).eval()
    for part in (model.image_encoder, model.mask_decoder):
        fold_conv_bn(part)
        for module in list(part.modules()):
            if type(module) is tiny_vit.Attention:
                _swap_class(module, QuantTinyViTAttention, act_bits)
            elif type(module) is transformer.Attention:
                _swap_class(module, QuantDecoderAttention, act_bits)
            elif type(module) is MaskDecoder:
                _swap_class(module, QuantMaskDecoder, act_bits)
            elif isinstance(module, nn.GELU):
                module.__class__ = QuantGELU
            elif type(module) in FLOAT_TO_QUANT:
                to_quant_layer(module, weight_bits, act_bits)
    model.quant_bits = {"weight": weight_bits, "activation": act_bits}
    return model


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized layer and product, by module name, in forward order of definition."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, (QuantLayer, QuantMatMul))
    }


def quantizers(layer: nn.Module) -> dict[str, nn.Module]:
    """A layer's quantizers by role: input/weight/output, or a/b for products."""
    if isinstance(layer, QuantMatMul):
        return {"a": layer.a_quant, "b": layer.b_quant}
    return {"input": layer.input_quant, "weight": layer.weight_quant, "output": layer.output_quant}


def set_quantization(
    model: nn.Module,
    enabled: bool = True,
    layers: list[str] | None = None,
    roles: tuple[str, ...] = ("input", "weight", "a", "b"),
) -> None:
    """Switch quantizers on or off: all layers, or those named in ``layers`` (exact module
    names or prefixes such as ``image_encoder`` / ``mask_decoder.transformer.layers.0``), for
    the given roles (``input``/``weight`` of weight layers, ``a``/``b`` of products)."""
    chosen = quant_layers(model)
    if layers is not None:
        unknown = [p for p in layers if not any(n == p or n.startswith(p + ".") for n in chosen)]
        if unknown:
            raise ValueError(f"no quantized layer matches {unknown}")
        chosen = {
            n: m for n, m in chosen.items() if any(n == p or n.startswith(p + ".") for p in layers)
        }
    for layer in chosen.values():
        for role, quantizer in quantizers(layer).items():
            if role in roles:
                quantizer.enabled = enabled


def set_deploy(model: nn.Module, deploy: bool = True) -> None:
    """Make the fake-quantized model compute what the int8 ONNX model computes: twin
    quantizers fall back to one scale, and convolutions quantize their outputs."""
    for layer in quant_layers(model).values():
        for role, quantizer in quantizers(layer).items():
            if role != "weight":
                quantizer.deploy = deploy
        if isinstance(layer, QuantLayer):
            layer.quantize_output = (
                deploy and layer.kind in DEPLOY_OUTPUT_KINDS and layer.output_quant.calibrated
            )
