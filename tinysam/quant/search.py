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

    def per_column_batched(self, approx: torch.Tensor) -> torch.Tensor:
        """``per_column`` of candidates x (out's shape): candidates x columns."""
        err = (approx - self.out).square_().mul_(self.weights)
        return err.reshape(len(approx), -1, err.shape[-1]).sum(1)

    def rel_error(self, approx: torch.Tensor) -> float:
        return float((approx - self.out).square().sum().sqrt()) / self.norm


# Candidates are scored together, in chunks of about this many output values.
CHUNK_VALUES = 1 << 22
SMALL_INNER = 32


def _first_min(dist: torch.Tensor, best: float) -> int | None:
    """The candidate the sequential grid search keeps: the first with the least distance,
    if that is below ``best``."""
    index = int(torch.argmin(dist))
    return index if float(dist[index]) < best else None


def _grouped_product(layer: QuantLayer):
    """``a`` (... x R x G x K) times the weight matrix (G x O_g x K) as ... x R x (G * O_g):
    a plain matrix product for one group, a multiply-add for small groups (depthwise)."""

    def product(a: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        groups, _, inner = matrix.shape
        if groups == 1:
            return a[..., 0, :] @ matrix[0].T
        if inner <= SMALL_INNER:  # depthwise: a multiply-add beats many tiny products
            return (a[..., None, :] * matrix).sum(-1).flatten(-2)
        return torch.einsum("...gk,gok->...go", a, matrix).flatten(-2)

    return product


def _search_weight_layer(
    name: str, layer: QuantLayer, record: LayerRecord, config: SearchConfig
) -> LayerResult:
    """Alternate the input's scale (one per tensor) and the weight's (one per channel).

    The work is shared where the result allows: the quantized side that a half-round holds
    fixed is made once, and the candidates of a half-round are scored together in a few large
    products rather than one by one; the choice is the sequential search's (the first best).
    """
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
    product = _grouped_product(layer)
    rows, columns = objective.out.shape

    reduce_dims = [d for d in range(weight.ndim) if d != axis]
    w_max = weight.abs().amax(dim=reduce_dims).clamp_min(1e-12)
    a_max = max(record.a_absmax, 1e-12)
    step_a, step_w = a_max / 2 ** (bits_a - 1), w_max / 2 ** (bits_w - 1)

    def quant_matrix(w_scale: torch.Tensor) -> torch.Tensor:
        return layer.matrix(fake_quant_channels(weight, w_scale, axis, bits_w))

    def per_channel(col: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*col.shape[:-1], channels).index_add_(-1, channel, col)

    s_a, s_w = torch.tensor(step_a), step_w.clone()
    a_q = _act(a, s_a, twin, bits_a)
    first = product(a_q, quant_matrix(s_w)) + bias
    minmax = (float(objective.per_column(first).sum()), objective.rel_error(first))
    best = minmax[0]
    chunk = max(1, CHUNK_VALUES // (rows * columns))
    for _ in range(config.rounds):
        before = (float(s_a), s_w.clone())
        # A: one scale for the tensor; every candidate against the same quantized weight.
        matrix = quant_matrix(s_w)
        dists = []
        for part in thetas.split(chunk):
            cands = torch.stack([_act(a, float(t) * step_a, twin, bits_a) for t in part])
            approx = product(cands, matrix) + bias
            dists.append(objective.per_column_batched(approx).sum(-1))
        pick = _first_min(torch.cat(dists), best)
        if pick is not None:
            s_a = thetas[pick] * step_a
            a_q = _act(a, s_a, twin, bits_a)
        # B: every channel keeps its own best; all candidates' columns in one product.
        best_w = per_channel(objective.per_column(product(a_q, quant_matrix(s_w)) + bias))
        depthwise = _DepthwiseErrors(a_q, objective, bias) if _is_depthwise(layer) else None
        for part in thetas.split(chunk):
            if depthwise is not None:
                matrices = torch.stack([quant_matrix(t * step_w) for t in part])
                dist = per_channel(depthwise(matrices[:, :, 0, :]))
            else:
                matrices = torch.cat([quant_matrix(t * step_w) for t in part], dim=1)
                approx = product(a_q, matrices)  # R x (candidates x columns), grouped per G
                approx = _split_candidates(approx, layer, len(part), columns) + bias
                dist = per_channel(objective.per_column_batched(approx))  # candidates x chans
            for theta, row in zip(part, dist):  # in order: the first best is kept
                better = row < best_w
                s_w = torch.where(better, theta * step_w, s_w)
                best_w = torch.where(better, row, best_w)
        best = float(best_w.sum())
        if float(s_a) == before[0] and torch.equal(s_w, before[1]):
            break  # a round that moved nothing: the next ones would repeat it
    final = product(a_q, quant_matrix(s_w)) + bias
    layer.input_quant.twin = twin
    layer.input_quant.set_scale(s_a)
    layer.weight_quant.set_scale(s_w)
    if layer.kind in DEPLOY_OUTPUT_KINDS:
        layer.output_quant.set_scale(_search_output(data["out"], objective, bits_a, config))
    return _result(name, layer.kind, twin, len(a), minmax, final, objective)


def _is_depthwise(layer: QuantLayer) -> bool:
    """One output per group and a small kernel: each output column sees its own few inputs."""
    groups, per_group, inner = layer.matrix(layer.weight).shape
    return groups > 1 and per_group == 1 and inner <= SMALL_INNER


class _DepthwiseErrors:
    """The weighted error of a depthwise layer's columns for candidate weights, from each
    column's K x K second moments: sum_r g^2 (a_r . w + bias - out_r)^2 expands to
    w^T M w + 2 w . v + c, so a candidate costs K^2 per column instead of a pass over the
    samples (float64: the error is a small difference of large terms)."""

    def __init__(self, a_q: torch.Tensor, objective: _Objective, bias) -> None:
        a = a_q.double()  # R x G x K
        weights = objective.weights.double()  # R x G
        residual = (torch.as_tensor(bias).double() - objective.out.double()) * weights
        self.moments = torch.einsum("rg,rgk,rgl->gkl", weights, a, a)
        self.linear = torch.einsum("rg,rgk->gk", residual, a)
        self.constant = (residual * (torch.as_tensor(bias).double() - objective.out)).sum(0)

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """Errors per column (candidates x G) of candidate weights (candidates x G x K)."""
        w = weights.double()
        quadratic = torch.einsum("ngk,gkl,ngl->ng", w, self.moments, w)
        return (quadratic + 2 * (w * self.linear).sum(-1) + self.constant).float()


def _split_candidates(
    approx: torch.Tensor, layer: QuantLayer, candidates: int, columns: int
) -> torch.Tensor:
    """R x (candidate-stacked weight matrices' columns) -> candidates x R x columns.

    The matrices were stacked along the per-group output axis, so within every group the
    candidates come first."""
    groups = layer.matrix(layer.weight).shape[0]
    per_group = columns // groups
    rows = approx.shape[0]
    approx = approx.view(rows, groups, candidates, per_group)
    return approx.permute(2, 0, 1, 3).reshape(candidates, rows, columns)


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

    def distances(side, twin_kind: str, bits: int, step: float, fixed, a_side: bool):
        """Every candidate scale of one side against the other, quantized, side fixed."""
        chunk = max(1, CHUNK_VALUES // max(objective.out.numel(), side.numel()))
        out = []
        for part in thetas.split(chunk):
            cands = torch.stack([_act(side, float(t) * step, twin_kind, bits) for t in part])
            approx = cands @ fixed if a_side else fixed @ cands
            out.append(objective.per_column_batched(approx).sum(-1))
        return torch.cat(out)

    s_a, s_b = step_a, step_b
    a_q, b_q = _act(a, s_a, twin, bits_a), _act(b, s_b, "none", bits_b)
    best = float(objective.per_column(a_q @ b_q).sum())
    minmax = (best, objective.rel_error(a_q @ b_q))
    for _ in range(config.rounds):
        before = (s_a, s_b)
        dist = distances(a, twin, bits_a, step_a, b_q, a_side=True)
        pick = _first_min(dist, best)
        if pick is not None:
            best, s_a = float(dist[pick]), float(thetas[pick]) * step_a
            a_q = _act(a, s_a, twin, bits_a)
        dist = distances(b, "none", bits_b, step_b, a_q, a_side=False)
        pick = _first_min(dist, best)
        if pick is not None:
            best, s_b = float(dist[pick]), float(thetas[pick]) * step_b
            b_q = _act(b, s_b, "none", bits_b)
        if (s_a, s_b) == before:
            break  # a round that moved nothing: the next ones would repeat it
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
