"""Whole models saved with ``torch.save(model)``, read without running anything they name.

Such files (the TinySAM authors' Q-TinySAM ``tinysam_w8a8.pth``, plain pickled SAM/TinySAM
modules passed around) are pickles of ``nn.Module`` objects. Unpickling them normally imports
and calls whatever the file names. Here the unpickler allows only torch's tensor, parameter and
storage rebuild helpers, ``collections.OrderedDict`` and ``builtins.set``; every class of a
module that the file names under ``torch.nn``, the authors' ``tinysam.modeling`` /
``modeling`` or ``quantization_layer.layers`` becomes an inert ``ModuleRecord`` holding the
module's ``__dict__`` (never the real class, never an import). Any other global is refused with
one line naming it.

``flatten`` turns the record tree into a state dict (parameters and persistent buffers by module
path) and, for the authors' ``InferQuant*`` layers, their quantizer settings
(``QuantizedLayerRecord``), checked: block counts that divide the weight, finite positive
intervals, bit widths.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Module classes may come from these (the authors' checkout puts ./tinysam on sys.path, so their
# model classes appear as tinysam.modeling.* or modeling.*).
MODULE_PREFIXES = ("torch.nn.modules.", "tinysam.modeling.", "modeling.")
MODULE_FILES = ("quantization_layer.layers",)
QUANTIZED_CLASSES = {
    "InferQuantLinear": "linear",
    "InferQuantLinearPost": "linear_post_gelu",
    "InferQuantConv2d": "conv",
    "InferQuantConvTranspose2d": "conv_transpose",
}


class PickledModuleError(ValueError):
    """A pickled model that holds something other than modules and tensors, or whose
    modules do not describe a model we can rebuild."""


class ModuleRecord:
    """What a pickled module left: its class's dotted name and its attributes. Inert: made
    and filled by the unpickler without running any of the module's code."""

    class_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass  # a module class "called" by the pickle: nothing to run

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        if not isinstance(state, dict):
            raise PickledModuleError(f"a {self.class_name} holds a state that is not a mapping")
        vars(self).update(state)

    def __repr__(self) -> str:
        return f"<record of {self.class_name}>"


def _allowed_functions() -> dict[tuple[str, str], object]:
    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): (
            torch._utils._rebuild_parameter_with_state
        ),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,
    }


def _is_module_class(module: str, name: str) -> bool:
    if not name.isidentifier() or name.startswith("_"):
        return False
    if module.startswith("torch.nn.modules."):
        found = getattr(torch.nn, name, None)  # torch.nn is imported already: no import here
        return isinstance(found, type) and issubclass(found, torch.nn.Module)
    return module.startswith(MODULE_PREFIXES[1:]) or module in MODULE_FILES


class _RecordingUnpickler(pickle.Unpickler):
    """``find_class`` that hands out allowed helpers and module stand-ins, nothing else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_functions()
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if _is_module_class(module, name):
            key = f"{module}.{name}"
            if key not in self._records:
                self._records[key] = type(name, (ModuleRecord,), {"class_name": key})
            return self._records[key]
        raise PickledModuleError(f"holds the global {module}.{name}, which is not allowed")


# torch.load(pickle_module=...) wants a module with Unpickler and load.
_PICKLE = types.ModuleType("tinysam_restricted_pickle")
_PICKLE.Unpickler = _RecordingUnpickler
_PICKLE.load = pickle.load
_PICKLE.__name__ = "tinysam_restricted_pickle"


def read_pickled_module(path: str | os.PathLike) -> ModuleRecord:
    """The record tree of a model saved with ``torch.save(model)``; nothing in the file runs."""
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except PickledModuleError as err:
        raise PickledModuleError(f"checkpoint {path} {err}; it will not be unpickled") from None
    except Exception as err:  # damaged bytes fail in many ways inside the unpickler
        raise PickledModuleError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(err).__name__})"
        ) from None
    if not isinstance(root, ModuleRecord):
        raise PickledModuleError(f"checkpoint {path} holds no pickled model")
    return root


@dataclass
class QuantizedLayerRecord:
    """One of the authors' ``InferQuant*`` layers: its kind and quantizer settings."""

    kind: str  # "linear", "linear_post_gelu", "conv", "conv_transpose"
    weight_bits: int
    act_bits: int
    w_interval: torch.Tensor
    a_interval: torch.Tensor
    n_V: int = 1  # weight row blocks (linear)
    n_H: int = 1  # weight column blocks (linear)
    n_a: int = 1  # input chunks of the last dimension (linear)
    a_bias: torch.Tensor | None = None  # the convolutions' input offset
    a_neg_interval: torch.Tensor | None = None  # post-GELU: the negative values' interval


@dataclass
class FlatModel:
    """A pickled model as tensors: the state dict and its quantized layers by path."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, QuantizedLayerRecord] = field(default_factory=dict)


def flatten(root: ModuleRecord, source: str) -> FlatModel:
    """Parameters and persistent buffers by dotted path (the authors' module names are the
    state-dict keys of our model), and every ``InferQuant*`` layer's settings, checked."""
    flat = FlatModel()
    stack = [("", root)]
    while stack:
        prefix, record = stack.pop()
        state = vars(record)
        parameters = _mapping(state.get("_parameters", {}), record, "_parameters", source)
        buffers = _mapping(state.get("_buffers", {}), record, "_buffers", source)
        non_persistent = state.get("_non_persistent_buffers_set", set())
        quant_kind = QUANTIZED_CLASSES.get(type(record).class_name.rsplit(".", 1)[-1])
        for name, tensor in parameters.items():
            if tensor is not None:
                flat.state_dict[prefix + name] = _tensor(tensor, prefix + name, source)
        for name, tensor in buffers.items():
            if tensor is None or name in non_persistent:
                continue
            if quant_kind is None:
                flat.state_dict[prefix + name] = _tensor(tensor, prefix + name, source)
        if quant_kind is not None:
            layer = prefix[:-1]
            flat.quantized[layer] = _quantized_layer(
                quant_kind, record, parameters, buffers, layer, source
            )
        children = _mapping(state.get("_modules", {}), record, "_modules", source)
        for name, child in reversed(list(children.items())):
            if child is None:
                continue
            if not isinstance(child, ModuleRecord):
                raise PickledModuleError(f"{source}: {prefix}{name} is not a module")
            stack.append((f"{prefix}{name}.", child))
    return flat


