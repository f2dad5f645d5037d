"""CVAT: a serverless (nuclio) interactor that returns image embeddings, and the decoder ONNX
CVAT's Segment Anything plug-in runs in the browser.

The contract, read from CVAT's ``serverless/pytorch/facebookresearch/sam/nuclio`` and
``cvat-ui/plugins/sam``: the function gets ``{"image": base64 image, ...}`` and answers
``{"blob": base64 of the float32 1x256x64x64 embedding}``; the plug-in (its model id is fixed:
``pth-facebookresearch-sam-vit-h``) feeds that to ``/assets/decoder.onnx`` with the clicks
scaled to the 1024 frame (a box as labels 2 and 3 first, then positives 1, negatives 0, no
padding point), ``orig_im_size`` [H, W] and its last low-res mask, and reads ``masks`` (uint8,
cropped to the mask's bounding box), ``low_res_masks`` and the box ``xtl, ytl, xbr, ybr``
(inclusive pixels).

``export_cvat_decoder`` writes that decoder for a tinysam model. It appends
segment-anything's padding point itself when a prompt has neither a box nor one, so the
browser gets the mask ``tinysam segment`` gives (the best of three for one click).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

FUNCTION_ID = "pth-facebookresearch-sam-vit-h"  # what cvat-ui/plugins/sam answers to
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks", "xtl", "ytl", "xbr", "ybr")
DEFAULT_MAX_PIXELS = 40_000_000


def _decoder_graph(sam):
    import torch
    from torch import nn

    from ..runtime.graphs import DecoderGraph

    class CvatDecoderGraph(nn.Module):
        """segment-anything's single-mask decoder, padding the prompt as SamPredictor does."""

        def __init__(self) -> None:
            super().__init__()
            self.decoder = DecoderGraph(sam, single=True)

        def forward(self, embeddings, coords, labels, mask_input, has_mask_input):
            given = self.decoder(embeddings, coords, labels, mask_input, has_mask_input)
            batch = coords.shape[0]
            padded = self.decoder(
                embeddings,
                torch.cat([coords, coords.new_zeros(batch, 1, 2)], dim=1),
                torch.cat([labels, labels.new_full((batch, 1), -1.0)], dim=1),
                mask_input,
                has_mask_input,
            )
            complete = ((labels == -1) | (labels >= 2)).any(dim=1)  # a box or padding already
            iou = torch.where(complete[:, None], given[0], padded[0])
            low_res = torch.where(complete[:, None, None, None], given[1], padded[1])
            return iou, low_res

    return CvatDecoderGraph()


def export_cvat_decoder(sam, opset: int):
    """The browser decoder (see the module doc) as an onnx.ModelProto."""
    import torch

    from ..runtime.contract import DECODER_INPUTS
    from ..runtime.onnx_export import add_mask_upscaling, onnx_program, portable

    embedding = sam.image_encoder.img_size // 16
    example = (
        torch.zeros(1, sam.prompt_encoder.embed_dim, embedding, embedding),
        torch.full((1, 3, 2), 100.0),
        torch.tensor([[1.0, 0.0, 1.0]]),
        torch.zeros(1, 1, *sam.prompt_encoder.mask_input_size),
        torch.zeros(1),
    )
    points = torch.export.Dim("points", min=1, max=1 << 10)
    with torch.no_grad():
        model = onnx_program(
            _decoder_graph(sam.to("cpu").eval()),
            example,
            opset,
            input_names=list(DECODER_INPUTS[:-1]),
            output_names=["iou_predictions", "low_res_masks"],
            dynamic_shapes=(None, {1: points}, {1: points}, None, None),
        )
    return portable(add_cropped_mask(add_mask_upscaling(model, sam.image_encoder.img_size)))


