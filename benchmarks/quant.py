"""ONNX Runtime fp32 vs int8 (Q-TinySAM), side by side in one run: the image encoder, a
one-point prompt, and a 16-prompt decoder batch.

    python benchmarks/quant.py [--threads 2] [--checkpoint PATH] [--quant-dir DIR]
        [--repeats 5] [--activations uint8|int8]

Without --quant-dir the model is calibrated here on the bundled image with a short search (one
image, 10 candidates, 1 round: scale values barely move the timings), then both precisions are
exported to a temporary folder. With --quant-dir (a `tinysam quantize` output) its onnx/ folder
is timed against a fresh fp32 export of the same --checkpoint. Runs of the two precisions
alternate and medians are shown; the last table is ONNX Runtime's profile of the int8 encoder.

Weights do not change the timings; without --checkpoint a randomly initialised vit_t is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/onnx.py would shadow the onnx package: keep this folder off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import tempfile

import numpy as np
import torch

from tinysam import build_sam_vit_t
from tinysam.backends import load_model
from tinysam.io import load_image
from tinysam.perf import interleaved_medians
from tinysam.quant.calibrate import collect
from tinysam.quant.model import prepare
from tinysam.quant.onnx_int8 import export_quantized_onnx
from tinysam.quant.search import SearchConfig, search_scales
from tinysam.runtime import OnnxPredictor
from tinysam.runtime.onnx_export import export_onnx
from tinysam.runtime.profile import op_times

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "picture1.jpg"


def quick_int8(sam, image: np.ndarray, out: Path, activations: str) -> None:
    qmodel = prepare(sam)
    records = collect(qmodel, [image], prompts_per_image=4, rows=128)
    search_scales(qmodel, records, SearchConfig(candidates=10, rounds=1))
    export_quantized_onnx(qmodel, out, "vit_t", activations=activations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--quant-dir", type=Path, help="a `tinysam quantize` output folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", choices=("uint8", "int8"), default="uint8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = load_image(IMAGE)
    sam = load_model(checkpoint=args.checkpoint)[0] if args.checkpoint else build_sam_vit_t()

    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir = Path(tmp) / "fp32"
        export_onnx(sam, fp32_dir, "vit_t")
        if args.quant_dir:
            int8_dir = args.quant_dir / "onnx"
        else:
            int8_dir = Path(tmp) / "int8"
            quick_int8(sam, image, int8_dir, args.activations)
        run(fp32_dir, int8_dir, image, args)


def run(fp32_dir: Path, int8_dir: Path, image: np.ndarray, args) -> None:
    predictors = {
        "fp32": OnnxPredictor(fp32_dir, threads=args.threads),
        "int8": OnnxPredictor(int8_dir, threads=args.threads),
    }
    for p in predictors.values():
        p.set_image(image)
    point = (np.array([[400.0, 300.0]]), np.array([1]))
    rng = np.random.default_rng(0)
    batch = torch.as_tensor(rng.uniform(0, 1000, (16, 1, 2)), dtype=torch.float32)
    labels = torch.ones(16, 1, dtype=torch.int)
    parts = {
        "image encoder (set_image)": {
            n: (lambda p=p: p.set_image(image)) for n, p in predictors.items()
        },
        "decoder, one point (predict)": {
            n: (lambda p=p: p.predict(*point)) for n, p in predictors.items()
        },
        "decoder, 16 points, full masks": {
            n: (lambda p=p: p.predict_torch(batch, labels)) for n, p in predictors.items()
        },
        "decoder, 16 points, low-res (everything mode)": {
            n: (lambda p=p: p.predict_torch(batch, labels, upscale=False))
            for n, p in predictors.items()
        },
    }
    print(f"ONNX Runtime, {args.threads} threads, median of {args.repeats} alternating runs\n")
    print("| part | fp32 ms | int8 ms | int8 speed-up |")
    print("|---|---|---|---|")
    for part, fns in parts.items():
        t = interleaved_medians(fns, args.repeats)
        fp32, int8 = t["fp32"], t["int8"]
        print(f"| {part} | {fp32 * 1e3:.1f} | {int8 * 1e3:.1f} | {fp32 / int8:.2f}x |")
    sizes = {
        n: sum(f.stat().st_size for f in d.glob("*.onnx")) / 2**20
        for n, d in (("fp32", fp32_dir), ("int8", int8_dir))
    }
    print(
        "\n(low-res batches: fp32 runs the many-prompt decoder, which has no int8 form; "
        "int8 runs its plain decoder)"
    )
    print(f"\nfiles: fp32 {sizes['fp32']:.1f} MiB, int8 {sizes['int8']:.1f} MiB")

    size = predictors["int8"].image_size
    feeds = {"image": np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)}
    print("\nint8 encoder, ONNX Runtime profile by op (ms per run):\n")
    print("| op | ms | nodes |")
    print("|---|---|---|")
    for op, ms, nodes, _ in op_times(int8_dir / "encoder.onnx", feeds, 3, args.threads, True)[:12]:
        print(f"| {op} | {ms:.1f} | {nodes} |")


if __name__ == "__main__":
    main()
