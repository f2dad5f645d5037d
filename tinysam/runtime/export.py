"""Export a model to ONNX: ``encoder.onnx``, ``decoder.onnx`` (4 mask tokens),
``decoder_single.onnx`` (1 mask), ``upscale_masks.onnx``, ``decoder_many.onnx`` +
``decoder_many_masks.onnx`` (bulk one-point prompts, for the everything mode) and
``tinysam_onnx.json`` describing them.

``decoder.onnx`` and ``decoder_single.onnx`` are segment-anything's ONNX decoder
(``scripts/export_onnx_model.py``, without and with ``--return-single-mask``), so code written
for it gets the same masks: ``image_embeddings`` 1x256x64x64, ``point_coords`` BxNx2 in the
1024-frame (boxes as two corners labelled 2 and 3; without a box, a padding point (0, 0)
labelled -1 ends the list), ``point_labels`` BxN, ``mask_input`` 1x1x256x256 with
``has_mask_input`` [1] (0 or 1), ``orig_im_size`` [2] (H, W) -> ``masks`` BxMxHxW logits at the
original size, ``iou_predictions`` BxM, ``low_res_masks`` BxMx256x256. ``decoder.onnx`` returns
all four mask tokens (M = 4: token 0 is the single-mask output, 1-3 the multimask ones);
``decoder_single.onnx`` returns one (M = 1), chosen as segment-anything's export chooses: the
best of tokens 1-3 by predicted IoU when the prompt has at most two points (N <= 2, the padding
point or the box corners included), token 0 otherwise. B (prompt sets, one mask input shared
by all) and N are dynamic; segment-anything's notebook uses B = 1.

``upscale_masks.onnx`` is ours: ``low_res_masks`` BxMx256x256 + ``orig_im_size`` -> ``masks``;
``OnnxPredictor`` upscales only the masks it returns with it.

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

MANIFEST = "tinysam_onnx.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILES = {"multimask": "decoder.onnx", "single": "decoder_single.onnx"}
UPSCALE_FILE = "upscale_masks.onnx"
FORMAT_VERSION = 2  # 2: decoders as segment-anything's export (4 masks / its single-mask rule)
MANY_PROMPT_FILE = "decoder_many.onnx"
MANY_PROMPT_MASKS_FILE = "decoder_many_masks.onnx"
DEFAULT_OPSET = 20
MIN_OPSET = 18  # torch's dynamo exporter
# Protobuf cannot hold 2 GiB; larger graphs (ViT-H) keep their weights beside them.
_EXTERNAL_DATA_BYTES = 1 << 30

ENCODER_INPUT = "image"
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


class DecoderGraph(nn.Module):
    """Prompt encoder and mask decoder behind segment-anything's ONNX decoder inputs.

    Returns IoU predictions and low-res logits of all four mask tokens, or (``single``) of the
    one segment-anything's export picks (see the module doc). ``masks`` (upscaled to
    ``orig_im_size``) is added as plain ONNX ``Resize`` nodes afterwards
    (``add_mask_upscaling``), because its output size is data, which torch's exporter would
    have to trace as a guess.
    """

    def __init__(self, sam: Sam, single: bool) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.single = single

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.prompt_encoder
        sparse = prompts._embed_points(point_coords, point_labels, pad=False)
        no_mask = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * prompts._embed_masks(mask_input) + (1 - has_mask_input) * no_mask
        low_res, iou = self.mask_decoder.predict_masks(
            image_embeddings, prompts.get_dense_pe(), sparse, dense
        )
        if not self.single:
            return iou, low_res
        return select_single_mask(iou, low_res, point_labels)


def select_single_mask(
    iou: torch.Tensor, low_res: torch.Tensor, point_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's single-mask choice, without control flow: token 0's score is moved by
    1000 * (points - 2.5), so it wins from three points on and loses up to two (the padding
    point and box corners count)."""
    points = torch.ones_like(point_labels).sum(dim=1, keepdim=True)
    score = torch.cat([iou[:, :1] + (points - 2.5) * 1000.0, iou[:, 1:]], dim=1)
    best = torch.argmax(score, dim=1, keepdim=True)
    size = low_res.shape[-2:]
    masks = torch.gather(low_res, 1, best[:, :, None, None].expand(-1, -1, *size))
    return torch.gather(iou, 1, best), masks


