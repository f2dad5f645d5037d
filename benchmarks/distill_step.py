"""Distillation training steps on synthetic data with the small demo models: seconds per step
and the loss at the start and end, on the CPU or a GPU (bf16 autocast there).

    python benchmarks/distill_step.py [--device cpu|cuda] [--steps 30] [--image-size 256]
        [--prompts 16]

A smoke test of the trainer on a device as much as a timing: it checks that the loss falls.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from tinysam.distill.models import small_student, small_teacher
from tinysam.distill.synthetic import write_synthetic_sa1b
from tinysam.distill.trainer import Distiller, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = args.image_size
        data = write_synthetic_sa1b(f"{tmp}/data", 12, size=(size * 3 // 4, size), seed=0)
        config = TrainConfig(
            data=str(data),
            out=f"{tmp}/run",
            image_size=size,
            prompts_per_image=args.prompts,
            lr=1e-3,
            warmup_steps=3,
            max_steps=args.steps,
            epochs=1000,
        )
        distiller = Distiller(small_student(size), small_teacher(size), config, device=args.device)
        history = distiller.run(progress=False)
    losses = [row["total"] for row in history]
    seconds = statistics.median(row["seconds"] for row in history[2:])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, image {size}, {args.prompts} prompts per step")
    print(f"median step {seconds * 1000:.0f} ms")
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    print(f"loss first 5 steps {first:.4f}, last 5 {last:.4f}")


if __name__ == "__main__":
    main()
