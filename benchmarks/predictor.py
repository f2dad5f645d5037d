"""Median CPU latency of the image encoder, a one-point ``predict`` and a 64-prompt decoder batch.

Each row is measured three ways in the same run, each in its own process so allocator settings
do not leak between them:

* baseline        -- the reference implementation's computation replayed on the same weights
                     (``reference_style.py``), plain PyTorch eager, glibc's default allocator;
* tinysam         -- this package through its Python API, as shipped;
* tinysam, no tune -- the same with ``TINYSAM_TUNE_MALLOC=0`` (glibc's default allocator), to
                     show what the model code gains on its own.

    python benchmarks/predictor.py [--threads 2] [--checkpoint PATH]

Weights do not change the timings; without --checkpoint a randomly initialised vit_t is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = HERE.parent / "assets" / "picture1.jpg"
MODES = ("baseline", "tinysam", "tinysam-notune")
LABELS = {"baseline": "baseline", "tinysam": "tinysam", "tinysam-notune": "no tune"}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(mode: str, threads: int, checkpoint: str | None, repeats: int) -> dict:
    import os

    if mode != "tinysam":
        os.environ["TINYSAM_TUNE_MALLOC"] = "0"
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from tinysam import SamPredictor, build_sam_vit_t
    from tinysam.io import load_image

    from reference_style import ReferenceStyle

    torch.manual_seed(0)
    sam = build_sam_vit_t(checkpoint)
    predictor = SamPredictor(sam)
    image = load_image(IMAGE)
    predictor.set_image(image)
    resized = predictor.transform.apply_image(image)
    encoder_input = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())

    generator = torch.Generator().manual_seed(0)
    coords64 = torch.rand(64, 1, 2, generator=generator) * torch.tensor(predictor.input_size[::-1])
    labels64 = torch.ones(64, 1, dtype=torch.int)
    point = np.array([[365.0, 225.0]])
    point_1024 = torch.as_tensor(predictor.transform.apply_coords(point, predictor.original_size))
    point_1024 = point_1024[None].float()
    one = torch.ones(1, 1, dtype=torch.int)
    features = predictor.features

    if mode == "baseline":
        ref = ReferenceStyle(sam)
        encode = lambda: ref.encode(encoder_input)  # noqa: E731
        predict = lambda: ref.predict_one_point(  # noqa: E731
            features, point_1024, one, predictor.input_size, predictor.original_size
        )
        decode64 = lambda: ref.decode(features, coords64, labels64)  # noqa: E731
        with torch.no_grad():
            drift = float((ref.encode(encoder_input) - features).abs().max())
    else:

        def encode():
            with torch.no_grad():
                sam.image_encoder(encoder_input)

        predict = lambda: predictor.predict(point, np.array([1]))  # noqa: E731
        decode64 = lambda: predictor.predict_torch(coords64, labels64)[2]  # noqa: E731
        drift = 0.0

    return {
        "encoder": _median_seconds(encode, repeats),
        "predict": _median_seconds(predict, repeats * 2),
        "decoder64": _median_seconds(decode64, max(1, repeats // 2)),
        "embedding_drift": drift,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", help="vit_t checkpoint (default: random weights)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:
        print(json.dumps(measure(args.mode, args.threads, args.checkpoint, args.repeats)))
        return

    results = {}
    for mode in MODES:
        command = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ]
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        print(f"measuring {LABELS[mode]} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    rows = [
        ("image encoder (1024x1024)", "encoder"),
        ("predict, 1 point (3 masks, full size)", "predict"),
        ("mask decoder, 64 points in one batch", "decoder64"),
    ]
    header = (
        f"{'median latency, ' + str(args.threads) + ' threads':<40}"
        + "".join(f"{LABELS[m]:>15}" for m in MODES)
        + f"{'speedup':>10}{'no tune':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, key in rows:
        base = results["baseline"][key]
        cells = "".join(f"{results[m][key] * 1000:>12.1f} ms" for m in MODES)
        print(
            f"{label:<40}{cells}{base / results['tinysam'][key]:>9.2f}x"
            f"{base / results['tinysam-notune'][key]:>9.2f}x"
        )
    drift = results["baseline"]["embedding_drift"]
    print(f"\nbaseline vs tinysam embedding max abs difference: {drift:.2e}")


if __name__ == "__main__":
    main()
