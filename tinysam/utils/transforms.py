"""Alias of ``tinysam.transforms`` at segment-anything's path."""

from ..transforms import ResizeLongestSide, upscale_logits

__all__ = ["ResizeLongestSide", "upscale_logits"]
