"""The baseline for the benchmarks: the reference implementation's way of computing, on our weights.

The authors' code cannot run here (it needs timm and torchvision), so this module replays its
forward passes step for step with the same parameters: NCHW tensors, BatchNorm applied after
each convolution, out-of-place activations, the attention bias gathered once and cached,
``ConvTranspose2d`` upscaling, the image embedding repeated per prompt. The golden tests pin our
fast path to the same numbers; this gives a baseline measured in the same run as ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinysam.modeling import Sam


def _conv_bn(m, x):
    return m.bn(m.c(x))


def _merge(m, x):
    if x.ndim == 3:
        h, w = m.input_resolution
        x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
    x = F.gelu(_conv_bn(m.conv1, x))
    x = F.gelu(_conv_bn(m.conv2, x))
    return _conv_bn(m.conv3, x).flatten(2).transpose(1, 2)


def _attention(m, x, bias):
    b, n, _ = x.shape
    x = m.norm(x)
    q, k, v = m.qkv(x).view(b, n, m.num_heads, -1).split([m.key_dim, m.key_dim, m.d], dim=3)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1)) * m.key_dim**-0.5 + bias
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, m.dh)
    return m.proj(x)


def _block(m, x, bias):
    h, w = m.input_resolution
    b, n, c = x.shape
    ws = m.window_size
    res = x
    if h == ws and w == ws:
        x = _attention(m.attn, x, bias)
    else:
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = _attention(m.attn, x, bias)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w].contiguous()
        x = x.view(b, n, c)
    x = res + x
    x = _conv_bn(m.local_conv, x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
    mlp = m.mlp
    return x + mlp.fc2(F.gelu(mlp.fc1(mlp.norm(x))))


def _layer_norm_2d(m, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + m.eps)
    return m.weight[:, None, None] * x + m.bias[:, None, None]


class ReferenceStyle:
    """Reference-style forward passes over a loaded TinySAM (``vit_t``) model."""

    def __init__(self, sam: Sam) -> None:
        self.sam = sam
        enc = sam.image_encoder
        # The reference caches each attention bias table on .eval().
        self.biases = [
            [
                blk.attn.attention_biases[:, blk.attn.attention_bias_idxs].detach()
                for blk in layer.blocks
            ]
            for layer in enc.layers[1:]
        ]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.sam.image_encoder
        seq = enc.patch_embed.seq
        x = _conv_bn(seq[2], F.gelu(_conv_bn(seq[0], x)))
        stage0 = enc.layers[0]
        for blk in stage0.blocks:
            y = F.gelu(_conv_bn(blk.conv1, x))
            y = F.gelu(_conv_bn(blk.conv2, y))
            x = F.gelu(_conv_bn(blk.conv3, y) + x)
        x = _merge(stage0.downsample, x)
        for layer, biases in zip(enc.layers[1:], self.biases):
            for blk, bias in zip(layer.blocks, biases):
                x = _block(blk, x, bias)
            if layer.downsample is not None:
                x = _merge(layer.downsample, x)
        s = enc.embedding_size
        x = x.view(x.shape[0], s, s, -1).permute(0, 3, 1, 2)
        neck = enc.neck
        x = _layer_norm_2d(neck[1], neck[0](x))
        return _layer_norm_2d(neck[3], neck[2](x))

    @torch.no_grad()
    def decode(self, features, point_coords, point_labels):
        """Low-res logits (3 masks) and scores for BxNx2 points in the 1024 frame."""
        sam = self.sam
        sparse, dense = sam.prompt_encoder((point_coords, point_labels), None, None)
        dec = sam.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = torch.repeat_interleave(features, tokens.shape[0], dim=0) + dense
        pos = torch.repeat_interleave(sam.prompt_encoder.get_dense_pe(), tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos, tokens)
        up1, norm, _, up2, _ = dec.output_upscaling
        x = src.transpose(1, 2).view(b, c, h, w)
        x = F.gelu(up2(F.gelu(_layer_norm_2d(norm, up1(x)))))
        hyper = torch.stack(
            [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = x.shape
        masks = (hyper @ x.view(b, c, h * w)).view(b, -1, h, w)
        iou = dec.iou_prediction_head(hs[:, 0, :])
        return masks[:, 1:], iou[:, 1:]

    @torch.no_grad()
    def predict_one_point(self, features, coords, labels, input_size, original_size):
        low_res, iou = self.decode(features, coords, labels)
        masks = self.sam.postprocess_masks(low_res, input_size, original_size) > 0
        return masks[0].numpy(), iou[0].numpy(), low_res[0].numpy()
