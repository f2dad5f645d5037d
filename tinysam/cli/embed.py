"""``tinysam embed``: image embeddings for a folder, ahead of annotation (locally or on Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    IMAGE_SUFFIXES,
    UsageError,
    add_max_pixels_arg,
    add_model_args,
    add_ray_args,
    check_max_pixels,
    predictor_spec,
    run_batch,
    uses_ray,
)


def register(sub) -> None:
    embed = sub.add_parser(
        "embed",
        help="precompute image embeddings for a folder (serve --embeddings loads them)",
        description=(
            "Encode every image of a folder once and save its embedding as OUT/NAME.npz, with "
            "OUT/index.json listing them. `tinysam serve --embeddings OUT` then answers the "
            "first click on those images without encoding; in Python, "
            "predictor.restore_image_state(tinysam.embeddings.load_embedding(path)). Images "
            "already done are skipped; unreadable ones are reported and skipped."
        ),
        epilog="example: tinysam embed photos/ --out photos-embeddings/ --ray --workers 4",
    )
    embed.add_argument("input", type=Path, help="a folder of images, or one image")
    embed.add_argument("--out", type=Path, required=True, help="output folder")
    embed.add_argument("--force", action="store_true", help="redo images already done")
    add_max_pixels_arg(embed)
    add_model_args(embed, backend=True)
    add_ray_args(embed)
    embed.set_defaults(run=run_embed, show=show_embed)


def run_embed(args: argparse.Namespace) -> dict:
    from ..embeddings import EmbeddingJob, write_index
    from ..everything.outputs import output_names
    from ..io import remove_stale_parts

    on_ray = uses_ray(args)
    check_max_pixels(args)
    if args.input.is_dir():
        images = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif args.input.exists():
        images = [args.input]
    else:
        raise UsageError(f"input not found: {args.input}")
    if not images:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.input}")
    names = output_names(images)
    plan = {str(image): str(args.out / f"{names[image]}.npz") for image in images}
    remove_stale_parts(args.out, {Path(p).name for p in plan.values()})
    job = EmbeddingJob(predictor_spec(args, resolve=on_ray).load, plan, max_pixels=args.max_pixels)
    if on_ray:
        job.make_predictor()  # a bad checkpoint or export fails here, once
    batch = run_batch(job, list(plan), args)
    args.out.mkdir(parents=True, exist_ok=True)
    index = write_index(args.out, list(plan.values()))
    summary = batch.report(per_worker=on_ray, embedded=batch.done, index=str(index))
    return summary


def show_embed(summary: dict) -> None:
    """The summary line; unreadable images, or a stopped run, exit with 2."""
    from .everything import show_everything

    show_everything(summary)
