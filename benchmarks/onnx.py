"""Torch eager vs ONNX Runtime fp32, side by side in one run: encoder, one-point predict, and a
64-prompt decoder batch (low-res masks, as the everything mode asks for them).

    python benchmarks/onnx.py [--threads 2] [--checkpoint PATH] [--onnx-dir DIR] [--repeats 5]
        [--everything]

Without --onnx-dir the model is exported to a temporary folder first (about 20 s). Runs of the
two backends alternate, so the shared machine's noise hits both alike; medians are shown. If
OpenVINO is installed its fp32 encoder is timed on the same encoder.onnx too. The last tables
are ONNX Runtime's own profile of the encoder by op type and the slow-path check.

Weights do not change the timings; without --checkpoint a randomly initialised vit_t is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: keep its folder off the path so `import onnx` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import tempfile
import time

import numpy as np
import torch

from tinysam import SamPredictor, build_sam_vit_t
from tinysam.io import load_image
from tinysam.perf import interleaved_medians
from tinysam.runtime import OnnxPredictor
from tinysam.runtime.onnx_export import export_onnx
from tinysam.runtime.profile import op_times, slow_ops

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "picture1.jpg"


def openvino_encoder(onnx_dir: Path, threads: int):
    """OpenVINO's fp32 encoder on the same encoder.onnx, or None if OpenVINO is not installed."""
    from tinysam.runtime.predictor import OpenVinoEncoder

    try:
        return OpenVinoEncoder(onnx_dir / "encoder.onnx", threads)
    except ImportError:
        return None


def everything(torch_predictor, onnx_predictor, image) -> None:
    """One dense 32x32 everything-mode run per backend (default thresholds)."""
    from tinysam import SamAutomaticMaskGenerator

    print("\neverything mode, dense 32x32, one run each:")
    for name, predictor in (("torch", torch_predictor), ("onnxruntime", onnx_predictor)):
        generator = SamAutomaticMaskGenerator(predictor, output_mode="coco_rle")
        start = time.perf_counter()
        records = generator.generate(image)
        total = time.perf_counter() - start
        stats = generator.stats
        print(
            f"  {name:<12} {total:6.2f} s  (encoder {stats.encoder_s:.2f} s, decoder "
            f"{stats.decoder_s:.2f} s, {stats.prompts} prompts, {len(records)} masks)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint")
    parser.add_argument("--onnx-dir", type=Path, help="reuse an export instead of making one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--everything", action="store_true", help="also time a dense everything-mode run"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = build_sam_vit_t(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.onnx_dir
        if onnx_dir is None:
            onnx_dir = Path(tmp)
            start = time.perf_counter()
            export_onnx(sam, onnx_dir, "vit_t")
            print(f"exported to ONNX in {time.perf_counter() - start:.1f} s")
        run(sam, onnx_dir, args)


def run(sam, onnx_dir: Path, args) -> None:
    image = load_image(IMAGE)
    torch_predictor = SamPredictor(sam)
    onnx_predictor = OnnxPredictor(onnx_dir, threads=args.threads)
    torch_predictor.set_image(image)
    onnx_predictor.set_image(image)
    resized = torch_predictor.transform.apply_image(image)
    encoder_input = onnx_predictor.preprocess(resized)
    encoder_tensor = torch.from_numpy(encoder_input)

    def torch_encoder():
        with torch.no_grad():
            sam.image_encoder(encoder_tensor)

    encoders = {
        "torch eager": torch_encoder,
        "onnxruntime": lambda: onnx_predictor.encoder.run(None, {"image": encoder_input}),
    }
    openvino = openvino_encoder(onnx_dir, args.threads)
    if openvino is not None:
        encoders["openvino"] = lambda: openvino.run(None, {"image": encoder_input})

    point, label = np.array([[365.0, 225.0]]), np.array([1])
    generator = torch.Generator().manual_seed(0)
    size = torch.tensor(torch_predictor.input_size[::-1], dtype=torch.float)
    coords = torch.rand(64, 1, 2, generator=generator) * size
    labels = torch.ones(64, 1)

    rows = [
        ("image encoder", encoders),
        (
            "predict, 1 point",
            {
                "torch eager": lambda: torch_predictor.predict(point, label),
                "onnxruntime": lambda: onnx_predictor.predict(point, label),
            },
        ),
        (
            "decoder, 64 prompts",
            {
                "torch eager": lambda: torch_predictor.predict_torch(coords, labels, upscale=False),
                "onnxruntime": lambda: onnx_predictor.predict_torch(coords, labels, upscale=False),
            },
        ),
    ]
    print(f"{IMAGE.name}, {args.threads} threads, median of {args.repeats} alternating runs")
    header = f"{'':<22}{'torch eager':>13}{'onnxruntime':>13}{'openvino':>11}{'torch/ort':>11}"
    print(header)
    print("-" * len(header))
    for name, fns in rows:
        medians = interleaved_medians(fns, args.repeats)
        ov = f"{medians['openvino'] * 1000:>9.0f}ms" if "openvino" in medians else f"{'-':>11}"
        ratio = medians["torch eager"] / medians["onnxruntime"]
        print(
            f"{name:<22}{medians['torch eager'] * 1000:>11.0f}ms"
            f"{medians['onnxruntime'] * 1000:>11.0f}ms{ov}{ratio:>10.2f}x"
        )
    print("(64 prompts: both backends use their many-prompt decoder; low-res masks only)")
    if args.everything:
        everything(torch_predictor, onnx_predictor, image)

    print("\nONNX Runtime encoder profile (ms per run, by op type):")
    for op, ms, nodes, provider in op_times(
        onnx_dir / "encoder.onnx", {"image": encoder_input}, runs=2, threads=args.threads
    )[:8]:
        print(f"  {op:<22}{ms:>8.1f}{nodes:>6} nodes  {provider}")
    for name in sorted(p.name for p in onnx_dir.glob("*.onnx")):
        found = slow_ops(onnx_dir / name, args.threads)
        print(f"slow-path check {name}: {found or 'clean'}")


if __name__ == "__main__":
    main()
