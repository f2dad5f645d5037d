"""``tinysam distill``: cache-teacher, train, demo.

``train`` reads one YAML config (every key of ``TrainConfig``; ``--print-config`` writes the
defaults) with ``--set key=value`` overrides, and runs alone or under ``torchrun`` (the
RANK / WORLD_SIZE / LOCAL_RANK variables it sets are read; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from .common import Parser, add_ray_args, run_batch, uses_ray

TRAIN_EPILOG = """\
examples:
  tinysam distill train --print-config > run.yaml      # every key, with its default
  tinysam distill train run.yaml --set lr=2e-4 --set prompt_options.accumulate=true
  torchrun --nproc_per_node 8 -m tinysam.cli distill train run.yaml
  tinysam distill train run.yaml --resume              # go on from OUT/last.pt
"""


def register(sub) -> None:
    distill = sub.add_parser(
        "distill",
        help="distil a TinySAM student from a SAM teacher (cache-teacher, train, demo)",
        description=(
            "Full-stage knowledge distillation with hard prompt sampling and hard mask "
            "weighting (the TinySAM paper's training). Needs: pip install 'tinysam[train]'."
        ),
    )
    steps = distill.add_subparsers(dest="distill_command", required=True, parser_class=Parser)

    cache = steps.add_parser(
        "cache-teacher",
        help="store the teacher's image embeddings (fp16 shards + index), resumable",
        description=(
            "Run the teacher's image encoder once per image and store the embeddings in OUT "
            "(fp16 .npy shards with SHA-256 in index.json). An interrupted run resumes: "
            "finished shards are kept and their images skipped."
        ),
        epilog="example: tinysam distill cache-teacher --teacher vit_h "
        "--checkpoint sam_vit_h_4b8939.pth --data sa1b/ --out teacher-cache/",
    )
    cache.add_argument("--teacher", default="vit_h", help="vit_h (default), vit_l, vit_b, small")
    cache.add_argument(
        "--checkpoint",
        type=Path,
        help="teacher weights (default: the published SAM file, downloaded into the cache)",
    )
    cache.add_argument("--data", type=Path, required=True, help="SA-1B folder or .tar shard(s)")
    cache.add_argument("--out", type=Path, required=True, help="cache folder to write")
    cache.add_argument(
        "--image-size", type=int, default=1024, help="model input size (1024; small: any)"
    )
    cache.add_argument("--shard-size", type=int, default=64, help="embeddings per shard (64)")
    cache.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto)")
    cache.add_argument("--threads", type=int, help="CPU threads (per Ray worker with --ray)")
    add_ray_args(cache)
    cache.set_defaults(force=False)

    train = steps.add_parser(
        "train",
        help="train a student (one YAML config, --set overrides, torchrun-ready)",
        description=(
            "Train a student. CONFIG is a YAML file of TrainConfig keys (see --print-config); "
            "--set overrides any of them, nested ones with a dot. Writes OUT/last.pt "
            "(resumable, every checkpoint_every steps), OUT/student.pt (the weights, usable "
            "with every tinysam command), OUT/log.csv and OUT/tensorboard/."
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", type=Path, nargs="?", help="YAML config file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (VALUE read as YAML); repeatable",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue exactly from CHECKPOINT (default: OUT/last.pt)",
    )
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto)")
    train.add_argument(
        "--print-config", action="store_true", help="print the full config as YAML and exit"
    )

    demo = steps.add_parser(
        "demo",
        help="the whole pipeline on synthetic data with small models, in minutes on a CPU",
        description=(
            "Write synthetic SA-1B-format data, train a small SAM-ViT teacher on its ground "
            "truth, cache its embeddings, distil a quarter-width TinyViT student, and print "
            "student-teacher and student-ground-truth mask IoU on held-out images before and "
            "after. --ablation distils four students (hard prompt sampling and hard mask "
            "weighting each on and off) and prints the paper's Table 3 in miniature; with "
            "--seeds N, each variant N times, as mean +- std with paired 95%% intervals against "
            "plain distillation (OUT/ablation.md, summary.json, ablation.png). OUT keeps every "
            "stage with the settings that made it; a second run reuses what matches, so an "
            "interrupted run goes on where it stopped."
        ),
        epilog="example: tinysam distill demo --out demo/ --ablation",
    )
    add_demo_arguments(demo, "tinysam-distill-demo", seeds=1, data="plain")
    demo.add_argument(
        "--no-hard-prompts", action="store_true", help="plain point prompts, no hard sampling"
    )
    demo.add_argument(
        "--no-hard-mask-weighting", action="store_true", help="weight every mask equally"
    )
    demo.add_argument(
        "--ablation", action="store_true", help="all four on/off combinations, one table"
    )

    miniature = steps.add_parser(
        "miniature",
        help="the paper's three claims in miniature: distillation ablation over seeds, "
        "hierarchical everything mode, Q-TinySAM (one folder, about an hour on 2 cores)",
        description=(
            "Everything `demo --ablation` does (four variants x --seeds seeds, intervals, plot), "
            "then dense vs hierarchical everything mode with the teacher and the TinySAM "
            "student on the held-out images (decoder prompts, time, recall of the objects at "
            "IoU 0.5, mean best IoU), then Q-TinySAM: the TinySAM student quantized to W8A8 "
            "(tinysam quantize's search) and compared with the float student and the ground "
            "truth (simulated and int8 ONNX). Writes OUT/miniature.md and miniature.json with "
            "a verdict per claim, the time per stage and the CPU. Resumable: a rerun reuses "
            "every stage made with the same settings."
        ),
        epilog="example: tinysam distill miniature --out miniature/",
    )
    # The teacher that learned the demo's task best within ~10 minutes on 2 cores: more
    # images (no overfitting) and three times the demo's steps.
    add_demo_arguments(
        miniature, "tinysam-miniature", seeds=3, data="plain", teacher_steps=2400, train_images=400
    )
    miniature.add_argument(
        "--points-per-side", type=int, default=16, help="everything-mode grid (16)"
    )
    miniature.add_argument(
        "--calibration-images", type=int, default=4, help="quantizer calibration images (4)"
    )
    miniature.add_argument(
        "--quant-candidates", type=int, default=100, help="grid points per scale search (100)"
    )
    miniature.add_argument(
        "--quant-rows", type=int, default=512, help="sampled positions per layer (512)"
    )

    distill.set_defaults(run=run_distill)


def add_demo_arguments(
    parser, out: str, seeds: int, data: str, teacher_steps: int = 800, train_images: int = 48
) -> None:
    """The options ``demo`` and ``miniature`` share (the data, the teacher, the students)."""
    parser.add_argument("--out", type=Path, default=Path(out), help=f"folder ({out})")
    # DemoOptions' defaults (tinysam.distill.demo imports torch, too slow for --help; a test
    # keeps the two equal).
    for flag, kind, value, what in (
        ("--steps", int, 300, "student training steps"),
        ("--teacher-steps", int, teacher_steps, "teacher training steps"),
        ("--image-size", int, 128, "model input size"),
        ("--train-images", int, train_images, "training images"),
        ("--eval-images", int, 12, "held-out images"),
        ("--prompts", int, 16, "prompts per image"),
        ("--lr", float, 5e-4, "learning rate"),
        ("--seed", int, 0, "data, teacher and first student"),
    ):
        parser.add_argument(flag, type=kind, default=value, help=f"{what} ({value})")
    parser.add_argument(
        "--seeds",
        type=int,
        default=seeds,
        help=f"students per variant: seeds SEED, SEED+1, ... ({seeds})",
    )
    parser.add_argument(
        "--data",
        choices=("plain", "rich"),
        default=data,
        help=f"synthetic images: plain shapes, or rich (thin parts, textures, scales) ({data})",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")


def run_distill(args: argparse.Namespace) -> dict | None:
    """Run a ``tinysam distill`` command; returns the JSON summary (None when it printed)."""
    if args.distill_command == "cache-teacher":
        return _cache_teacher(args)
    if args.distill_command == "train":
        return _train(args)
    if args.distill_command == "miniature":
        return _miniature(args)
    return _demo(args)


def _cache_teacher(args) -> dict:
    from ..devices import torch_device
    from ..distill import pipeline

    device = torch_device(args.device)
    if not uses_ray(args):
        return pipeline.cache_teacher_here(
            args.data, args.out, args.teacher, args.checkpoint, args.image_size,
            args.shard_size, device, progress=sys.stderr.isatty(),
        )  # fmt: skip
    job, shards = pipeline.sharded_cache_job(
        args.data, args.out, args.teacher, args.checkpoint, args.image_size, args.shard_size,
        device,
    )  # fmt: skip
    if device.type == "cuda" and not args.gpus_per_worker:
        args.gpus_per_worker = 1
    return pipeline.finish_sharded_cache(job, run_batch(job, shards, args))


def _train(args) -> dict | None:
    from ..distill.config import read_config
    from ..distill.pipeline import train

    config = read_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
        return None
    return train(config, args.device, args.resume, progress=sys.stderr.isatty())


def _demo_options(args):
    """``DemoOptions`` from the shared arguments, checked (and the thread count set)."""
    import torch

    from ..distill.demo import DemoOptions
    from .common import UsageError

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    for name in ("steps", "teacher_steps", "train_images", "eval_images", "prompts", "seeds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size < 32 or args.image_size % 16:
        raise UsageError("--image-size must be a multiple of 16, at least 32")
    return DemoOptions(
        out=args.out,
        image_size=args.image_size,
        train_images=args.train_images,
        eval_images=args.eval_images,
        teacher_steps=args.teacher_steps,
        steps=args.steps,
        prompts_per_image=args.prompts,
        lr=args.lr,
        seed=args.seed,
        seeds=args.seeds,
        style=args.data,
    )


def _demo(args) -> None:
    from ..distill.demo import results_table, run_demo

    options = _demo_options(args)
    if args.ablation:
        variants = [(False, False), (True, False), (False, True), (True, True)]
    else:
        variants = [(not args.no_hard_prompts, not args.no_hard_mask_weighting)]

    def say(text: str) -> None:
        print(f"tinysam distill demo: {text}", file=sys.stderr, flush=True)

    if args.seeds > 1:
        from ..distill.ablation import check_outputs

        check_outputs(args.out)  # before an hour of work, not after it
    results = run_demo(options, variants, progress=sys.stderr.isatty(), say=say)
    if args.seeds == 1:
        print(results_table(results))
        print(f"\n(results also in {args.out / 'results.json'})")
        return None
    from ..distill.ablation import summarize, write_outputs

    table, plot = write_outputs(args.out, summarize(results))
    print(table)
    print(f"\n(per run: {args.out / 'results.json'}; summary.json, ablation.md and {plot.name})")
    return None


def _miniature(args) -> None:
    from ..miniature import MARKDOWN, SUMMARY, MiniatureOptions, run_miniature
    from .common import UsageError, check_grid

    demo = _demo_options(args)
    check_grid(args.points_per_side, "--points-per-side")
    for name in ("calibration_images", "quant_candidates", "quant_rows"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.calibration_images > args.train_images:
        raise UsageError("--calibration-images must be at most --train-images")
    options = MiniatureOptions(
        demo,
        points_per_side=args.points_per_side,
        calibration_images=args.calibration_images,
        quant_rows=args.quant_rows,
        quant_candidates=args.quant_candidates,
    )

    def say(text: str) -> None:
        print(f"tinysam distill miniature: {text}", file=sys.stderr, flush=True)

    run_miniature(options, progress=sys.stderr.isatty(), say=say)
    print((args.out / MARKDOWN).read_text(encoding="utf-8"), end="")
    print(f"\n(all numbers in {args.out / SUMMARY})")
    return None
