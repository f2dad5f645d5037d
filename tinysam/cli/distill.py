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
    demo.add_argument("--out", type=Path, default=Path("tinysam-distill-demo"), help="folder")
    demo.add_argument("--steps", type=int, default=300, help="student training steps (300)")
    demo.add_argument("--teacher-steps", type=int, default=800, help="teacher steps (800)")
    demo.add_argument("--image-size", type=int, default=128, help="model input size (128)")
    demo.add_argument("--train-images", type=int, default=48, help="training images (48)")
    demo.add_argument("--eval-images", type=int, default=12, help="held-out images (12)")
    demo.add_argument("--prompts", type=int, default=16, help="prompts per image (16)")
    demo.add_argument("--lr", type=float, default=5e-4, help="learning rate (5e-4)")
    demo.add_argument("--seed", type=int, default=0, help="data, teacher and first student")
    demo.add_argument(
        "--seeds", type=int, default=1, help="students per variant: seeds SEED, SEED+1, ... (1)"
    )
    demo.add_argument(
        "--data",
        choices=("plain", "rich"),
        default="plain",
        help="synthetic images: plain shapes, or rich (thin parts, textures, scales) (plain)",
    )
    demo.add_argument(
        "--no-hard-prompts", action="store_true", help="plain point prompts, no hard sampling"
    )
    demo.add_argument(
        "--no-hard-mask-weighting", action="store_true", help="weight every mask equally"
    )
    demo.add_argument(
        "--ablation", action="store_true", help="all four on/off combinations, one table"
    )
    demo.add_argument("--threads", type=int, help="CPU threads (default: torch's)")

    distill.set_defaults(run=run_distill)


def run_distill(args: argparse.Namespace) -> dict | None:
    """Run a ``tinysam distill`` command; returns the JSON summary (None when it printed)."""
    if args.distill_command == "cache-teacher":
        return _cache_teacher(args)
    if args.distill_command == "train":
        return _train(args)
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


def _demo(args) -> None:
    import torch

    from ..distill.demo import DemoOptions, results_table, run_demo
    from .common import UsageError

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    for name in ("steps", "teacher_steps", "train_images", "eval_images", "prompts", "seeds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    options = DemoOptions(
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
    from ..distill.ablation import plot_summary, summarize, summary_table
    from ..io import atomic_write, write_json_output

    summary = summarize(results)
    table = summary_table(summary)
    with atomic_write(args.out / "ablation.md", "w") as f:
        f.write(table + "\n")
    write_json_output(args.out / "summary.json", "demo-ablation", {"variants": summary})
    plot = plot_summary(summary, args.out / "ablation.png")
    print(table)
    print(f"\n(per run: {args.out / 'results.json'}; summary.json, ablation.md and {plot.name})")
    return None
