"""Quantized models on disk, as tensors and JSON (never pickled modules).

A directory holds ``quantized.pt``, the prepared model's state dict with every calibrated
weight stored as int8 (its per-channel scales beside it as ``<layer>.weight_quant.scale``) and
the activation scales as buffers, and ``quant.json``: model type, bit widths, every
quantizer's role, twin kind and scale in readable form, and how it was calibrated. The JSON is
written last, so a directory with one holds a complete model. Loading rebuilds the
architecture, prepares it, dequantizes the weights and loads strictly with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..build import build_sam_model, small_student
from ..checkpoint import MODEL_TYPES, CheckpointError, load_strict, read_state_dict
from ..checkpoint import QUANT_CONFIG_FILE as CONFIG_FILE
from ..checkpoint import QUANT_WEIGHTS_FILE as WEIGHTS_FILE
from ..formats import FormatError, field, require
from ..io import atomic_write
from ..modeling import Sam
from .layers import QuantLayer
from .model import prepare, quant_layers, quantizers
from .quantizers import TWIN_KINDS, qrange

FORMAT = "tinysam-quant"
FORMAT_VERSION = 1
# Version 2: a converted Q-TinySAM (scheme "published", tinysam.quant.published), which
# older readers could not rebuild.
PUBLISHED_FORMAT_VERSION = 2
# ``tinysam distill demo``'s student (tinysam.build.small_student) at its image size,
# which quant.json then records: Q-TinySAM of the demo, in minutes.
SMALL = "small"
QUANTIZABLE = (*MODEL_TYPES, SMALL)


def _weight_shape(scale: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * weight.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def describe_layers(model: Sam) -> dict:
    """Every quantizer's role, twin kind and scale (weights: count and range of scales)."""
    layers = {}
    for name, layer in quant_layers(model).items():
        entry = {"kind": layer.kind}
        for role, quantizer in quantizers(layer).items():
            if not quantizer.calibrated:
                continue
            if role == "weight":
                scale = quantizer.scale
                entry[role] = {
                    "bits": quantizer.bits,
                    "axis": quantizer.axis,
                    "channels": scale.numel(),
                    "scale_min": float(scale.min()),
                    "scale_max": float(scale.max()),
                }
            else:
                entry[role] = {
                    "bits": quantizer.bits,
                    "twin": quantizer.twin,
                    "scale": quantizer.value,
                }
        layers[name] = entry
    return layers