class SamOnnxModel(nn.Module):
    """segment-anything's ``SamOnnxModel`` (the module its ``scripts/export_onnx_model.py``
    traces), for client code that exports through it: ``forward(image_embeddings,
    point_coords, point_labels, mask_input, has_mask_input, orig_im_size)`` -> upscaled mask
    logits, scores, low-res logits (``return_extra_metrics``: upscaled, scores, stability
    scores, areas, low-res). ``tinysam export`` writes the same graphs without it."""

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.decoder = DecoderGraph(model, single=False)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_score_offset = 1.0
        self.img_size = model.image_encoder.img_size

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        size = self.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        scale = size / orig_im_size.max()
        unpadded = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        masks = masks[..., : unpadded[0], : unpadded[1]]
        h, w = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from ..masks import calculate_stability_score

        scores, masks = self.decoder(
            image_embeddings, point_coords, point_labels, mask_input, has_mask_input
        )
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = calculate_stability_score(masks, threshold, self.stability_score_offset)
        if self.return_single_mask:
            scores, masks = select_single_mask(scores, masks, point_labels)
        upscaled = self.mask_postprocessing(masks, orig_im_size)
        if self.return_extra_metrics:
            stability = calculate_stability_score(upscaled, threshold, self.stability_score_offset)
            areas = (upscaled > threshold).sum(-1).sum(-1)
            return upscaled, scores, stability, areas, masks
        return upscaled, scores, masks


class ManyPromptDecodeGraph(nn.Module):
    """Many one-point prompts on one image (the everything mode) through ``ManyPromptDecoder``,
    in two graphs, so that masks are made only for prompts whose IoU predictions pass a filter.

    This one (``decoder_many.onnx``): ``image_embeddings`` 1x256x64x64, ``point_coords`` Bx2x2
    and ``point_labels`` Bx2 (the point, then the padding point (0, 0) labelled -1) ->
    ``iou_predictions`` Bx4 (all four mask tokens: 0 single-mask, 1-3 multimask) and the
    ``MaskState`` tensors that ``ManyPromptMasksGraph`` turns into masks. The prompt count is
    fixed at two because the low-rank state's size depends on it.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from ..modeling.many_prompts import ManyPromptDecoder

        prompts = self.prompt_encoder
        sparse = prompts._embed_points(point_coords, point_labels, pad=False)
        h, w = prompts.image_embedding_size
        no_mask = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        decoder = ManyPromptDecoder(
            self.mask_decoder, image_embeddings, prompts.get_dense_pe(), no_mask
        )
        iou, _ = decoder.decode(sparse)
        return (iou, *decoder.mask_state())


class ManyPromptMasksGraph(nn.Module):
    """``decoder_many_masks.onnx``: ``MaskState`` tensors (for the chosen prompts) ->
    ``low_res_masks`` Bx4x256x256."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.mask_decoder = sam.mask_decoder
        self.grid = sam.prompt_encoder.image_embedding_size

    def forward(
        self,
        mask_tokens: torch.Tensor,
        coeffs: torch.Tensor,
        basis: torch.Tensor,
        scale: torch.Tensor,
        shared: torch.Tensor,
        constant: torch.Tensor,
    ) -> torch.Tensor:
        from ..modeling.many_prompts import MaskState, masks_from_state

        state = MaskState(mask_tokens, coeffs, basis, scale, shared, constant)
        return masks_from_state(self.mask_decoder, state, self.grid)


def _onnx_program(module: nn.Module, args: tuple, opset: int, **kwargs):
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
        return _onnx_program(
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
        model = _onnx_program(
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
        decode_model = _onnx_program(
            decode,
            example,
            opset,
            input_names=["image_embeddings", "point_coords", "point_labels"],
            output_names=["iou_predictions", *MaskState._fields],
            dynamic_shapes=(None, {0: batch}, {0: batch}),
        )
        per_prompt = {0: batch}
        masks_model = _onnx_program(
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
