"""Building the models: ``build_sam_model(name, checkpoint)`` builds an architecture and loads a
plain ``state_dict`` saved by TinySAM, MobileSAM or segment-anything (read and checked by
``tinysam.checkpoint``). The public registry (``sam_model_registry``, ``build_sam_vit_*``) is in
``tinysam.backends``, which also loads quantized folders and the authors' pickled Q-TinySAM.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn

from .checkpoint import (  # noqa: F401  (re-exported: their home is tinysam.checkpoint)
    CACHE_ENV,
    CHECKPOINT_ENV,
    MODEL_TYPES,
    VIT_WIDTHS,
    WEIGHT_URLS,
    CheckpointContents,
    CheckpointError,
    ResolvedCheckpoint,
    cache_dir,
    cached_checkpoint_path,
    check_model_type,
    describe_state_dict,
    detect_model_type,
    load_strict,
    read_checkpoint,
    read_state_dict,
    resolve_checkpoint,
)
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
VIT_PATCH_SIZE = 16

# SAM ViT teachers: embed dim, depth, heads, global-attention blocks.
VIT_CONFIGS = {
    "vit_b": dict(
        embed_dim=VIT_WIDTHS["vit_b"], depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)
    ),
    "vit_l": dict(
        embed_dim=VIT_WIDTHS["vit_l"], depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": dict(
        embed_dim=VIT_WIDTHS["vit_h"], depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)
    ),
}
VIT_T_CONFIG = dict(
    embed_dims=(64, 128, 160, 320),
    depths=(2, 2, 6, 2),
    num_heads=(2, 4, 5, 10),
    window_sizes=(7, 7, 14, 7),
)


def sam_around(image_encoder: nn.Module, image_size: int = IMAGE_SIZE) -> Sam:
    """SAM's prompt encoder and mask decoder around ``image_encoder`` (whose embedding is
    256 x image_size/16 x image_size/16); small image sizes make test and demo models."""
    grid = image_size // VIT_PATCH_SIZE
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


# What ``small_teacher`` builds, for the records of stages that trained one: a teacher of
# another layout is trained again, not loaded.
SMALL_TEACHER_LAYOUT = "vit 96x2, global attention"


def small_teacher(image_size: int = 256, seed: int = 0) -> Sam:
    """A SAM ViT (global attention, relative positions) of 2 blocks. At the demo's sizes the
    token grid is 8 x 8 to 16 x 16: SAM's 14-token windows would not fit, 4-token ones cut
    most objects apart, and global attention over 64-256 tokens costs next to nothing."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=image_size,
        embed_dim=96,
        depth=2,
        num_heads=4,
        window_size=0,
        global_attn_indexes=(),
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


def build_image_encoder(model_type: str) -> nn.Module:
    """The image encoder alone, untrained, for a registry name."""
    if model_type == "vit_t":
        return TinyViT(img_size=IMAGE_SIZE, **VIT_T_CONFIG)
    if model_type not in VIT_CONFIGS:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}"
        )
    return ImageEncoderViT(
        img_size=IMAGE_SIZE,
        patch_size=VIT_PATCH_SIZE,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
        **VIT_CONFIGS[model_type],
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_sam_model(model_type: str, checkpoint: str | os.PathLike | None = None) -> Sam:
    """Build ``model_type`` in eval mode; load ``checkpoint`` strictly if given."""
    if checkpoint is None:
        return sam_around(build_image_encoder(model_type))
    state_dict = read_state_dict(checkpoint)
    check_model_type(state_dict, model_type, source=str(checkpoint))
    return sam_from_state_dict(state_dict, model_type, source=str(checkpoint))


def sam_from_state_dict(state_dict: dict[str, torch.Tensor], model_type: str, source: str) -> Sam:
    """``model_type`` holding a state dict already checked to be one (``check_model_type``),
    loaded strictly (see ``load_strict``)."""
    sam = sam_around(build_image_encoder(model_type))
    load_strict(sam, state_dict, f"the {model_type} architecture", source)
    return sam


def load_float_model(
    model_type: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    download: bool = True,
    progress: bool = True,
) -> tuple[Sam, ResolvedCheckpoint]:
    """A float model from a checkpoint found and read by ``checkpoint.read_checkpoint`` (the
    model type defaults to what the file holds). ``backends.load_model`` also takes quantized
    folders."""
    contents = read_checkpoint(model_type, checkpoint, download=download, progress=progress)
    if contents.quantized:
        raise CheckpointError(
            f"{contents.resolved.path} is a quantized model; a float checkpoint is needed here"
        )
    source = str(contents.resolved.path)
    sam = sam_from_state_dict(contents.state_dict, contents.model_type, source)
    return sam.to(device), contents.resolved
