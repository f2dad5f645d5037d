"""X-AnyLabeling / AnyLabeling model files: the two ONNX graphs and the model config YAML its
``segment_anything`` model type loads (``anylabeling/services/auto_labeling/segment_anything.py``
and ``sam_onnx.py``).

What the tool does with them, read from its code: it draws the image onto a 684x1024 (HxW)
canvas (scaled to fit, top-left, zeros elsewhere), feeds that canvas to the encoder as a
684x1024x3 float32 RGB array of 0..255 values, and decodes with segment-anything's ONNX decoder
inputs (``orig_im_size`` = the canvas, a padding point always appended) taking mask 0. So the
encoder here has the normalisation, the HWC->CHW change and the padding to 1024x1024 inside
it, and the decoder is segment-anything's single-mask export (``decoder_single.onnx``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write
from ..modeling import Sam

CANVAS_HW = (684, 1024)  # SegmentAnythingONNX.input_size


class CanvasEncoder(nn.Module):
    """HxWx3 float RGB (0..255, H, W <= the encoder's size) -> ``image_embeddings``."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.register_buffer("pixel_mean", sam.pixel_mean.reshape(3), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.reshape(3), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.image_encoder.img_size
        x = ((image - self.pixel_mean) / self.pixel_std).permute(2, 0, 1).unsqueeze(0)
        h, w = x.shape[-2:]
        return self.image_encoder(F.pad(x, (0, size - w, 0, size - h)))


def export_canvas_encoder(sam: Sam, opset: int):
    from ..runtime.onnx_export import onnx_program

    example = torch.zeros(*CANVAS_HW, 3)
    with torch.no_grad():
        return onnx_program(
            CanvasEncoder(sam), (example,), opset, input_names=["image"],
            output_names=["image_embeddings"],
        )  # fmt: skip


def config_yaml(name: str, display_name: str, encoder: str, decoder: str) -> str:
    """The model config X-AnyLabeling's "Load Custom Model" reads (model paths relative to it)."""
    h, w = CANVAS_HW
    return (
        "type: segment_anything\n"
        f"name: {name}\n"
        "provider: tinysam\n"
        f"display_name: {display_name}\n"
        f"encoder_model_path: {encoder}\n"
        f"decoder_model_path: {decoder}\n"
        "input_size: 1024\n"
        f"max_width: {w}\n"
        f"max_height: {h - 2}\n"  # as X-AnyLabeling's own SAM configs say
    )


def export_anylabeling(sam: Sam, out_dir: Path, model_type: str, opset: int) -> dict[str, Path]:
    """Write ``tinysam_<type>.encoder.onnx``, ``.decoder.onnx`` and ``tinysam_<type>.yaml``."""
    from ..runtime.onnx_export import export_decoder, portable, save_onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = sam.to("cpu").eval()
    stem = f"tinysam_{model_type}"
    paths = {
        "encoder": out_dir / f"{stem}.encoder.onnx",
        "decoder": out_dir / f"{stem}.decoder.onnx",
        "config": out_dir / f"{stem}.yaml",
    }
    save_onnx(portable(export_canvas_encoder(sam, opset)), paths["encoder"])
    save_onnx(portable(export_decoder(sam, multimask=False, opset=opset)), paths["decoder"])
    text = config_yaml(
        stem, f"TinySAM ({model_type})", paths["encoder"].name, paths["decoder"].name
    )
    with atomic_write(paths["config"], "w") as f:  # last: its presence means a whole export
        f.write(text)
    return paths
