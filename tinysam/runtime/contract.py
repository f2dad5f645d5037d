"""The ONNX export folder's contract: ``encoder.onnx``, ``decoder.onnx`` (4 mask tokens),
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

These names are the contract between ``runtime.onnx_export`` (which writes the folder; needs
torch) and ``runtime.predictor`` (which runs it; torch-free), so both read them here.
"""

MANIFEST = "tinysam_onnx.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILES = {"multimask": "decoder.onnx", "single": "decoder_single.onnx"}
UPSCALE_FILE = "upscale_masks.onnx"
FORMAT_VERSION = 2  # 2: decoders as segment-anything's export (4 masks / its single-mask rule)
MANY_PROMPT_FILE = "decoder_many.onnx"
MANY_PROMPT_MASKS_FILE = "decoder_many_masks.onnx"

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
