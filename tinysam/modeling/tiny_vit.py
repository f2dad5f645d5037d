"""TinyViT image encoder (TinyViT-5M in TinySAM and MobileSAM).

A convolutional stem and an MBConv stage at 1/4 resolution, then three stages of windowed
self-attention with a learned relative-position bias, ending in SAM's neck so the output is the
256x64x64 embedding the mask decoder expects. Attribute names follow the published checkpoints.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import GELU, StagedEncoder, sam_neck


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (children ``c`` and ``bn``).

    In eval mode the BatchNorm is folded into the convolution's weights on every call: one pass
    over the activations instead of two, and never stale after a checkpoint is loaded.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False),
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.c, self.bn
        # Folding needs a plain convolution; a replaced one (a quantized layer) runs as itself.
        if self.training or not bn.track_running_stats or type(conv) is not nn.Conv2d:
            return bn(conv(x))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for random samples while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: 1024x1024 pixels to 256x256 features."""

    def __init__(self, in_chans: int, embed_dim: int, resolution: int, activation: type[nn.Module]):
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            activation(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1, depthwise 3x3, project 1x1."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        expand_ratio: float,
        activation: type[nn.Module],
        drop_path: float,
    ) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = ConvBN(in_chans, hidden)
        self.act1 = activation()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = activation()
        self.conv3 = ConvBN(hidden, out_chans, bn_weight_init=0.0)
        self.act3 = activation()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """Downsampling between stages; accepts NCHW maps or (B, H*W, C) tokens, returns tokens."""

    def __init__(
        self,
        input_resolution: tuple[int, int],
        dim: int,
        out_dim: int,
        activation: type[nn.Module],
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = activation()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on the NCHW map, then a downsample."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        activation: type[nn.Module],
        drop_path: Sequence[float],
        downsample: nn.Module | None,
        conv_expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(
            MBConv(dim, dim, conv_expand_ratio, activation, drop_path[i]) for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm feed-forward of a TinyViT block (the norm lives inside, as in the checkpoints)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


def relative_offset_index(resolution: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Index of the |dy|, |dx| offset between every pair of positions in a window, and the
    number of distinct offsets.

    Offsets are numbered in order of first appearance, which fixes the column order of the
    ``attention_biases`` table stored in checkpoints.
    """
    points = list(itertools.product(range(resolution[0]), range(resolution[1])))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), len(offsets)


class Attention(nn.Module):
    """Multi-head self-attention with a learned bias per head and relative offset.

    The bias table is gathered from ``attention_biases`` on every call rather than cached, so a
    loaded checkpoint always takes effect (the reference caches it on ``.eval()`` and can go stale).
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int = 8,
        attn_ratio: float = 4,
        resolution: tuple[int, int] = (14, 14),
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        idxs, num_offsets = relative_offset_index(resolution)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.permute(0, 2, 1, 3).split([self.key_dim, self.key_dim, self.d], dim=3)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        if torch.compiler.is_compiling():
            # One attention op for exporters (ONNX Runtime: 4% faster encoder); torch's eager
            # SDPA with a float mask is slower than these three ops at 49-196 tokens.
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q @ k.transpose(-2, -1)).mul_(self.key_dim**-0.5).add_(bias)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.dh))


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise 3x3 'local' convolution, then the MLP."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(
            dim, dim // num_heads, num_heads, attn_ratio=1, resolution=(window_size, window_size)
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.drop_path = _drop_path(drop_path)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        ws = self.window_size
        b, _, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        # Zero padding goes in before the attention's LayerNorm and the padded tokens take part
        # as keys, exactly as in the trained model.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = x.view(b, h, w, c)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, h * w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"expected {h * w} tokens, got {n}")
        x = x + self.drop_path(self._windowed_attention(x))
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.view(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """One attention stage: TinyViT blocks, then an optional downsample."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: Sequence[float],
        local_conv_size: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                mlp_ratio,
                drop,
                drop_path[i],
                local_conv_size,
            )
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(StagedEncoder):
    """TinyViT backbone with SAM's neck; ``forward`` maps Bx3xSxS to Bx256x(S/16)x(S/16).

    The classification head (``norm_head``, ``head``) is unused but kept so that published
    checkpoints load strictly.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 1.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.depths = list(depths)
        self.layer_lr_decay = layer_lr_decay  # kept for the reference signature; unused here
        activation = GELU
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], img_size, activation)
        base = self.patch_embed.patches_resolution[0]
        num_layers = len(depths)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay

        self.layers = nn.ModuleList()
        resolution = base
        for i in range(num_layers):
            stage_rates = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            res = (resolution, resolution)
            downsample = None
            # The last downsample keeps the 1/16 resolution SAM's decoder works at.
            stride = 1 if i >= num_layers - 2 else 2
            if i < num_layers - 1:
                downsample = PatchMerging(res, embed_dims[i], embed_dims[i + 1], activation, stride)
            if i == 0:
                layer: nn.Module = ConvLayer(
                    embed_dims[0],
                    res,
                    depths[0],
                    activation,
                    stage_rates,
                    downsample,
                    mbconv_expand_ratio,
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    res,
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    drop_rate,
                    stage_rates,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(layer)
            resolution //= stride
        self.embedding_size = resolution
        # Channels-last convolutions (see _embed); off for models whose quantizers must round
        # exactly what the reference's NCHW convolutions compute (the published Q-TinySAM).
        self.channels_last = True

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.neck = sam_neck(embed_dims[-1], out_chans)

    def stages(self) -> list:
        return [self._embed, *self.layers, self._neck]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last makes the convolutions ~2x faster on CPU and turns the NCHW <-> token
        # reshapes between stages into views.
        if not self.channels_last:
            return self.patch_embed(x)
        return self.patch_embed(x.contiguous(memory_format=torch.channels_last))

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        s = self.embedding_size
        return self.neck(x.view(b, s, s, c).permute(0, 3, 1, 2)).contiguous()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