def save_quantized(model: Sam, out_dir: str | os.PathLike, model_type: str, **info) -> Path:
    """Write ``quantized.pt`` and ``quant.json`` to ``out_dir``; ``info`` (calibration and
    search settings, results) goes into the JSON."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, layer in quant_layers(model).items():
        if isinstance(layer, QuantLayer) and layer.weight_quant.calibrated:
            wq = layer.weight_quant
            lo, hi = qrange(wq.bits)
            scale = _weight_shape(wq.scale, layer.weight, wq.axis)
            # Through the quantizer itself, so every rounding tie goes the way it does in use.
            grid = wq(layer.weight.detach()) / scale
            state[f"{name}.weight"] = torch.round(grid).clamp(lo, hi).to(torch.int8).cpu()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "image_size": int(model.image_encoder.img_size),
        "bits": dict(model.quant_bits),
        "layers": describe_layers(model),
        **info,
    }
    return write_folder(out_dir, state, config)


def write_folder(out_dir: str | os.PathLike, state: dict, config: dict) -> Path:
    """``quantized.pt`` (tensors only), then ``quant.json``: a folder with the JSON is whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    with atomic_write(out_dir / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)
    with atomic_write(out_dir / CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def read_config(path: str | os.PathLike) -> tuple[Path, dict]:
    """The directory of a quantized model (given it or a file in it) and its ``quant.json``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"quantized model not found: {path}")
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} holds no {CONFIG_FILE}: not a quantized model (run tinysam quantize)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{config_path} is not readable JSON ({err}); quantize again"
        ) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a tinysam quantized model description")
    published = config.get("scheme") == "published"
    expected = PUBLISHED_FORMAT_VERSION if published else FORMAT_VERSION
    if config.get("format_version") != expected:
        raise CheckpointError(
            f"{config_path} has format version {config.get('format_version')}; this tinysam "
            f"reads version {expected}: quantize again"
        )
    try:
        (_check_published_config if published else _check_config)(config, str(config_path))
    except FormatError as err:
        raise CheckpointError(f"{err}; quantize again") from None
    return directory, config


def _check_config(config: dict, where: str) -> None:
    """The fields ``load_quantized`` reads, with their types and ranges."""
    model_type = field(config, "model_type", "a string", where)
    if model_type not in QUANTIZABLE:
        raise FormatError(f"{where}: model_type {model_type!r} is not a known model type")
    if model_type == SMALL:
        size = field(config, "image_size", "an integer", where)
        if not (32 <= size <= 1024 and size % 16 == 0):
            raise FormatError(
                f"{where}: image_size must be a multiple of 16 from 32 to 1024, got {size}"
            )
    bits = field(config, "bits", "an object", where, default={})
    for role in ("weight", "activation"):
        value = field(bits, role, "an integer", where, "bits.", default=8)
        if not 2 <= value <= 8:
            raise FormatError(f"{where}: bits.{role} must be between 2 and 8, got {value}")
    layers = field(config, "layers", "an object", where, default={})
    for name in layers:
        entry = field(layers, name, "an object", where, "layers.")
        for role, described in entry.items():
            if role == "kind":
                continue
            require(described, "an object", where, f"layers.{name}.{role}")
            twin = field(described, "twin", "a string", where, f"layers.{name}.{role}.", "none")
            if twin not in TWIN_KINDS:
                raise FormatError(
                    f"{where}: layers.{name}.{role}.twin must be one of {', '.join(TWIN_KINDS)}"
                )


def _check_published_config(config: dict, where: str) -> None:
    """The fields ``published.load_converted`` reads (values are checked there, with the
    tensors, as a pickled file's are)."""
    from .published import FLOAT_CLASS

    model_type = field(config, "model_type", "a string", where)
    if model_type not in MODEL_TYPES:
        raise FormatError(f"{where}: model_type {model_type!r} is not a known model type")
    layers = field(config, "layers", "an object", where)
    for name in layers:
        entry = field(layers, name, "an object", where, "layers.")
        prefix = f"layers.{name}."
        kind = field(entry, "kind", "a string", where, prefix)
        if kind not in FLOAT_CLASS:
            raise FormatError(f"{where}: {prefix}kind must be one of {', '.join(FLOAT_CLASS)}")
        for key in ("weight_bits", "act_bits"):
            field(entry, key, "an integer", where, prefix)
        if kind.startswith("linear"):
            blocks = field(entry, "blocks", "a list", where, prefix)
            if len(blocks) != 2 or not all(type(n) is int for n in blocks):
                raise FormatError(f"{where}: {prefix}blocks must be two whole numbers")
            field(entry, "chunks", "an integer", where, prefix)


def _architecture(config: dict) -> Sam:
    """The untrained float model a checked ``quant.json`` describes."""
    if config["model_type"] == SMALL:
        return small_student(config["image_size"])
    return build_sam_model(config["model_type"])


def check_architecture(sam: Sam, model_type: str) -> None:
    """``sam`` can be rebuilt as a ``model_type`` when loaded: CheckpointError otherwise. The
    small demo student is checked tensor by tensor (the registry's models were resolved by
    their checkpoints, and building a ViT-H to compare would cost seconds and gigabytes)."""
    if model_type not in QUANTIZABLE:
        raise CheckpointError(
            f"unknown model type {model_type!r}; choose one of {', '.join(QUANTIZABLE)}"
        )
    if model_type != SMALL:
        return
    size = int(getattr(sam.image_encoder, "img_size", 0))
    architecture = _architecture({"model_type": model_type, "image_size": size})
    load_strict(architecture, sam.state_dict(), f"a {model_type}", "the model to quantize")


def load_quantized(
    path: str | os.PathLike, device: str | torch.device = "cpu", model_type: str | None = None
) -> Sam:
    """A fake-quantized model from a directory written by ``save_quantized`` (or its
    ``quantized.pt``), which must hold ``model_type`` when one is given;
    ``model.quant_config`` holds the JSON."""
    directory, config = read_config(path)
    found = config["model_type"]
    if model_type is not None and model_type != found:
        raise CheckpointError(f"{path} is a quantized {found}, not {model_type}")
    model_type = found
    if config.get("scheme") == "published":
        from .published import load_converted

        return load_converted(directory, config, read_state_dict(directory / WEIGHTS_FILE), device)
    bits = config.get("bits", {})
    model = prepare(_architecture(config), bits.get("weight", 8), bits.get("activation", 8))
    state = read_state_dict(directory / WEIGHTS_FILE)
    layers = quant_layers(model)
    described = config.get("layers", {})
    for name, entry in described.items():
        layer = layers.get(name)
        if layer is None:
            raise CheckpointError(f"{directory} describes a layer {name} the model lacks")
        if "weight" in entry:
            key = f"{name}.weight"
            scale = state.get(f"{name}.weight_quant.scale")
            if key not in state or state[key].dtype != torch.int8 or scale is None:
                raise CheckpointError(f"{directory / WEIGHTS_FILE}: {key} is not an int8 weight")
            axis = layer.weight_quant.axis
            state[key] = state[key].float() * _weight_shape(scale, state[key], axis)
    load_strict(model, state, f"a quantized {model_type}", str(directory / WEIGHTS_FILE))
    for name, entry in described.items():
        for role, quantizer in quantizers(layers[name]).items():
            if role not in entry:
                continue
            if role == "weight":
                quantizer.set_scale(quantizer.scale.clone())
            else:
                quantizer.twin = entry[role].get("twin", "none")
                quantizer.set_scale(quantizer.scale.clone())
    model.quant_config = config
    return model.to(device)
