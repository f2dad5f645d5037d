"""Small teacher and student models for tests and ``tinysam distill demo`` (minutes on a CPU).

Both keep SAM's prompt encoder and mask decoder (256 channels) around a small image encoder, so
every loss term is the real one; only the image size and the encoders shrink.
"""

from __future__ import annotations

import os

from ..build import (  # noqa: F401  (the small models live in tinysam.build)
    IMAGE_SIZE,
    SMALL_TEACHER_LAYOUT,
    build_sam_model,
    load_float_model,
    load_strict,
    read_state_dict,
    small_student,
    small_teacher,
)
from ..modeling import Sam

SMALL = "small"
STUDENTS = (SMALL, "vit_t")
TEACHERS = (SMALL, "vit_b", "vit_l", "vit_h")


def _small_from(sam: Sam, checkpoint: str | os.PathLike | None, what: str) -> Sam:
    if checkpoint is not None:
        state_dict = read_state_dict(checkpoint)
        load_strict(sam, state_dict, f"the small {what} at this image_size", str(checkpoint))
    return sam


def _full_size_only(name: str, image_size: int) -> None:
    if image_size != IMAGE_SIZE:
        raise ValueError(
            f"{name} works on {IMAGE_SIZE}-pixel inputs, not image_size {image_size}; "
            f"set image_size: {IMAGE_SIZE} (the small models take other sizes)"
        )


def build_student(
    name: str, image_size: int = IMAGE_SIZE, checkpoint: str | os.PathLike | None = None
) -> Sam:
    """The model to train: ``vit_t`` (TinySAM) from scratch or from a checkpoint (e.g.
    MobileSAM's, which has the same layout, or a previous run's ``last.pt``), or ``small``."""
    if name == SMALL:
        return _small_from(small_student(image_size), checkpoint, "student")
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")
    _full_size_only(name, image_size)
    return build_sam_model(name, checkpoint)


def build_teacher(
    name: str,
    image_size: int = IMAGE_SIZE,
    checkpoint: str | os.PathLike | None = None,
    with_image_encoder: bool = True,
    progress: bool = True,
) -> Sam:
    """The teacher, in eval mode: a SAM ViT from ``checkpoint`` (downloaded into the cache when
    none is given) or ``small``. Without ``with_image_encoder`` (its embeddings come from a
    cache) the encoder is dropped after loading, freeing ~2.5 GB for ViT-H."""
    if name == SMALL:
        teacher = _small_from(small_teacher(image_size), checkpoint, "teacher")
    elif name in TEACHERS:
        _full_size_only(name, image_size)
        teacher, _ = load_float_model(name, checkpoint, progress=progress)
    else:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    if not with_image_encoder:
        teacher.image_encoder = None
    return teacher.eval()
