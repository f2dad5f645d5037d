"""Small teacher and student models for tests and ``tinysam distill demo`` (minutes on a CPU).

Both keep SAM's prompt encoder and mask decoder (256 channels) around a small image encoder, so
every loss term is the real one; only the image size and the encoders shrink.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..build import sam_around
from ..modeling import ImageEncoderViT, Sam, TinyViT


def small_teacher(image_size: int = 256, seed: int = 0) -> Sam:
    """A SAM ViT (windowed + global attention, relative positions) of 2 blocks."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=image_size,
        embed_dim=96,
        depth=2,
        num_heads=4,
        window_size=4,
        global_attn_indexes=(1,),
        use_rel_pos=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    return sam_around(encoder, image_size)


def small_student(image_size: int = 256, seed: int = 1) -> Sam:
    """A TinyViT with TinySAM's layout (4 stages, no last downsampling) at a quarter width."""
    torch.manual_seed(seed)
    encoder = TinyViT(
        img_size=image_size,
        embed_dims=(16, 32, 40, 80),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        window_sizes=(7, 7, 14, 7),
    )
    return sam_around(encoder, image_size)
