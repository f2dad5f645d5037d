"""Each precision on each engine, side by side in one run: the image encoder's time against torch
fp32, and what it costs in agreement (embedding error, mean mask IoU with torch fp32 on the
golden images, one-point prompts and boxes).

    python benchmarks/precision.py [--threads 2] [--checkpoint PATH] [--int8-dir DIR]
        [--repeats 3] [--prompts 8] [--skip ROW ...]

Rows: torch fp32 (the reference) and bf16 (autocast), ONNX Runtime fp32 and int8, OpenVINO f32,
bf16 and int8. Without --int8-dir (an int8 export: a `tinysam quantize` output's onnx/, or a
converted Q-TinySAM's) a W8A8 model is calibrated here quickly (one image, a short search:
scale values barely move the timings; its agreement is that quick model's). A row the CPU
cannot run as asked says so (bf16 without AVX512-BF16/AMX is emulated, OpenVINO keeps f32 there;
OpenVINO's int8 is refused where its products saturate). Timings are medians of runs that
alternate between rows; the machine's limits are measured in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/onnx.py would shadow the onnx package: keep this folder off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import importlib.util
import tempfile

import numpy as np
import torch

from tinysam import build_sam_vit_t
from tinysam.backends import load_model
from tinysam.evaluation.limits import limits_table, measure_limits
from tinysam.io import load_image
from tinysam.perf import bf16_is_fast, cpu_kind, interleaved_medians, precision_note
from tinysam.predictor import SamPredictor
from tinysam.quant.report import mask_agreement
from tinysam.runtime import OnnxPredictor
from tinysam.runtime.onnx_export import export_onnx
from tinysam.runtime.predictor import OnnxModelError

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "images"
ROWS = (
    "torch fp32", "torch bf16", "onnxruntime fp32", "onnxruntime int8",
    "openvino f32", "openvino bf16", "openvino int8",
)  # fmt: skip


def _quick_int8():
    """benchmarks/quant.py's quick calibration (one concept, one place)."""
    path = Path(__file__).resolve().parent / "quant.py"
    spec = importlib.util.spec_from_file_location("quant_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.quick_int8


def make_rows(sam, fp32_dir: Path, int8_dir: Path, threads: int, skip: set) -> tuple[dict, dict]:
    """Row name -> predictor, and row name -> why it is missing or not as asked."""
    makers = {
        "torch fp32": lambda: SamPredictor(sam),
        "torch bf16": lambda: SamPredictor(sam, precision="bf16"),
        "onnxruntime fp32": lambda: OnnxPredictor(fp32_dir, threads=threads),
        "onnxruntime int8": lambda: OnnxPredictor(int8_dir, threads=threads, precision="int8"),
        "openvino f32": lambda: OnnxPredictor(fp32_dir, threads, encoder_engine="openvino"),
        "openvino bf16": lambda: OnnxPredictor(
            fp32_dir, threads, encoder_engine="openvino", precision="bf16"
        ),
        "openvino int8": lambda: OnnxPredictor(
            int8_dir, threads, encoder_engine="openvino", precision="int8"
        ),
    }
    rows, notes = {}, {}
    for name, make in makers.items():
        if name in skip:
            notes[name] = "skipped (--skip)"
            continue
        engine, precision = name.split()
        precision = "fp32" if precision == "f32" else precision
        try:
            rows[name] = make()
        except (ImportError, OnnxModelError) as err:
            notes[name] = f"not run: {err}"
            continue
        note = precision_note(precision, "onnxruntime" if engine == "onnxruntime" else engine)
        if note:
            notes[name] = note
    return rows, notes


def computed_in(row: str) -> str:
    """The precision a row's encoder really computes in here (its GEMM ceiling): ONNX
    Runtime has no bf16 CPU kernels, and OpenVINO keeps f32 without bf16 units."""
    engine, precision = row.split()
    if precision == "f32" or (precision == "bf16" and engine == "openvino" and not bf16_is_fast()):
        return "fp32"
    return precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--int8-dir", type=Path, help="an int8 export (an onnx/ folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="grid prompts per image (8)")
    parser.add_argument("--skip", nargs="*", default=[], choices=ROWS[1:], metavar="ROW")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sam = load_model(checkpoint=args.checkpoint)[0] if args.checkpoint else build_sam_vit_t()
    images = [load_image(p) for p in sorted(GOLDEN.glob("*.jpg"))]
    limits = measure_limits(args.threads, repeats=args.repeats)
    print(limits_table(limits))
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = Path(tmp) / "fp32"
        export_onnx(sam, fp32_dir, "vit_t")
        int8_dir = args.int8_dir
        if int8_dir is None:
            int8_dir = Path(tmp) / "int8"
            _quick_int8()(sam, images[0], int8_dir, "uint8")
        rows, notes = make_rows(sam, fp32_dir, int8_dir, args.threads, set(args.skip))
        report(rows, notes, images, args, limits)


def report(rows: dict, notes: dict, images: list, args, limits) -> None:
    image = images[-1]
    times = interleaved_medians(
        {name: (lambda p=p: p.set_image(image)) for name, p in rows.items()}, args.repeats
    )
    reference = rows["torch fp32"]
    reference.set_image(image)
    base = reference.get_image_embedding().float()
    errors = {}
    for name, predictor in rows.items():
        predictor.set_image(image)
        embedding = torch.as_tensor(np.asarray(predictor.get_image_embedding())).float()
        errors[name] = float((embedding - base).abs().max() / base.abs().max())
    candidates = {name: p for name, p in rows.items() if name != "torch fp32"}
    agreement = mask_agreement(reference, candidates, images, args.prompts)
    baseline = times["torch fp32"]
    from tinysam.evaluation.bench import count_costs
    from tinysam.evaluation.limits import percent_of_limit

    flops = count_costs(reference.model).encoder_flops
    print(
        f"\n{cpu_kind()}, {args.threads} threads; image encoder (set_image) median of "
        f"{args.repeats} alternating runs on a {image.shape[1]}x{image.shape[0]} image; "
        f"agreement with torch fp32 on {len(images)} golden images, {args.prompts} grid "
        "points and the boxes around torch fp32's answers per image\n"
    )
    print(
        "| row | encoder s | vs torch fp32 | % of its precision's GEMM limit | embedding "
        "error (rel. to max) | mask IoU point / box |"
    )
    print("|---|---|---|---|---|---|")
    for name in ROWS:
        if name not in rows:
            print(f"| {name} | — | — | — | — | {notes.get(name, 'not run')} |")
            continue
        ceiling = limits.ceiling(computed_in(name))
        share = f"{percent_of_limit(flops, times[name], ceiling):.0f}%" if ceiling else "n/a"
        if name == "torch fp32":
            iou = "reference"
        else:
            kinds = agreement[name]
            iou = f"{kinds['point'].mean_iou:.4f} / {kinds['box'].mean_iou:.4f}"
        print(
            f"| {name} | {times[name]:.3f} | {baseline / times[name]:.2f}x | {share} | "
            f"{errors[name]:.1e} | {iou} |"
        )
    for name, note in notes.items():
        print(f"\n- {name}: {note}", end="")
    print()


if __name__ == "__main__":
    main()
