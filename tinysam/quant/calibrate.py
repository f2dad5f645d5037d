"""Calibration data for the scale search: what every quantized layer sees in the float model,
and how much the task loss cares about each of its outputs.

One forward and one backward pass per calibration image, all layers at once (every layer sees
float inputs, as in PTQ4ViT's parallel calibration), taken a piece at a time to bound memory:
the decoder a few prompts at a time, the encoder stage by stage (recomputed from the
activations between stages). Each layer keeps a random sample of its
output positions: the inputs that make them (rows of the grouped matrix product), the float
outputs, and the gradients of the task loss there.

Hessian-guided distance: for the task loss ``L = KL(masks) + KL(IoUs)`` between the quantized
and the float model, the gradient vanishes at the float model, and the Hessian w.r.t. a layer's
output is approximated by its diagonal Fisher information: squared gradients of the float
model's log-likelihood of outputs *sampled from the float model itself* (each mask pixel a
Bernoulli variable with probability sigmoid(logit), averaged over the pixels of a mask; each
IoU prediction a Bernoulli probability, clipped to [0.001, 0.999]). The search then minimises
``sum(g^2 * (O_quantized - O)^2)`` per layer.

Decoder prompts: the everything mode's point grid (``prompts_per_image`` points drawn from a
32x32 grid over the image, one positive point each) and, in a second decoder pass, boxes around
the float model's answers to those points (the paper's COCO protocol prompts with boxes, and
the decoder reacts to boxes differently); all four mask outputs of both enter the loss. Any
folder of images calibrates; no annotations are needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..perf import bounded_heap
from ..transforms import ResizeLongestSide
from .layers import QuantMatMul, is_post_gelu
from .model import quant_layers

GRID_SIDE = 32
IOU_CLIP = 1e-3
# Decoder prompts per forward/backward pass in calibration (bounds the graph's memory).
PROMPT_GROUP = 4


@dataclass
class LayerRecord:
    """Samples of one layer's float computation, gathered over the calibration images.

    Weight layers: ``a`` R x G x K input rows, ``out``/``grad`` R x O. Products: ``a`` S x n x d,
    ``b`` S x d x m, ``out``/``grad`` S x n x m (sampled slices, rows and columns).
    """

    kind: str
    a: list[torch.Tensor] = field(default_factory=list)
    b: list[torch.Tensor] = field(default_factory=list)
    out: list[torch.Tensor] = field(default_factory=list)
    grad: dict[int, torch.Tensor] = field(default_factory=dict)
    a_absmax: float = 0.0
    b_absmax: float = 0.0
    out_absmax: float = 0.0
    post_gelu: bool = False
    calls: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Samples joined over calls; gradients missing for a call (an output the loss does not
        reach) count as zeros."""
        out = torch.cat(self.out)
        grads = [self.grad.get(i, torch.zeros_like(o)) for i, o in enumerate(self.out)]
        joined = {"a": torch.cat(self.a), "out": out, "grad": torch.cat(grads)}
        if self.b:
            joined["b"] = torch.cat(self.b)
        return joined


