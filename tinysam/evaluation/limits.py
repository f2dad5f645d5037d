"""What this machine can do at most, measured in the same run as the benchmarks that compare
against it: dense fp32 GEMM (torch's kernel and ONNX Runtime's), bf16 GEMM (torch's, fp32
accumulation: AMX or AVX512-BF16 where the CPU has them, emulated elsewhere), int8 GEMM (ONNX
Runtime's ``MatMulInteger``: its u8 x s8 kernel, and the u8 x u8 one our int8 graphs run on
x86 CPUs without VNNI, see ``runtime.predictor.X64_QUANT_PRECISION``) and memory bandwidth.

The int8 rate over the best fp32 rate is the most an int8 model can gain on the machine: its
GEMMs can at best run that much faster, and the rest (softmax, norms, depthwise convolutions)
not at all.

A model's ideal time is its FLOP count over the GEMM rate; a benchmark row's "% of limit" is
that ideal over the measured time. Rates are medians of interleaved repeats (``perf``), so a
noisy machine slows them as it slows the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..perf import cpu_kind, interleaved_medians


@dataclass
class MachineLimits:
    cpu: str
    threads: int
    fp32_gflops_torch: float
    fp32_gflops_onnxruntime: float | None  # None: onnxruntime not installed
    int8_gops_onnxruntime: float | None
    memory_gb_per_s: float
    int8_u8u8_gops_onnxruntime: float | None = None  # the kernel X64_QUANT_PRECISION selects
    bf16_gflops_torch: float | None = None
    int8_products_saturate: bool = False  # u8 x s8 saturates here: our graphs run u8 x u8

    def best_fp32(self) -> float:
        return max(r for r in (self.fp32_gflops_torch, self.fp32_gflops_onnxruntime) if r)

    def int8_graph_gops(self) -> float | None:
        """The rate of the int8 kernel our graphs run here (``session_options``)."""
        if self.int8_products_saturate:
            return self.int8_u8u8_gops_onnxruntime or self.int8_gops_onnxruntime
        return self.int8_gops_onnxruntime

    def int8_kernel(self) -> str:
        return "u8 x u8" if self.int8_products_saturate else "u8 x s8"

    def int8_ceiling(self) -> float | None:
        """The int8 kernel our graphs run here, over the best fp32 rate."""
        rate = self.int8_graph_gops()
        return None if rate is None else rate / self.best_fp32()

    def ceiling(self, precision: str) -> float | None:
        """The GEMM rate (G op/s) a model in ``precision`` could at best run at here."""
        rates = {
            "fp32": self.best_fp32(),
            "bf16": self.bf16_gflops_torch,
            "int8": self.int8_graph_gops(),
        }
        return rates[precision]


def _torch_gemm(n: int, threads: int, dtype=None):
    import torch

    torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def _ort_gemm(n: int, threads: int, int8: bool, u8u8: bool = False):
    """A one-node ONNX Runtime session: MatMul (fp32) or MatMulInteger (u8 x s8 -> s32; with
    ``u8u8`` the session setting that makes x86 CPUs without VNNI use u8 x u8 kernels)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
        feed = rng.integers(0, 256, (n, n), dtype=np.uint8)
    else:
        weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "b")
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type = y_type = TensorProto.FLOAT
        feed = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n])],
        [helper.make_tensor_value_info("y", y_type, [n, n])], initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if u8u8:
        from ..runtime.predictor import X64_QUANT_PRECISION

        options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda: session.run(None, {"a": feed})


def _copy(megabytes: int):
    source = np.ones(megabytes << 18, np.float32)  # megabytes MiB
    target = np.empty_like(source)
    return lambda: np.copyto(target, source)


