"""What ONNX Runtime actually runs: per-op times, and ops that mean a slow path.

``slow_ops`` inspects the graph after ONNX Runtime's own optimisations (the one it executes);
``op_times`` profiles real runs. ``benchmarks/onnx.py`` prints both; the tests keep the exported
graphs free of slow ops.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from .predictor import disabled_optimizers, session_options

# Op types that should not survive in our graphs, and why each is slow.
SLOW_OPS = {
    "Erf": "GELU split into Erf/Div/Mul/Add (export with opset >= 20 keeps it one op)",
    "Einsum": "generic Einsum kernel instead of MatMul/Gemm",
    "Loop": "control flow runs node by node",
    "Scan": "control flow runs node by node",
    "If": "control flow runs node by node",
    "NonZero": "data-dependent shapes defeat memory planning",
    "ScatterND": "element-wise scatter kernel",
}


def slow_ops(model_path: str | os.PathLike, threads: int | None = None) -> dict[str, int]:
    """Slow op types left in the graph ONNX Runtime executes (after its optimisations), and
    nodes not assigned to the CPU provider: {op or provider: count}. Empty means clean."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized, load_external_data=False).graph
    found: dict[str, int] = defaultdict(int)
    for node in graph.node:
        if node.op_type in SLOW_OPS:
            found[node.op_type] += 1
    return dict(found)


def op_times(
    model_path: str | os.PathLike,
    feeds: dict,
    runs: int = 3,
    threads: int | None = None,
    quantized: bool = False,
) -> list[tuple[str, float, int, str]]:
    """Mean milliseconds per run by op type, after one warm-up run: (op, ms, nodes, provider),
    slowest first. ``quantized``: an int8 graph, run as ``OnnxPredictor`` runs it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads, quantized)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(model_path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=disabled_optimizers(quantized),
        )
        session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    total: dict[tuple[str, str], float] = defaultdict(float)
    nodes: dict[tuple[str, str], set] = defaultdict(set)
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        key = (args.get("op_name", "?"), args.get("provider", "?"))
        total[key] += event["dur"]
        nodes[key].add(event["name"])
    # The warm-up run is in the profile too: divide by all runs.
    rows = [(op, us / 1000 / (runs + 1), len(nodes[(op, p)]), p) for (op, p), us in total.items()]
    return sorted(rows, key=lambda row: -row[1])
