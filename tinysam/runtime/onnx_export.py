"""Export a model to ONNX: the folder that ``runtime.contract`` describes (``encoder.onnx``,
the two segment-anything decoders, ``upscale_masks.onnx``, the many-prompt decoders and
``tinysam_onnx.json``), from the graphs of ``runtime.graphs``.

Needs torch, onnx and onnxscript (``pip install tinysam[export]``). Exported with torch's
dynamo exporter; from opset 20 GELU is one ONNX op instead of five (1.25x faster encoder here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write
from ..modeling import Sam
from ..version import __version__
from .contract import (
    DECODER_FILES,
    DECODER_INPUTS,
    ENCODER_FILE,
    ENCODER_INPUT,
    FORMAT_VERSION,
    MANIFEST,
    MANY_PROMPT_FILE,
    MANY_PROMPT_MASKS_FILE,
    UPSCALE_FILE,
)
from .graphs import DecoderGraph, ManyPromptDecodeGraph, ManyPromptMasksGraph

DEFAULT_OPSET = 20
MIN_OPSET = 18  # torch's dynamo exporter
# Protobuf cannot hold 2 GiB; larger graphs (ViT-H) keep their weights beside them.
_EXTERNAL_DATA_BYTES = 1 << 30


def onnx_program(module: nn.Module, args: tuple, opset: int, **kwargs):
    """torch.onnx.export without its console chatter (warnings, prints, and one "torchvision is
    not installed" log line per torchvision op per graph); returns the onnx.ModelProto."""
    import contextlib
    import io
    import logging
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), args, None, dynamo=True, opset_version=opset, **kwargs
            )
    finally:
        registration.setLevel(level)
    return program.model_proto


def export_encoder(sam: Sam, opset: int = DEFAULT_OPSET):
    """The image encoder: normalised, padded 1x3xSxS image -> ``image_embeddings``."""
    size = sam.image_encoder.img_size
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        return onnx_program(
            sam.image_encoder,
            (example,),
            opset,
            input_names=[ENCODER_INPUT],
            output_names=["image_embeddings"],
        )


def export_decoder(sam: Sam, multimask: bool, opset: int = DEFAULT_OPSET):
    """A decoder graph with segment-anything's ONNX contract (see the module doc):
    ``multimask`` all four mask tokens (its default export), else its single-mask export."""
    embedding = sam.image_encoder.img_size // 16
    channels = sam.prompt_encoder.embed_dim
    mask_size = sam.prompt_encoder.mask_input_size
    example = (
        torch.zeros(1, channels, embedding, embedding),
        torch.full((2, 3, 2), 100.0),
        torch.tensor([[1.0, 0.0, -1.0]] * 2),
        torch.zeros(1, 1, *mask_size),
        torch.zeros(1),
    )
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    points = torch.export.Dim("points", min=1, max=1 << 10)
    prompt_dims = {0: batch, 1: points}
    with torch.no_grad():
        model = onnx_program(
            DecoderGraph(sam, single=not multimask),
            example,
            opset,
            input_names=list(DECODER_INPUTS[:-1]),
            output_names=["iou_predictions", "low_res_masks"],
            dynamic_shapes=(None, prompt_dims, prompt_dims, None, None),
        )
    return add_mask_upscaling(model, sam.image_encoder.img_size)


def export_many_prompt_decoder(sam: Sam, opset: int = DEFAULT_OPSET) -> tuple:
    """The many-prompt decoder's two graphs (decode, masks), batch dynamic."""
    from ..modeling.many_prompts import MaskState

    embedding = sam.image_encoder.img_size // 16
    example = (
        torch.zeros(1, sam.prompt_encoder.embed_dim, embedding, embedding),
        torch.full((2, 2, 2), 100.0),
        torch.tensor([[1.0, -1.0]] * 2),
    )
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    decode = ManyPromptDecodeGraph(sam)
    with torch.no_grad():
        state = decode(*example)[1:]
        decode_model = onnx_program(
            decode,
            example,
            opset,
            input_names=["image_embeddings", "point_coords", "point_labels"],
            output_names=["iou_predictions", *MaskState._fields],
            dynamic_shapes=(None, {0: batch}, {0: batch}),
        )
        per_prompt = {0: batch}
        masks_model = onnx_program(
            ManyPromptMasksGraph(sam),
            tuple(state),
            opset,
            input_names=list(MaskState._fields),
            output_names=["low_res_masks"],
            dynamic_shapes=(per_prompt, per_prompt, per_prompt, per_prompt, None, None),
        )
    return decode_model, masks_model


