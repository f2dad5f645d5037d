"""The alternating grid search of the two scales of every ``O = A . B`` (docs/method.md §2).

Each side's candidates are ``linspace(theta_low, theta_high, n) * max|X| / 2^(b-1)``; the two
sides are searched alternately for ``rounds`` rounds (A first), each keeping the best scale
found so far, starting from min-max scales (``theta = 1``): the search can only improve on
min-max. Weights have one scale per output channel; since the distance sums over output
columns, every channel picks its own best candidate in the same pass. Deploy-mode output
scales of convolutions are a one-dimensional search of the same kind.

The distance is ``sum(g^2 * (O_q - O)^2)`` over the calibration samples (see ``calibrate``);
layers whose outputs got no gradient fall back to the plain squared error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .calibrate import LayerRecord
from .layers import QuantLayer, QuantMatMul
from .model import DEPLOY_OUTPUT_KINDS, quant_layers
from .quantizers import fake_quant, fake_quant_channels, twin_quant


@dataclass
class SearchConfig:
    theta_low: float = 0.01
    theta_high: float = 1.2
    candidates: int = 100
    rounds: int = 3
    twin: bool = True  # two-group quantizers for post-softmax and post-GELU inputs

    def __post_init__(self) -> None:
        if not 0 < self.theta_low < self.theta_high:
            raise ValueError("need 0 < theta_low < theta_high")
        if self.candidates < 1 or self.rounds < 1:
            raise ValueError("candidates and rounds must be at least 1")

    def thetas(self) -> torch.Tensor:
        return torch.linspace(self.theta_low, self.theta_high, self.candidates)


@dataclass
class LayerResult:
    """One layer's search outcome; distances are the search objective on the calibration
    samples, ``rel_error`` the relative output error ||O_q - O|| / ||O||."""

    name: str
    kind: str
    twin: str
    samples: int
    minmax_distance: float
    searched_distance: float
    minmax_rel_error: float
    searched_rel_error: float
    weighted: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _act(x: torch.Tensor, scale: torch.Tensor | float, twin: str, bits: int) -> torch.Tensor:
    scale = float(scale)
    if twin == "none":
        return fake_quant(x, scale, bits)
    return twin_quant(x, scale, twin, bits)


class _Objective:
    """sum(w * (O_q - O)^2), per output column for weight layers."""

    def __init__(self, out: torch.Tensor, grad: torch.Tensor) -> None:
        self.out = out
        weights = grad.square()
        self.weighted = bool(weights.sum() > 0)
        self.weights = weights if self.weighted else torch.ones_like(out)
        self.norm = float(out.square().sum().sqrt()) or 1.0

    def per_column(self, approx: torch.Tensor) -> torch.Tensor:
        err = (approx - self.out).square_().mul_(self.weights)
        return err.reshape(-1, err.shape[-1]).sum(0)

    def rel_error(self, approx: torch.Tensor) -> float:
        return float((approx - self.out).square().sum().sqrt()) / self.norm


def _search_weight_layer(
    name: str, layer: QuantLayer, record: LayerRecord, config: SearchConfig
) -> LayerResult:
    data = record.tensors()
    a, objective = data["a"], _Objective(data["out"], data["grad"])
    weight = layer.weight.detach().float().cpu()
    bits_w, bits_a = layer.weight_quant.bits, layer.input_quant.bits
    axis = layer.weight_quant.axis
    channel = layer.column_channel()
    channels = layer.weight_quant.scale.numel()
    bias = 0.0 if layer.bias is None else layer.bias.detach().float().cpu()[channel]
    twin = "gelu" if (config.twin and record.post_gelu) else "none"
    thetas = config.thetas()

    reduce_dims = [d for d in range(weight.ndim) if d != axis]
    w_max = weight.abs().amax(dim=reduce_dims).clamp_min(1e-12)
    a_max = max(record.a_absmax, 1e-12)
    step_a, step_w = a_max / 2 ** (bits_a - 1), w_max / 2 ** (bits_w - 1)

    def output(a_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        w_q = fake_quant_channels(weight, w_scale, axis, bits_w)
        return torch.einsum("rgk,gok->rgo", a_q, layer.matrix(w_q)).flatten(1) + bias

    def per_channel(col: torch.Tensor) -> torch.Tensor:
        return torch.zeros(channels).index_add_(0, channel, col)

    s_a, s_w = torch.tensor(step_a), step_w.clone()
    a_q = _act(a, s_a, twin, bits_a)
    first = output(a_q, s_w)
    minmax = (float(objective.per_column(first).sum()), objective.rel_error(first))
    best_w = per_channel(objective.per_column(first))
    best = float(best_w.sum())
    for _ in range(config.rounds):
        for theta in thetas:  # A: one scale for the tensor
            cand_q = _act(a, theta * step_a, twin, bits_a)
            dist = float(objective.per_column(output(cand_q, s_w)).sum())
            if dist < best:
                best, s_a, a_q = dist, theta * step_a, cand_q
        best_w = per_channel(objective.per_column(output(a_q, s_w)))
        for theta in thetas:  # B: every channel keeps its own best
            cand = theta * step_w
            dist = per_channel(objective.per_column(output(a_q, cand)))
            better = dist < best_w
            s_w = torch.where(better, cand, s_w)
            best_w = torch.where(better, dist, best_w)
        best = float(best_w.sum())
    final = output(a_q, s_w)
    layer.input_quant.twin = twin
    layer.input_quant.set_scale(s_a)
    layer.weight_quant.set_scale(s_w)
    if layer.kind in DEPLOY_OUTPUT_KINDS:
        layer.output_quant.set_scale(_search_output(data["out"], objective, bits_a, config))
    return _result(name, layer.kind, twin, len(a), minmax, final, objective)


def _result(
    name: str,
    kind: str,
    twin: str,
    samples: int,
    minmax: tuple[float, float],
    final: torch.Tensor,
    objective: _Objective,
) -> LayerResult:
    """The report row of a layer: min-max (distance, error) against the searched output."""
    searched = float(objective.per_column(final).sum())
    return LayerResult(
        name,
        kind,
        twin,
        samples,
        minmax[0],
        searched,
        minmax[1],
        objective.rel_error(final),
        objective.weighted,
    )


def _search_output(
    out: torch.Tensor, objective: _Objective, bits: int, config: SearchConfig
) -> float:
    step = max(float(out.abs().max()), 1e-12) / 2 ** (bits - 1)
    best_scale, best = step, float(objective.per_column(_act(out, step, "none", bits)).sum())
    for theta in config.thetas():
        dist = float(objective.per_column(_act(out, theta * step, "none", bits)).sum())
        if dist < best:
            best, best_scale = dist, float(theta) * step
    return best_scale


def _search_matmul(
    name: str, layer: QuantMatMul, record: LayerRecord, config: SearchConfig
) -> LayerResult:
    data = record.tensors()
    a, b, objective = data["a"], data["b"], _Objective(data["out"], data["grad"])
    bits_a, bits_b = layer.a_quant.bits, layer.b_quant.bits
    twin = layer.a_quant.twin if config.twin else "none"
    step_a = max(record.a_absmax, 1e-12) / 2 ** (bits_a - 1)
    step_b = max(record.b_absmax, 1e-12) / 2 ** (bits_b - 1)
    thetas = config.thetas()

    def distance(a_q: torch.Tensor, b_q: torch.Tensor) -> float:
        return float(objective.per_column(a_q @ b_q).sum())

    s_a, s_b = step_a, step_b
    a_q, b_q = _act(a, s_a, twin, bits_a), _act(b, s_b, "none", bits_b)
    best = distance(a_q, b_q)
    minmax = (best, objective.rel_error(a_q @ b_q))
    for _ in range(config.rounds):
        for theta in thetas:
            cand = _act(a, float(theta) * step_a, twin, bits_a)
            dist = distance(cand, b_q)
            if dist < best:
                best, s_a, a_q = dist, float(theta) * step_a, cand
        for theta in thetas:
            cand = _act(b, float(theta) * step_b, "none", bits_b)
            dist = distance(a_q, cand)
            if dist < best:
                best, s_b, b_q = dist, float(theta) * step_b, cand
    layer.a_quant.twin = twin
    layer.a_quant.set_scale(s_a)
    layer.b_quant.set_scale(s_b)
    return _result(name, layer.kind, twin, len(a), minmax, a_q @ b_q, objective)


def search_layer(
    name: str, layer: torch.nn.Module, record: LayerRecord, config: SearchConfig
) -> LayerResult:
    """Search and set one layer's scales from its calibration record."""
    with torch.no_grad():
        if isinstance(layer, QuantMatMul):
            return _search_matmul(name, layer, record, config)
        return _search_weight_layer(name, layer, record, config)


def search_scales(
    model: torch.nn.Module,
    records: dict[str, LayerRecord],
    config: SearchConfig | None = None,
    progress=None,
) -> list[LayerResult]:
    """Search every recorded layer of a prepared model; layers calibration never reached (the
    TinyViT classification head) stay float."""
    config = config or SearchConfig()
    layers = quant_layers(model)
    names = [n for n in layers if n in records]
    results = []
    for name in progress(names) if progress else names:
        results.append(search_layer(name, layers[name], records[name], config))
    return results
