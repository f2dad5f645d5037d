"""``tinysam info``: the model, its size and where its checkpoint came from."""

from __future__ import annotations

import argparse

from .common import add_model_args, model_from_args


def register(sub) -> None:
    info = sub.add_parser(
        "info",
        help="show the model, its size and where its checkpoint came from",
        description="Show the model type, parameter count and where the checkpoint came from.",
    )
    add_model_args(info)
    info.set_defaults(run=run_info, show=print_info)


def run_info(args: argparse.Namespace) -> dict:
    from ..build import count_parameters, detect_model_type

    sam, resolved = model_from_args(args)
    model_type = detect_model_type(sam.state_dict())
    info = {
        "model": model_type,
        "parameters": count_parameters(sam),
        "image_encoder_parameters": count_parameters(sam.image_encoder),
        "prompt_encoder_parameters": count_parameters(sam.prompt_encoder),
        "mask_decoder_parameters": count_parameters(sam.mask_decoder),
        "checkpoint": str(resolved.path),
        "checkpoint_source": resolved.source,
    }
    if hasattr(sam, "published_quantization"):
        info["quantization"] = sam.published_quantization
    elif hasattr(sam, "quant_config"):
        bits = sam.quant_config.get("bits", {})
        layers = len(sam.quant_config.get("layers", {}))
        info["quantization"] = {"format": "tinysam quantized folder", "layers": layers, **bits}
    return info


def print_info(info: dict) -> None:
    sources = {
        "argument": "--checkpoint",
        "environment": "$TINYSAM_CHECKPOINT",
        "cache": "the user cache",
        "download": "downloaded just now",
    }
    print(f"model:       {info['model']}")
    print(
        f"parameters:  {info['parameters'] / 1e6:.2f} M "
        f"(image encoder {info['image_encoder_parameters'] / 1e6:.2f} M, "
        f"prompt encoder {info['prompt_encoder_parameters'] / 1e3:.1f} K, "
        f"mask decoder {info['mask_decoder_parameters'] / 1e6:.2f} M)"
    )
    print(f"checkpoint:  {info['checkpoint']} (from {sources[info['checkpoint_source']]})")
    if "quantization" in info:
        quantization = info["quantization"]
        print(f"quantized:   {quantization['format']}, {quantization['layers']} layers")
