"""Batched decoding equals decoding each prompt alone, whichever internal path it takes."""

from __future__ import annotations

import torch


def _decode(model, features, sparse, dense):
    with torch.no_grad():
        return model.mask_decoder.predict_masks(
            features, model.prompt_encoder.get_dense_pe(), sparse, dense
        )


def test_shared_image_tokens_match_per_prompt_copies(predictor):
    model = predictor.model
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(5, 2, 2, generator=generator) * 1000
    labels = torch.tensor([[1, 0], [1, 1], [1, -1], [0, 1], [1, 1]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
    assert dense.stride(0) == 0  # no mask prompt: the shared path
    shared_masks, shared_iou = _decode(model, predictor.features, sparse, dense)
    copied_masks, copied_iou = _decode(model, predictor.features, sparse, dense.contiguous())
    assert torch.allclose(shared_masks, copied_masks, atol=1e-3)
    assert torch.allclose(shared_iou, copied_iou, atol=1e-5)
    for i in range(5):
        alone_masks, alone_iou = _decode(model, predictor.features, sparse[i : i + 1], dense[:1])
        assert torch.allclose(shared_masks[i], alone_masks[0], atol=1e-3)
        assert torch.allclose(shared_iou[i], alone_iou[0], atol=1e-5)


def test_mask_prompts_in_a_batch(predictor):
    model = predictor.model
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(3, 1, 2, generator=generator) * 1000
    labels = torch.ones(3, 1, dtype=torch.int)
    masks_in = torch.randn(3, 1, 256, 256, generator=generator) * 5
    with torch.no_grad():
        sparse, dense = model.prompt_encoder((coords, labels), None, masks_in)
    batch_masks, batch_iou = _decode(model, predictor.features, sparse, dense)
    for i in range(3):
        alone_masks, alone_iou = _decode(
            model, predictor.features, sparse[i : i + 1], dense[i : i + 1]
        )
        assert torch.allclose(batch_masks[i], alone_masks[0], atol=1e-3)
        assert torch.allclose(batch_iou[i], alone_iou[0], atol=1e-5)


def test_many_prompt_decoder_tracks_the_image_tokens_exactly(predictor):
    """The low-rank image tokens equal the two-way transformer's, and so do IoUs and masks."""
    from tinysam.modeling.many_prompts import ManyPromptDecoder

    model = predictor.model
    generator = torch.Generator().manual_seed(2)
    coords = torch.rand(9, 2, 2, generator=generator) * 1000
    labels = torch.tensor([[1, 0]] * 9)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
        image_pe = model.prompt_encoder.get_dense_pe()
        dec = model.mask_decoder
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).expand(9, -1, -1)
        tokens = torch.cat([tokens, sparse], dim=1)
        hs, image_tokens = dec.transformer(predictor.features + dense[:1], image_pe, tokens)
        plain_masks, plain_iou = dec.predict_masks(predictor.features, image_pe, sparse, dense)

        many = ManyPromptDecoder(dec, predictor.features, image_pe, dense)
        iou, many_hs = many.decode(sparse)
        _, low_rank = many.state
        assert torch.allclose(low_rank.dense(), image_tokens, atol=1e-4)
        assert torch.allclose(many_hs, hs[:, : 1 + dec.num_mask_tokens], atol=1e-4)
        assert torch.allclose(iou, plain_iou, atol=1e-5)
        rows = torch.tensor([7, 2])
        assert torch.allclose(many.masks(rows), plain_masks[rows], atol=1e-3)
        assert many.masks(torch.tensor([], dtype=torch.long)).shape == (0, 4, 256, 256)


def test_many_prompt_path_with_boxes_and_single_mask(predictor):
    """Boxes (with and without points) and multimask_output=False take the many-prompt path
    (batch >= 8) and agree with the plain decoder."""
    from tinysam.predictor_base import DEFAULT_MANY_PROMPTS as MANY_PROMPTS

    model = predictor.model
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(10, 2, 2, generator=generator).sort(dim=1).values * 1000
    boxes = corners.reshape(10, 4)
    points = corners.mean(dim=1, keepdim=True)
    labels = torch.ones(10, 1, dtype=torch.int)
    assert len(boxes) >= MANY_PROMPTS
    for kwargs in (dict(boxes=boxes), dict(boxes=boxes, point_coords=points, point_labels=labels)):
        for multimask in (True, False):
            prompts = dict(point_coords=None, point_labels=None) | kwargs
            _, iou, low_res = predictor.predict_torch(
                **prompts, multimask_output=multimask, upscale=False
            )
            with torch.no_grad():
                pts = None if "point_coords" not in kwargs else (points, labels)
                sparse, dense = model.prompt_encoder(pts, boxes, None)
                plain_low_res, plain_iou = model.mask_decoder(
                    predictor.features,
                    model.prompt_encoder.get_dense_pe(),
                    sparse,
                    dense,
                    multimask_output=multimask,
                )
            assert iou.shape == plain_iou.shape == (10, 3 if multimask else 1)
            assert torch.allclose(iou, plain_iou, atol=1e-5)
            assert torch.allclose(low_res, plain_low_res, atol=1e-3)
