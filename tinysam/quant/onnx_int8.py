"""The int8 ONNX model: the deploy-mode fake-quantized model exported with QuantizeLinear /
DequantizeLinear pairs (torch's exporter turns each fake-quant op into one), then rewritten so
that ONNX Runtime runs integer kernels:

- weights become int8 initializers behind a DequantizeLinear (their QuantizeLinear is done
  here, once), and a Transpose between a weight and its MatMul is folded into the initializer
  (the per-channel axis moves with it), so ONNX Runtime sees ``DQ(x), DQ(W) -> MatMul``;
- activations may use uint8 with zero point 128 instead of int8 with zero point 0: the same
  quantization grid, but the u8 x s8 kernels are the fast ones on x86 (``activations``).

Convolutions quantize their outputs in deploy mode, so they fuse into QLinearConv; matrix
products run as integer products with float outputs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

ACTIVATION_TYPES = ("uint8", "int8")


def _arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _axis(node) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    return 1


def _set_axis(node, axis: int) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("axis", axis)])


def quantize_array(w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear to int8 (round half to even, saturate), zero point 0."""
    if scale.ndim == 1 and w.ndim > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return np.clip(np.rint(w / scale), -128, 127).astype(np.int8)


def fold_weight_quantization(model) -> int:
    """Quantize constant weights into int8 initializers (and fold a following 2-D Transpose
    into them); returns how many weights were folded."""
    from onnx import numpy_helper

    graph = model.graph
    values = _arrays(model)
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    drop, new_inits, folded = set(), [], 0
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in values:
            continue
        dqs = consumers[q.output[0]]
        if len(dqs) == 1 and dqs[0].op_type == "Clip":  # a no-op clip to the int8 range
            drop.add(id(dqs[0]))
            dqs = consumers[dqs[0].output[0]]
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        dq = dqs[0]
        weight, scale = values[q.input[0]], values[q.input[1]]
        axis = _axis(q) % max(weight.ndim, 1)
        qweight = quantize_array(weight, scale, axis)
        after = consumers[dq.output[0]]
        if (
            len(after) == 1
            and after[0].op_type == "Transpose"
            and qweight.ndim == 2
            and [a.ints for a in after[0].attribute if a.name == "perm"] in ([[1, 0]], [])
        ):
            transpose = after[0]
            qweight, axis = qweight.T.copy(), 1 - axis
            for node in consumers[transpose.output[0]]:
                for i, name in enumerate(node.input):
                    if name == transpose.output[0]:
                        node.input[i] = dq.output[0]
            drop.add(id(transpose))
        name = q.input[0] + "_int8"
        new_inits.append(numpy_helper.from_array(qweight, name))
        dq.input[0] = name
        # A scale and a zero point of its own: ONNX Runtime's s8 -> u8 weight rewrite for CPUs
        # without VNNI (``session.x64quantprecision``) fails on either shared between weights
        # (the exporter shares equal constants, e.g. the scales of a split product's parts).
        scale_name = name + "_scale"
        new_inits.append(numpy_helper.from_array(np.asarray(scale), scale_name))
        dq.input[1] = scale_name
        if len(dq.input) > 2:
            zp_name = name + "_zero_point"
            new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), zp_name))
            dq.input[2] = zp_name
        if scale.ndim == 1:
            _set_axis(dq, axis)
        drop.add(id(q))
        folded += 1
    kept = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return folded


def use_uint8_activations(model) -> int:
    """Move activation quantizers (scalar int8 zero point 0) to uint8 with zero point 128: the
    same grid, fast u8 x s8 kernels. Returns how many zero points changed."""
    from onnx import numpy_helper

    graph = model.graph
    values = _arrays(model)
    u8_name = "activation_zero_point_u8"
    changed, retyped = 0, set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero = values.get(node.input[2])
        is_weight_dq = node.op_type == "DequantizeLinear" and node.input[0] in values
        if zero is None or zero.ndim != 0 or zero.dtype != np.int8 or is_weight_dq:
            continue
        node.input[2] = u8_name
        retyped.update(node.output if node.op_type == "QuantizeLinear" else ())
        changed += 1
    # Shape inference recorded the old int8 type of the quantized tensors.
    kept = [v for v in graph.value_info if v.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    if changed:
        graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), u8_name))
        _drop_unused_initializers(model)
    return changed


def _drop_unused_initializers(model) -> None:
    graph = model.graph
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    constants = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    if len(constants) != len(graph.node):
        del graph.node[:]
        graph.node.extend(constants)


def to_int8(model, activations: str = "uint8"):
    """Rewrite an exported fake-quantized graph for integer kernels (see the module doc)."""
    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations must be one of {ACTIVATION_TYPES}, got {activations!r}")
    fold_weight_quantization(model)
    if activations == "uint8":
        use_uint8_activations(model)
    return model


def export_quantized_onnx(
    qmodel,
    out_dir: str | Path,
    model_type: str,
    activations: str = "uint8",
    opset: int | None = None,
    step=None,
) -> dict:
    """Write the int8 encoder and decoders of a calibrated 8-bit model, with the manifest that
    ``OnnxPredictor`` reads (no many-prompt decoder: its shortcut has no quantized form)."""
    from .model import set_deploy

    bits = getattr(qmodel, "quant_bits", None)
    if bits is None:
        raise ValueError("not a quantized model: run tinysam.quant.prepare and calibrate first")
    if bits["weight"] != 8 or bits["activation"] != 8:
        raise ValueError(
            f"ONNX int8 export needs 8-bit weights and activations, this model has "
            f"W{bits['weight']}A{bits['activation']}; use the fake-quantized model for "
            "other bit widths"
        )
    set_deploy(qmodel, True)
    try:
        return export_int8(
            qmodel,
            out_dir,
            model_type,
            activations,
            opset,
            step,
            quantization={"weights": "int8 per channel"},
        )
    finally:
        set_deploy(qmodel, False)


def export_int8(
    model, out_dir, model_type: str, activations: str, opset: int | None = None, step=None,
    quantization: dict | None = None,
) -> dict:  # fmt: skip
    """Export a model whose quantizers are fake-quant ops (the QDQ graph) and rewrite each
    graph for integer kernels; ``quantization`` describes it in the manifest."""
    from ..runtime.onnx_export import DEFAULT_OPSET, export_onnx

    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations must be one of {ACTIVATION_TYPES}, got {activations!r}")
    return export_onnx(
        model,
        Path(out_dir),
        model_type,
        opset=opset or DEFAULT_OPSET,
        step=step,
        many_prompt_decoder=False,
        rewrite=lambda m: to_int8(m, activations),
        extra={"quantization": {**(quantization or {}), "activations": activations}},
    )