class Recorder:
    """Installed as every quantized layer's ``recorder`` while the float model runs."""

    def __init__(self, names: dict[nn.Module, str], rows: int, slices: int, seed: int) -> None:
        self.names = names
        self.rows = rows
        self.slices = slices
        self.generator = torch.Generator().manual_seed(seed)
        self.records: dict[str, LayerRecord] = {}

    def _sample(self, n: int, k: int) -> torch.Tensor:
        if n <= k:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[:k].sort().values

    def _record(self, layer: nn.Module) -> tuple[LayerRecord, int]:
        name = self.names[layer]
        record = self.records.setdefault(name, LayerRecord(layer.kind))
        call = record.calls
        record.calls += 1
        return record, call

    def _keep_grad(self, record: LayerRecord, call: int, out: torch.Tensor, pick) -> None:
        if out.requires_grad:

            def hook(grad: torch.Tensor) -> None:
                record.grad[call] = pick(grad).detach().float().cpu()

            out.register_hook(hook)

    def __call__(self, layer: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, QuantMatMul):
            return self._matmul(layer, *inputs)
        (x,) = inputs
        record, call = self._record(layer)
        out = layer.float_forward(x)
        idx = self._sample(layer.num_positions(x), self.rows).to(x.device)
        with torch.no_grad():
            record.a.append(layer.input_rows(x, idx).detach().float().cpu())
            record.out.append(layer.output_rows(out, idx).detach().float().cpu())
            record.a_absmax = max(record.a_absmax, float(x.detach().abs().max()))
            record.out_absmax = max(record.out_absmax, float(out.detach().abs().max()))
        record.post_gelu = record.post_gelu or is_post_gelu(x)
        self._keep_grad(record, call, out, lambda g: layer.output_rows(g, idx))
        return out

    def _matmul(self, layer: QuantMatMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        record, call = self._record(layer)
        out = a @ b
        n, d, m = a.shape[-2], a.shape[-1], b.shape[-1]
        a3, b3 = a.reshape(-1, n, d), b.reshape(-1, d, m)
        s = self._sample(a3.shape[0], self.slices).to(a.device)
        r = self._sample(n, self.rows).to(a.device)
        c = self._sample(m, self.rows).to(a.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, n, m)[s][:, r][:, :, c]

        with torch.no_grad():
            record.a.append(a3[s][:, r].detach().float().cpu())
            record.b.append(b3[s][:, :, c].detach().float().cpu())
            record.out.append(pick(out).detach().float().cpu())
            record.a_absmax = max(record.a_absmax, float(a.detach().abs().max()))
            record.b_absmax = max(record.b_absmax, float(b.detach().abs().max()))
        self._keep_grad(record, call, out, pick)
        return out


def grid_prompts(size: tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` points of the everything grid over an image of ``size`` (H, W) in the resized
    frame, as count x 1 x 2 (x, y)."""
    h, w = size
    cells = (torch.arange(GRID_SIDE) + 0.5) / GRID_SIDE
    ys, xs = torch.meshgrid(cells * h, cells * w, indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    pick = torch.randperm(len(grid), generator=generator)[: min(count, len(grid))]
    return grid[pick][:, None, :]


def fisher_loss(masks: torch.Tensor, iou: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Negative log-likelihood of outputs sampled from the model's own predictions; its squared
    gradients estimate the diagonal Fisher information (the KL task loss's Hessian)."""
    with torch.no_grad():
        target = torch.bernoulli(torch.sigmoid(masks.float()), generator=generator)
        p = iou.float().clamp(IOU_CLIP, 1 - IOU_CLIP)
        iou_target = torch.bernoulli(p, generator=generator)
        # d/dp of -log Bernoulli(y; p), applied straight through the clip
        iou_grad = (1 - iou_target) / (1 - p) - iou_target / p
    pixels = masks.shape[-1] * masks.shape[-2]
    mask_loss = F.binary_cross_entropy_with_logits(masks, target, reduction="sum") / pixels
    return mask_loss + (iou * iou_grad).sum()


def _decode(model: nn.Module, embedding: torch.Tensor, points=None, boxes=None):
    """All four masks and IoUs, with the prompt tokens as leaves that need gradients (so the
    decoder's token-only layers get gradients too)."""
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
    return model.mask_decoder.predict_masks(
        embedding, model.prompt_encoder.get_dense_pe(), sparse.detach().requires_grad_(), dense
    )


def answer_boxes(masks: torch.Tensor, iou: torch.Tensor, image_size: int) -> torch.Tensor:
    """XYXY boxes (in the encoder's frame) around the masks one-point prompts are answered
    with (the best multimask output by predicted IoU); an empty answer gets the whole frame."""
    with torch.no_grad():
        best = iou[:, 1:].argmax(dim=1) + 1
        chosen = masks[torch.arange(len(best)), best] > 0
        scale = image_size / chosen.shape[-1]  # low-res logits are 4x below the input
        boxes = []
        for mask in chosen:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs) == 0:
                boxes.append(torch.tensor([0.0, 0.0, image_size, image_size]))
            else:
                box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                boxes.append(box.float() * scale)
        return torch.stack(boxes).to(masks.device)


def encoder_input(model: nn.Module, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB uint8 image as the encoder's normalised, padded input (as SamPredictor does)."""
    transform = ResizeLongestSide(model.image_encoder.img_size)
    resized = transform.apply_image(image)
    tensor = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None].float()
    return model.preprocess(tensor), tuple(resized.shape[:2])


def _stage_boundaries(encoder: nn.Module, x: torch.Tensor, layers: dict) -> list[torch.Tensor]:
    """The encoder's input and each stage's output, computed without a graph or recording."""
    recorders = {name: layer.recorder for name, layer in layers.items()}
    for layer in layers.values():
        layer.recorder = None  # uncalibrated quantizers are inactive: the float model
    try:
        boundaries = [x]
        with torch.no_grad():
            for stage in encoder.stages():
                boundaries.append(stage(boundaries[-1]))
    finally:
        for name, layer in layers.items():
            layer.recorder = recorders[name]
    return boundaries


def _decoder_gradient(model, embedding, size, prompts, generator, recorder) -> torch.Tensor:
    """Record the decoder on grid points, then boxes around its answers, a few prompts at a
    time (each group's graph freed by its backward pass); the loss's gradient with respect to
    the embedding, summed over the groups."""
    leaf = embedding.detach().requires_grad_()
    points = grid_prompts(size, prompts, generator).to(model.device)
    groups = points.split(PROMPT_GROUP)
    rows, slices = recorder.rows, recorder.slices
    recorder.rows = max(1, -(-rows // len(groups)))  # the image's sample, shared out
    recorder.slices = max(1, -(-slices // len(groups)))
    try:
        for group in groups:
            with torch.enable_grad():
                labels = torch.ones(group.shape[:2], dtype=torch.int, device=model.device)
                masks, iou = _decode(model, leaf, points=(group, labels))
                boxes = answer_boxes(masks, iou, model.image_encoder.img_size)
                box_masks, box_iou = _decode(model, leaf, boxes=boxes)
                loss = fisher_loss(masks, iou, generator)
                loss = loss + fisher_loss(box_masks, box_iou, generator)
                loss.backward()
    finally:
        recorder.rows, recorder.slices = rows, slices
    return leaf.grad


def collect(
    model: nn.Module,
    images: Iterable[np.ndarray],
    prompts_per_image: int = 16,
    rows: int = 512,
    slices: int = 4,
    seed: int = 0,
    progress=None,
) -> dict[str, LayerRecord]:
    """Run the float model (quantizers bypassed) on each image with grid prompts and record
    every quantized layer. ``progress`` wraps the image iterable (e.g. tqdm)."""
    layers = quant_layers(model)
    recorder = Recorder({m: n for n, m in layers.items()}, rows, slices, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    for layer in layers.values():
        layer.recorder = recorder
    try:
        with bounded_heap():  # see tinysam.perf: the graphs come and go per image
            for image in progress(images) if progress else images:
                x, size = encoder_input(model, image)
                # The encoder runs once without a graph, keeping only the activations
                # between its stages; each stage is then recomputed, recorded and
                # back-propagated alone, last first: one stage's graph in memory at a time.
                boundaries = _stage_boundaries(model.image_encoder, x, layers)
                grad = _decoder_gradient(
                    model, boundaries[-1], size, prompts_per_image, generator, recorder
                )
                stages = model.image_encoder.stages()
                for stage, inputs in zip(reversed(stages), reversed(boundaries[:-1])):
                    inputs = inputs.detach().requires_grad_()
                    with torch.enable_grad():
                        stage(inputs).backward(grad)
                    grad = inputs.grad
                del boundaries, grad
    finally:
        for layer in layers.values():
            layer.recorder = None
        for p in params:
            p.requires_grad_(True)
    return recorder.records