def add_mask_upscaling(model, image_size: int):
    """Append ``orig_im_size`` -> ``masks``: low-res logits to the padded input (bilinear), the
    padding cropped, then to the original size (bilinear), as ``tinysam.transforms.upscale_logits``.

    The unpadded size is the resize-longest-side shape, computed in float64 as Python does.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("orig_im_size", TensorProto.FLOAT, [2]))

    def const(name: str, values, dtype=TensorProto.INT64):
        graph.node.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                value=helper.make_tensor(name, dtype, [len(values)], values),
            )
        )

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    resize = {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}
    const("up_padded_hw", [image_size, image_size])
    const("up_long_side", [float(image_size)], TensorProto.DOUBLE)
    const("up_half", [0.5], TensorProto.DOUBLE)
    const("up_first_two", [0])
    const("up_two", [2])
    const("up_axes_hw", [2, 3])
    const("up_zeros_hw", [0, 0])
    shape = node("Shape", ["low_res_masks"], "up_shape")
    batch_masks = node("Slice", [shape, "up_first_two", "up_two"], "up_batch_masks")
    padded_sizes = node("Concat", [batch_masks, "up_padded_hw"], "up_padded_sizes", axis=0)
    padded = node("Resize", ["low_res_masks", "", "", padded_sizes], "up_padded", **resize)
    original = node("Cast", ["orig_im_size"], "up_original", to=TensorProto.DOUBLE)
    longest = node("ReduceMax", [original], "up_longest", keepdims=1)
    scale = node("Div", ["up_long_side", longest], "up_scale")
    scaled = node("Add", [node("Mul", [original, scale], "up_scaled"), "up_half"], "up_rounded")
    unpadded = node(
        "Cast", [node("Floor", [scaled], "up_floor")], "up_unpadded", to=TensorProto.INT64
    )
    cropped = node("Slice", [padded, "up_zeros_hw", unpadded, "up_axes_hw"], "up_cropped")
    original_hw = node("Cast", [original], "up_original_hw", to=TensorProto.INT64)
    sizes = node("Concat", [batch_masks, original_hw], "up_sizes", axis=0)
    node("Resize", [cropped, "", "", sizes], "masks", **resize)

    outputs = {o.name: o for o in graph.output}
    masks = helper.make_tensor_value_info(
        "masks", TensorProto.FLOAT, ["batch", "num_masks", "height", "width"]
    )
    del graph.output[:]
    graph.output.append(masks)
    graph.output.extend(
        outputs[name] for name in ("iou_predictions", "low_res_masks") if name in outputs
    )
    return model


def export_upscaling(mask_size: tuple[int, int], image_size: int, opset: int = DEFAULT_OPSET):
    """``upscale_masks.onnx``: ``low_res_masks`` BxMx256x256 + ``orig_im_size`` -> ``masks``,
    the Resize nodes of the decoders alone (``OnnxPredictor`` upscales only what it returns)."""
    from onnx import TensorProto, helper

    low_res = helper.make_tensor_value_info(
        "low_res_masks", TensorProto.FLOAT, ["batch", "num_masks", *mask_size]
    )
    graph = helper.make_graph([], "upscale_masks", [low_res], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return add_mask_upscaling(model, image_size)


# IR version 10 (onnx >= 1.16) is refused by ONNX Runtime before 1.18, e.g. the onnxruntime-web
# an annotation tool bundles; the graphs use nothing of it, so files for other tools say 9.
PORTABLE_IR_VERSION = 9


def portable(model):
    """``model`` marked with ``PORTABLE_IR_VERSION``, for runtimes we do not control."""
    model.ir_version = min(model.ir_version, PORTABLE_IR_VERSION)
    return model


def save_onnx(model, path: Path) -> None:
    """Write an ONNX model atomically; one over 1 GiB keeps its weights in ``<name>.data``."""
    import onnx

    path = Path(path)
    if model.ByteSize() < _EXTERNAL_DATA_BYTES:
        with atomic_write(path, "wb") as f:
            f.write(model.SerializeToString())
        return
    data = path.with_name(path.name + ".data")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(
            model,
            temporary,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def export_onnx(
    sam: Sam,
    out_dir: Path,
    model_type: str,
    opset: int = DEFAULT_OPSET,
    step: Callable[[str], None] | None = None,
    many_prompt_decoder: bool = True,
    rewrite: Callable | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the encoder, both decoders and the manifest to ``out_dir``; returns the manifest.

    ``step(name)`` is called before each file (for a progress bar). The manifest is written
    last, so a directory with one holds a complete export. ``rewrite`` transforms each graph
    before it is saved (the int8 rewrite), ``extra`` is merged into the manifest.
    """
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset must be at least {MIN_OPSET} (torch's ONNX exporter); "
            f"{DEFAULT_OPSET} keeps GELU one op"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = sam.to("cpu").eval()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    rewrite = rewrite or (lambda model: model)
    if step:
        step(ENCODER_FILE)
    save_onnx(rewrite(export_encoder(sam, opset)), out_dir / ENCODER_FILE)
    for variant, name in DECODER_FILES.items():
        if step:
            step(name)
        save_onnx(rewrite(export_decoder(sam, variant == "multimask", opset)), out_dir / name)
    upscaling = export_upscaling(sam.prompt_encoder.mask_input_size, sam.image_encoder.img_size)
    save_onnx(upscaling, out_dir / UPSCALE_FILE)
    manifest = describe(sam, model_type, opset)
    if many_prompt_decoder:
        if step:
            step(MANY_PROMPT_FILE)
        decode_model, masks_model = export_many_prompt_decoder(sam, opset)
        save_onnx(rewrite(decode_model), out_dir / MANY_PROMPT_FILE)
        save_onnx(rewrite(masks_model), out_dir / MANY_PROMPT_MASKS_FILE)
    else:
        for stale in (MANY_PROMPT_FILE, MANY_PROMPT_MASKS_FILE):
            (out_dir / stale).unlink(missing_ok=True)
        del manifest["many_prompt_decoder"]
    manifest.update(extra or {})
    with atomic_write(out_dir / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def describe(sam: Sam, model_type: str, opset: int) -> dict:
    """The manifest: what the OnnxPredictor (or anyone) needs to feed the graphs."""
    size = sam.image_encoder.img_size
    embedding = [sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size]
    mask_size = list(sam.prompt_encoder.mask_input_size)
    return {
        "format": "tinysam-onnx",
        "format_version": FORMAT_VERSION,
        "tinysam_version": __version__,
        "model_type": model_type,
        "opset": opset,
        "image_size": size,
        "image_format": sam.image_format,
        "pixel_mean": sam.pixel_mean.flatten().tolist(),
        "pixel_std": sam.pixel_std.flatten().tolist(),
        "mask_threshold": sam.mask_threshold,
        "encoder": {
            "file": ENCODER_FILE,
            "inputs": {ENCODER_INPUT: [1, 3, size, size]},
            "outputs": {"image_embeddings": [1, *embedding]},
            "note": "input: RGB resized to a long side of image_size, (x - mean) / std, "
            "zero-padded bottom and right",
        },
        "decoders": {
            variant: {
                "file": name,
                "num_masks": sam.mask_decoder.num_mask_tokens if variant == "multimask" else 1,
                "contract": "segment-anything's ONNX decoder"
                + (" (--return-single-mask)" if variant == "single" else " (all mask tokens)"),
                "inputs": {
                    "image_embeddings": [1, *embedding],
                    "point_coords": ["batch", "points", 2],
                    "point_labels": ["batch", "points"],
                    "mask_input": [1, 1, *mask_size],
                    "has_mask_input": [1],
                    "orig_im_size": [2],
                },
                "outputs": {
                    "masks": ["batch", "num_masks", "height", "width"],
                    "iou_predictions": ["batch", "num_masks"],
                    "low_res_masks": ["batch", "num_masks", *mask_size],
                },
            }
            for variant, name in DECODER_FILES.items()
        },
        "upscale": {
            "file": UPSCALE_FILE,
            "inputs": {"low_res_masks": ["batch", "num_masks", *mask_size], "orig_im_size": [2]},
            "outputs": {"masks": ["batch", "num_masks", "height", "width"]},
        },
        "many_prompt_decoder": {
            "file": MANY_PROMPT_FILE,
            "masks_file": MANY_PROMPT_MASKS_FILE,
            "num_masks": sam.mask_decoder.num_mask_tokens,
            "inputs": {
                "image_embeddings": [1, *embedding],
                "point_coords": ["batch", 2, 2],
                "point_labels": ["batch", 2],
            },
            "outputs": {"iou_predictions": ["batch", sam.mask_decoder.num_mask_tokens]},
            "masks_outputs": {
                "low_res_masks": ["batch", sam.mask_decoder.num_mask_tokens, *mask_size],
            },
            "note": "one point then the padding point per prompt; the first graph's other "
            "outputs (the decoded state) feed the masks graph, for the prompts that want masks; "
            "mask 0 is the single-mask output, 1.. the multimask ones",
        },
        "point_labels": {
            "-1": "padding (ends a list without a box)",
            "0": "background",
            "1": "foreground",
            "2": "box top-left",
            "3": "box bottom-right",
        },
    }
