"""Parameters, FLOPs and latency of the image encoder and the mask decoder, per backend.

FLOPs are counted by ``torch.utils.flop_counter`` on one 1024x1024 image and one point prompt
(a multiply-add counts as two FLOPs; the paper's MACs are half). Latency is the median of
``repeats`` runs after a warm-up, through the predictors users call (``set_image`` for the
encoder, ``predict`` with one point for the decoder), so pre- and post-processing are included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..build import count_parameters
from ..perf import interleaved_medians


@dataclass
class ModelCost:
    encoder_parameters: int
    decoder_parameters: int
    prompt_encoder_parameters: int
    encoder_flops: int
    decoder_flops: int


def count_costs(sam) -> ModelCost:
    """Parameters and FLOPs of one image embedding and one one-point decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(sam.parameters()).device
    size = sam.image_encoder.img_size
    with torch.no_grad(), FlopCounterMode(display=False) as encoder_counter:
        embedding = sam.image_encoder(torch.zeros(1, 3, size, size, device=device))
    # With autograd on: under no_grad, views of parameters (the no-mask embedding) keep
    # requires_grad without a grad_fn, which FlopCounterMode's module tracker rejects.
    point = (torch.tensor([[[size / 2, size / 2]]], device=device), torch.ones(1, 1))
    with FlopCounterMode(display=False) as decoder_counter:
        sparse, dense = sam.prompt_encoder(points=point, boxes=None, masks=None)
        sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    return ModelCost(
        count_parameters(sam.image_encoder),
        count_parameters(sam.mask_decoder),
        count_parameters(sam.prompt_encoder),
        encoder_counter.get_total_flops(),
        decoder_counter.get_total_flops(),
    )


@dataclass
class Latency:
    backend: str
    encoder_ms: float
    decoder_ms: float
    precision: str = "fp32"  # what the encoder computed in (its row's ceiling)


def measure_latency(
    predictors: dict, image: np.ndarray, repeats: int = 5, precisions: dict | None = None
) -> list[Latency]:
    """Encoder and one-point decoder medians per predictor, runs of the backends alternating
    so that a noisy machine slows them alike; ``precisions`` names each one's (fp32)."""
    precisions = precisions or {}
    h, w = image.shape[:2]
    point = np.array([[w / 2, h / 2]], np.float32)
    label = np.ones(1, np.float32)
    for predictor in predictors.values():  # predict needs an image
        predictor.set_image(image)
    encoder = interleaved_medians(
        {name: (lambda p=p: p.set_image(image)) for name, p in predictors.items()}, repeats
    )
    decoder = interleaved_medians(
        {
            name: (lambda p=p: p.predict(point_coords=point, point_labels=label))
            for name, p in predictors.items()
        },
        repeats,
    )
    return [
        Latency(name, encoder[name] * 1e3, decoder[name] * 1e3, precisions.get(name, "fp32"))
        for name in predictors
    ]


def bench_table(
    cost: ModelCost, latencies: list[Latency], fp32_limit: float | None = None,
    ceilings: dict[str, float | None] | None = None,
) -> str:  # fmt: skip
    """The table; with ``fp32_limit`` (GFLOP/s, ``limits.measure_limits``), each encoder row
    also says how close it came: its FLOPs over the limit, divided by its time. ``ceilings``
    (``MachineLimits.ceiling`` per precision) rates each row against its own precision's
    GEMM rate instead."""
    lines = [
        f"parameters: image encoder {cost.encoder_parameters / 1e6:.2f} M, "
        f"prompt encoder {cost.prompt_encoder_parameters / 1e3:.1f} K, "
        f"mask decoder {cost.decoder_parameters / 1e6:.2f} M",
        f"FLOPs: image encoder {cost.encoder_flops / 1e9:.1f} G "
        f"({cost.encoder_flops / 2e9:.1f} G MACs), one-point decode "
        f"{cost.decoder_flops / 1e9:.2f} G",
        "",
    ]
    if fp32_limit is None:
        lines += ["| backend | encoder ms | decoder ms (one point) |", "|---|---|---|"]
        lines += [f"| {r.backend} | {r.encoder_ms:.1f} | {r.decoder_ms:.1f} |" for r in latencies]
        return "\n".join(lines) + "\n"
    from .limits import percent_of_limit

    if ceilings is not None:
        lines += [
            "| backend | precision | encoder ms | encoder % of its precision's GEMM limit | "
            "decoder ms (one point) |",
            "|---|---|---|---|---|",
        ]
        for r in latencies:
            limit = ceilings.get(r.precision)
            share = "n/a" if not limit else (
                f"{percent_of_limit(cost.encoder_flops, r.encoder_ms / 1e3, limit):.0f}%"
            )  # fmt: skip
            lines.append(
                f"| {r.backend} | {r.precision} | {r.encoder_ms:.1f} | {share} | "
                f"{r.decoder_ms:.1f} |"
            )
        return "\n".join(lines) + "\n"

    ideal_ms = cost.encoder_flops / (fp32_limit * 1e9) * 1e3
    lines += [
        f"encoder ideal at the best fp32 GEMM rate ({fp32_limit:.1f} GFLOP/s): {ideal_ms:.1f} ms",
        "",
        "| backend | encoder ms | encoder % of fp32 limit | decoder ms (one point) |",
        "|---|---|---|---|",
    ]
    for r in latencies:
        share = percent_of_limit(cost.encoder_flops, r.encoder_ms / 1e3, fp32_limit)
        lines.append(f"| {r.backend} | {r.encoder_ms:.1f} | {share:.0f}% | {r.decoder_ms:.1f} |")
    return "\n".join(lines) + "\n"
