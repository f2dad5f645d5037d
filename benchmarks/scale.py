"""Many images: images per second locally and on Ray with 1 and 2 workers, in one run.

    python benchmarks/scale.py [--checkpoint CKPT] [--images 12] [--job embed|everything]

Every row runs the same job (``embed``: the encoder per image; ``everything``: dense 8x8 grid)
over the same images with the same per-image code (``tinysam.batch``). Ray rows start a fresh
local cluster (``ray.init(num_cpus=...)``); its start-up is timed apart from the job. The
per-image overhead of Ray is (Ray 1 worker x T threads - local T threads) / images.
Without --checkpoint, the golden test checkpoint (random weights, same cost) is used.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from tinysam.backends import load_predictor
from tinysam.batch import run_local, run_ray
from tinysam.embeddings import EmbeddingJob
from tinysam.everything.outputs import EverythingJob, everything_outputs
from tinysam.perf import cpu_kind

REPO = Path(__file__).resolve().parents[1]


def make_job(kind: str, checkpoint: Path, images: list[Path], out: Path, threads: int):
    spec = functools.partial(load_predictor, "torch", checkpoint=checkpoint, threads=threads)
    if kind == "embed":
        return EmbeddingJob(spec, {str(i): str(out / f"{i.stem}.npz") for i in images})
    plan = {str(i): [str(p) for p in everything_outputs(i.stem, out, False)] for i in images}
    return EverythingJob(
        spec, plan, mode="dense", points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "tests/golden/vit_t_seed0_checkpoint.pth"
    )
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--job", choices=("embed", "everything"), default="embed")
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        sources = sorted((REPO / "tests/golden/images").glob("*.jpg"))
        for k in range(args.images):
            with Image.open(sources[k % len(sources)]) as image:
                image.resize((800 + 8 * k, 600)).save(folder / f"img{k:03d}.jpg")
        images = sorted(folder.iterdir())
        rows = []

        def local(threads: int) -> None:
            out = Path(tmp, f"local{threads}")
            job = make_job(args.job, args.checkpoint, images, out, threads)
            summary = run_local(job, [str(i) for i in images], progress=False)
            rows.append((f"local, {threads} thread(s)", 1, threads, summary, 0.0))
            shutil.rmtree(out)

        def on_ray(workers: int, threads: int) -> None:
            start = time.perf_counter()
            ray.init(address="local", num_cpus=cores, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)  # fmt: skip
            started = time.perf_counter() - start
            out = Path(tmp, f"ray{workers}x{threads}")
            job = make_job(args.job, args.checkpoint, images, out, threads)
            summary = run_ray(
                job, [str(i) for i in images], workers=workers, threads=threads, progress=False
            )
            ray.shutdown()
            label = f"Ray, {workers} worker(s) x {threads} thread(s)"
            rows.append((label, workers, threads, summary, started))
            shutil.rmtree(out)

        for threads in (1, cores):
            local(threads)
        for workers, threads in ((1, 1), (1, cores), (cores, 1)):
            on_ray(workers, threads)

    n = args.images
    steady = {r[2]: r[3].steady_items_per_second for r in rows if r[0].startswith("local")}
    print(f"\n{args.job} over {n} images of ~800x600, CPU: {cpu_kind()}, {os.cpu_count()} cores")
    print(
        "| run | images/s overall | images/s after the first | vs local with the same "
        "threads in total (after the first) | first image (s) | Ray start-up (s) |"
    )
    print("|---|---|---|---|---|---|")
    for label, workers, threads, summary, started in rows:
        rate = summary.steady_items_per_second
        ratio = rate / steady[workers * threads] if workers * threads in steady else float("nan")
        print(
            f"| {label} | {summary.items_per_second:.2f} | {rate:.2f} | {ratio:.2f}x | "
            f"{summary.first_seconds:.1f} | {f'{started:.1f}' if started else '-'} |"
        )
    local_one = 1 / steady[1]
    ray_one = (
        1
        / next(
            r[3] for r in rows if r[0] == "Ray, 1 worker(s) x 1 thread(s)"
        ).steady_items_per_second
    )
    print(
        f"\nRay's per-image overhead, after start-up (1 worker x 1 thread vs local 1 thread): "
        f"{(ray_one - local_one) * 1000:.0f} ms an image ({ray_one:.2f} s vs {local_one:.2f} s)"
    )


if __name__ == "__main__":
    main()