def add_cropped_mask(model):
    """Turn the ``masks`` logits into CVAT's outputs: the mask as uint8 (255 inside) cropped
    to its bounding box, and that box (inclusive, int64 [1] each). An empty mask keeps the
    whole frame, all zeros, which CVAT reads as no shape."""
    from onnx import TensorProto, helper

    graph = model.graph
    for node in graph.node:
        node.output[:] = ["cvat_logits" if out == "masks" else out for out in node.output]

    def const(name: str, values, dtype=TensorProto.INT64, dims=None):
        tensor = helper.make_tensor(name, dtype, [len(values)] if dims is None else dims, values)
        graph.node.append(helper.make_node("Constant", [], [name], value=tensor))

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    const("cvat_zero", [0.0], TensorProto.FLOAT, dims=[])
    const("cvat_inside", [255], TensorProto.UINT8, dims=[])
    const("cvat_outside", [0], TensorProto.UINT8, dims=[])
    const("cvat_rows_axes", [0, 1, 3])
    const("cvat_cols_axes", [0, 1, 2])
    const("cvat_one", [1])
    const("cvat_hw_axes", [2, 3])
    inside = node("Greater", ["cvat_logits", "cvat_zero"], "cvat_inside_mask")
    full = node("Where", [inside, "cvat_inside", "cvat_outside"], "cvat_full")
    occupied = node("Cast", [inside], "cvat_occupied", to=TensorProto.INT32)
    rows = node("ReduceMax", [occupied, "cvat_rows_axes"], "cvat_rows", keepdims=0)
    cols = node("ReduceMax", [occupied, "cvat_cols_axes"], "cvat_cols", keepdims=0)
    for name, line, last in (
        ("ytl", rows, 0),
        ("ybr", rows, 1),
        ("xtl", cols, 0),
        ("xbr", cols, 1),
    ):
        node("ArgMax", [line], name, axis=0, keepdims=1, select_last_index=last)
    starts = node("Concat", ["ytl", "xtl"], "cvat_starts", axis=0)
    ends = node(
        "Concat",
        [
            node("Add", ["ybr", "cvat_one"], "cvat_y_end"),
            node("Add", ["xbr", "cvat_one"], "cvat_x_end"),
        ],
        "cvat_ends",
        axis=0,
    )
    node("Slice", [full, starts, ends, "cvat_hw_axes"], "masks")

    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info("masks", TensorProto.UINT8, ["batch", 1, "height", "width"])
    )
    graph.output.extend(outputs[name] for name in ("iou_predictions", "low_res_masks"))
    for name in ("xtl", "ytl", "xbr", "ybr"):
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, [1]))
    return model


# --- the serverless function ---------------------------------------------------------------


def init_context(context) -> None:
    """nuclio's start-up hook: load the model once per worker. Settings come from the
    function's environment: TINYSAM_CHECKPOINT (or TINYSAM_ONNX_DIR with
    TINYSAM_BACKEND=onnx), TINYSAM_THREADS."""
    from ..backends import PredictorSpec
    from ..io import positive_int_env

    # Every setting is read and checked here: a misconfigured function fails to start with one
    # line in its log, never later as a client's 400.
    try:
        max_pixels = positive_int_env("TINYSAM_MAX_PIXELS", DEFAULT_MAX_PIXELS)
        spec = PredictorSpec.from_env()
    except ValueError as err:
        raise RuntimeError(f"tinysam: {err}; fix the function's environment") from None
    context.logger.info("tinysam: loading the model")
    context.user_data.max_pixels = max_pixels
    context.user_data.predictor = spec.load()
    context.logger.info("tinysam: ready")


def handler(context, event):
    """``{"image": base64}`` -> ``{"blob": base64 float32 1x256x64x64}``; bad input is a 400
    with ``{"error": one line}``."""
    try:
        image = _request_image(event.body, context.user_data.max_pixels)
    except ValueError as err:
        return _response(context, 400, {"error": str(err)})
    predictor = context.user_data.predictor
    predictor.set_image(image)
    embedding = np.ascontiguousarray(_numpy(predictor.get_image_embedding()), dtype="<f4")
    return _response(context, 200, {"blob": base64.b64encode(embedding.tobytes()).decode()})


