"""Process-level CPU tuning that the model code itself cannot do.

PyTorch on a CPU allocates every large activation afresh. glibc hands allocations above its
mmap threshold (at most 32 MiB) straight to the kernel and takes them back on free, so each
forward pass page-faults through hundreds of megabytes; on virtual machines that costs more than
the arithmetic of the conv stem. Raising the thresholds keeps freed memory in the heap for the
next pass: the TinyViT encoder runs about 1.4x faster on the 2-core development machine
(``benchmarks/predictor.py`` measures it). The price is that the peak heap is not returned to
the OS while the process lives (allocations above 1 GiB are still returned).

It also keeps every thread on one heap (``M_ARENA_MAX``): by default glibc gives the worker
threads of torch, ONNX Runtime and OpenVINO heaps of their own, each keeping its peak. In
everything mode on an 1800x1200 photo (an OpenVINO encoder, torch's decoder) one heap lowered
the peak from 1091 to 970 MiB, no slower (AVX2 EPYC). ``SamPredictor``
applies it when its model is on the CPU, and the ``tinysam`` command at start; set
``TINYSAM_TUNE_MALLOC=0`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_THRESHOLD = 1 << 30
_tuned = False


def _mallopt():
    """glibc's ``mallopt`` on Linux; None elsewhere (musl and other libcs have none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None  # musl and other libcs have no mallopt


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap; True if applied. Idempotent.

    Does nothing off glibc, or when ``TINYSAM_TUNE_MALLOC=0``.
    """
    global _tuned
    if _tuned:
        return True
    mallopt = _mallopt()
    if os.environ.get("TINYSAM_TUNE_MALLOC", "1") == "0" or mallopt is None:
        return False
    ok = all(
        mallopt(option, value) == 1
        for option, value in (
            (_M_MMAP_THRESHOLD, _THRESHOLD),
            (_M_TRIM_THRESHOLD, _THRESHOLD),
            (_M_ARENA_MAX, 1),
        )
    )
    _tuned = ok
    return ok


@contextmanager
def bounded_heap(threshold: int = 4 << 20):
    """Allocations above ``threshold`` go straight to the kernel and back while inside.

    For work whose large tensors come and go in changing sizes (calibration: an autograd graph
    per image): a heap that keeps them, as ``tune_allocator`` makes it, fragments, and the
    resident memory grows image after image. Measured on 3 calibration images (AVX2 EPYC): peak
    4.5 GB tuned, 3.0 GB with 4 MiB, at 1.7x the time of the calibration. The tuning in force
    before is restored on leaving.
    """
    mallopt = _mallopt()
    if mallopt is None or os.environ.get("TINYSAM_TUNE_MALLOC", "1") == "0":
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    mallopt(_M_TRIM_THRESHOLD, threshold)
    try:
        yield
    finally:
        if _tuned:
            mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, runs alternating between them after one warm-up each,
    so a shared machine's noise hits all of them alike (benchmarks compare these as ratios)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, which containers and ``taskset``
    narrow): the default thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_kind() -> str:
    """The CPU's model name and the vector extensions that decide kernel speed."""
    name, flags = cpu_flags()
    wanted = [
        ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
        ("avx512_bf16", "BF16"), ("amx_int8", "AMX"), ("avx2", "AVX2"),
    ]  # fmt: skip
    extensions = [label for flag, label in wanted if flag in flags]
    if "AVX-512" in extensions:
        extensions.remove("AVX2")
    return f"{name} ({', '.join(extensions) or 'no AVX'})"


PRECISIONS = ("fp32", "bf16", "int8")


class PrecisionWarning(UserWarning):
    """A precision that will run correctly here, but slowly or in another precision."""


def bf16_is_fast() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); elsewhere torch and OpenVINO
    emulate it (or fall back to fp32), slower than fp32."""
    _, flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def precision_note(precision: str, engine: str) -> str | None:
    """One line when ``precision`` on ``engine`` ("torch", "onnxruntime", "openvino") will be
    slow on this CPU or run in another precision; None when it runs as asked, at speed."""
    if precision == "bf16" and engine == "onnxruntime":
        return (
            "ONNX Runtime has no bf16 kernels for the CPU: the encoder runs in fp32 "
            "(--backend torch or openvino run bf16)"
        )
    if precision == "bf16" and engine == "openvino" and not bf16_is_fast():
        return (
            "OpenVINO runs bf16 only on CPUs with AVX512-BF16 or AMX: here the encoder runs in fp32"
        )
    if precision == "bf16" and not bf16_is_fast():
        return "bf16 on this CPU (no AVX512-BF16 or AMX) is emulated: correct, but slower than fp32"
    if precision == "int8" and engine != "torch" and int8_products_saturate():
        return "int8 on this CPU (x86 without VNNI) runs exact u8 x u8 kernels: no faster than fp32"
    if precision == "int8" and engine == "torch":
        return "int8 on torch is simulated quantization (float arithmetic): use the int8 export"
    return None


def int8_products_saturate() -> bool:
    """Whether u8 x s8 products here go through int16 pairs that saturate: x86 CPUs without
    VNNI (AVX2, AVX-512F). On those, int8 kernels that use them give wrong sums near the ends
    of the ranges (see ``runtime.predictor.X64_QUANT_PRECISION``)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    _, flags = cpu_flags()
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