def _mapping(value, record: ModuleRecord, what: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise PickledModuleError(f"{source}: a {record.class_name}'s {what} is not a mapping")
    return value


def _tensor(value, name: str, source: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PickledModuleError(f"{source}: {name} is not a tensor")
    tensor = value.detach()
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise PickledModuleError(f"{source}: {name} holds NaN or infinite values")
    return tensor


def _quantized_layer(
    kind: str, record: ModuleRecord, parameters: dict, buffers: dict, layer: str, source: str
) -> QuantizedLayerRecord:
    where = f"{source}: {layer}"
    state = vars(record)
    if state.get("mode") != "quant_forward":
        raise PickledModuleError(f"{where} is in mode {state.get('mode')!r}, not quant_forward")
    weight = parameters.get("weight")
    if not isinstance(weight, torch.Tensor):
        raise PickledModuleError(f"{where} has no weight")
    return layer_record(kind, state.get("w_bit"), state.get("a_bit"), weight.shape, buffers, where)


def layer_record(
    kind: str, w_bit, a_bit, weight_shape, buffers: dict, where: str
) -> QuantizedLayerRecord:
    """An ``InferQuant*`` layer's settings from its bit widths and buffers (the authors'
    names: ``w_interval``, ``a_interval``, ``n_V``, ``n_H``, ``n_a``, ``a_bias``,
    ``a_neg_interval``), checked against its weight's shape. Also reads the converted form
    (``tinysam.quant.published.save_converted``), so both are checked alike."""
    bits = {}
    for key, value in (("w_bit", w_bit), ("a_bit", a_bit)):
        allowed = (2, 8) if key == "w_bit" else (2, 32)
        if not isinstance(value, int) or isinstance(value, bool):
            raise PickledModuleError(f"{where}: {key} is not a whole number")
        if not (allowed[0] <= value <= 8 or value == allowed[1] == 32):
            raise PickledModuleError(f"{where}: {key} {value} is not a supported bit width")
        bits[key] = value

    def interval(name: str) -> torch.Tensor:
        value = buffers.get(name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise PickledModuleError(f"{where} has no {name}")
        value = value.detach().float()
        if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
            raise PickledModuleError(f"{where}: {name} must hold finite positive intervals")
        return value

    def count(name: str) -> int:
        value = buffers.get(name)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise PickledModuleError(f"{where} has no {name}")
        number = int(value)
        if number < 1:
            raise PickledModuleError(f"{where}: {name} is {number}, not a positive count")
        return number

    q = QuantizedLayerRecord(
        kind, bits["w_bit"], bits["a_bit"], interval("w_interval"), interval("a_interval")
    )
    if kind.startswith("linear"):
        if len(weight_shape) != 2:
            raise PickledModuleError(f"{where}: a linear layer's weight is not a matrix")
        out_features, in_features = weight_shape
        q.n_V, q.n_H, q.n_a = count("n_V"), count("n_H"), count("n_a")
        if out_features % q.n_V or in_features % q.n_H or in_features % q.n_a:
            raise PickledModuleError(
                f"{where}: blocks n_V={q.n_V}, n_H={q.n_H}, n_a={q.n_a} do not "
                f"divide its {out_features}x{in_features} weight"
            )
        if tuple(q.w_interval.shape) != (q.n_V, 1, q.n_H, 1):
            raise PickledModuleError(
                f"{where}: w_interval has shape {tuple(q.w_interval.shape)}, not "
                f"({q.n_V}, 1, {q.n_H}, 1)"
            )
        if q.a_interval.numel() != q.n_a:
            raise PickledModuleError(f"{where}: a_interval does not hold n_a={q.n_a} values")
        q.a_interval = q.a_interval.reshape(q.n_a, 1)
        if kind == "linear_post_gelu":
            q.a_neg_interval = interval("a_neg_interval")
    else:
        try:
            torch.broadcast_shapes(q.w_interval.shape, tuple(weight_shape))
        except RuntimeError:
            raise PickledModuleError(
                f"{where}: w_interval of shape {tuple(q.w_interval.shape)} does not fit its "
                f"weight {tuple(weight_shape)}"
            ) from None
        if q.a_interval.numel() != 1:
            raise PickledModuleError(f"{where}: a_interval must be one value")
        a_bias = buffers.get("a_bias")
        if not isinstance(a_bias, torch.Tensor) or a_bias.numel() != 1:
            raise PickledModuleError(f"{where} has no a_bias")
        if not math.isfinite(float(a_bias)):
            raise PickledModuleError(f"{where}: a_bias is not finite")
        q.a_bias = a_bias.detach().float().reshape(())
        q.a_interval = q.a_interval.reshape(())
    return q


__all__ = [
    "FlatModel",
    "ModuleRecord",
    "PickledModuleError",
    "QuantizedLayerRecord",
    "flatten",
    "layer_record",
    "read_pickled_module",
]