def _request_image(body: Any, max_pixels: int) -> np.ndarray:
    from ..io import ImageError, read_image

    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:
            raise ValueError('the request body is not JSON: send {"image": base64}') from None
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise ValueError('the request needs "image": the frame as a base64 string')
    try:
        data = base64.b64decode(body["image"], validate=True)
    except ValueError:
        raise ValueError('"image" is not valid base64') from None
    if not data:
        raise ValueError('"image" is empty')
    try:
        return read_image(data, name="the frame", max_pixels=max_pixels)
    except ImageError as err:
        raise ValueError(str(err)) from None


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _response(context, status: int, body: dict):
    return context.Response(
        body=json.dumps(body), headers={}, content_type="application/json", status_code=status
    )


FUNCTION_YAML = """\
# A CVAT interactor (nuclio function) serving TinySAM image embeddings.
# Deploy: nuctl deploy --project-name cvat --path . --platform local
# It takes the id of CVAT's Segment Anything function, because CVAT's SAM plug-in only
# answers to that id; copy decoder.onnx over CVAT's cvat-ui plug-in decoder (see the README).
metadata:
  name: {function_id}
  namespace: cvat
  annotations:
    name: TinySAM ({model_type})
    version: 2
    type: interactor
    spec:
    min_pos_points: 0
    min_neg_points: 0
    startswith_box_optional: true
    help_message: Click inside an object (and outside it to exclude); or draw a box

spec:
  description: TinySAM image embeddings for CVAT's Segment Anything plug-in
  runtime: 'python:3.11'
  handler: main:handler
  eventTimeout: 30s
  env:
    - name: TINYSAM_CHECKPOINT
      value: /opt/nuclio/tinysam/{checkpoint}
    - name: TINYSAM_THREADS
      value: "2"
  build:
    image: cvat.tinysam.{model_type}
    baseImage: python:3.11-slim
    directives:
      preCopy:
        - kind: WORKDIR
          value: /opt/nuclio/tinysam
        - kind: RUN
          value: pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
        - kind: RUN
          value: pip install --no-cache-dir "tinysam[torch]"
  triggers:
    myHttpTrigger:
      maxWorkers: 1
      kind: 'http'
      workerAvailabilityTimeoutMilliseconds: 10000
      attributes:
        maxRequestBodySize: 33554432 # 32MB
  platform:
    attributes:
      restartPolicy:
        name: always
        maximumRetryCount: 3
      mountMode: volume
"""

MAIN_PY = '''\
"""The nuclio entry points live in tinysam (tested there); this file names them."""

from tinysam.integrations.cvat import handler, init_context  # noqa: F401
'''


def export_cvat(sam, out_dir: Path, model_type: str, opset: int, checkpoint: Path) -> dict:
    """The function folder for ``nuctl deploy``: function.yaml, main.py, the checkpoint, and
    decoder.onnx for CVAT's plug-in."""
    import shutil

    from ..io import atomic_write
    from ..runtime.onnx_export import save_onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "decoder": out_dir / "decoder.onnx",
        "main": out_dir / "main.py",
        "checkpoint": out_dir / Path(checkpoint).name,
        "function": out_dir / "function.yaml",
    }
    save_onnx(export_cvat_decoder(sam, opset), paths["decoder"])
    with atomic_write(paths["main"], "w") as f:
        f.write(MAIN_PY)
    if Path(checkpoint).resolve() != paths["checkpoint"].resolve():
        shutil.copyfile(checkpoint, paths["checkpoint"])
    text = FUNCTION_YAML.format(
        function_id=FUNCTION_ID, model_type=model_type, checkpoint=paths["checkpoint"].name
    )
    with atomic_write(paths["function"], "w") as f:  # last: a whole export has it
        f.write(text)
    return paths
