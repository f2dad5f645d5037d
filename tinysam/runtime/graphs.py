"""The modules exported to ONNX: segment-anything's decoder contract (``DecoderGraph``,
``SamOnnxModel``, its single-mask rule without control flow) and the many-prompt decoder's two
graphs. Plain ``nn.Module`` wrappers of the model; ``runtime.onnx_export`` exports them."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import Sam


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