def measure_limits(
    threads: int | None = None, n: int = 2048, repeats: int = 5, copy_mb: int = 256
) -> MachineLimits:
    """GEMM rates on n x n matrices and the copy bandwidth of ``copy_mb`` MiB (read + write)."""
    import torch

    from ..perf import bf16_is_fast, int8_products_saturate

    threads = threads or len(os.sched_getaffinity(0))
    jobs = {"torch": _torch_gemm(n, threads), "copy": _copy(copy_mb)}
    # Emulated bf16 runs at ~1 GFLOP/s: a smaller product keeps the measurement short.
    bf16_n = n if bf16_is_fast() else min(n, 512)
    jobs["torch_bf16"] = _torch_gemm(bf16_n, threads, torch.bfloat16)
    try:
        jobs["ort_fp32"] = _ort_gemm(n, threads, int8=False)
        jobs["ort_int8"] = _ort_gemm(n, threads, int8=True)
        jobs["ort_u8u8"] = _ort_gemm(n, threads, int8=True, u8u8=True)
    except ImportError:
        pass
    for job in jobs.values():  # warm-up: first calls allocate and pick kernels
        job()
    seconds = interleaved_medians(jobs, repeats)

    def rate(job: str) -> float | None:
        size = bf16_n if job == "torch_bf16" else n
        return 2.0 * size**3 / seconds[job] / 1e9 if job in seconds else None

    return MachineLimits(
        cpu=cpu_kind(),
        threads=threads,
        fp32_gflops_torch=rate("torch"),
        fp32_gflops_onnxruntime=rate("ort_fp32"),
        int8_gops_onnxruntime=rate("ort_int8"),
        memory_gb_per_s=2 * (copy_mb << 20) / seconds["copy"] / 1e9,
        int8_u8u8_gops_onnxruntime=rate("ort_u8u8"),
        bf16_gflops_torch=rate("torch_bf16"),
        int8_products_saturate=int8_products_saturate(),
    )


def limits_table(limits: MachineLimits) -> str:
    def rate(value: float | None, unit: str) -> str:
        return "onnxruntime not installed" if value is None else f"{value:.1f} {unit}"

    ceiling = ""
    if limits.bf16_gflops_torch is not None:
        ceiling += (
            f"| bf16 ceiling: bf16 GEMM / best fp32 GEMM | "
            f"{limits.bf16_gflops_torch / limits.best_fp32():.2f}x (the most bf16 gains here) |\n"
        )
    if limits.int8_ceiling() is not None:
        ceiling += (
            f"| int8 ceiling: {limits.int8_kernel()} GEMM / best fp32 GEMM | "
            f"{limits.int8_ceiling():.2f}x (the most int8 GEMMs gain here) |\n"
        )
    used = " (our int8 graphs here)"
    s8_used, u8_used = ("", used) if limits.int8_products_saturate else (used, "")

    return (
        f"machine: {limits.cpu}, {limits.threads} threads\n\n"
        "| limit | rate |\n|---|---|\n"
        f"| fp32 GEMM, torch (torch.mm) | {rate(limits.fp32_gflops_torch, 'GFLOP/s')} |\n"
        f"| fp32 GEMM, ONNX Runtime (MatMul) | "
        f"{rate(limits.fp32_gflops_onnxruntime, 'GFLOP/s')} |\n"
        f"| bf16 GEMM, torch (torch.mm, fp32 accumulation) | "
        f"{rate(limits.bf16_gflops_torch, 'GFLOP/s')} |\n"
        f"| int8 GEMM, ONNX Runtime (MatMulInteger u8 x s8){s8_used} | "
        f"{rate(limits.int8_gops_onnxruntime, 'GOP/s')} |\n"
        f"| int8 GEMM, ONNX Runtime, u8 x u8 (x64quantprecision){u8_used} | "
        f"{rate(limits.int8_u8u8_gops_onnxruntime, 'GOP/s')} |\n"
        f"| memory copy (read + write) | {limits.memory_gb_per_s:.1f} GB/s |\n" + ceiling
    )


def percent_of_limit(flops: float, seconds: float, rate_gflops: float) -> float:
    """How close a run of ``flops`` in ``seconds`` came to ``rate_gflops``: ideal / measured."""
    return 100.0 * (flops / (rate_gflops * 1e9)) / seconds
