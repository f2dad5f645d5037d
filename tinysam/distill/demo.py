"""``tinysam distill demo``: the whole distillation pipeline, small enough for minutes on a CPU.

1. synthetic SA-1B-format data: training images and held-out evaluation images;
2. a small SAM-ViT teacher, first trained on the training images' ground truth (a random
   teacher has nothing to teach);
3. its embeddings cached as ``cache-teacher`` does for ViT-H;
4. a quarter-width TinyViT student distilled from the cache, its prompt encoder and mask
   decoder starting as copies of the teacher's (as MobileSAM's do of SAM's), with hard prompt
   sampling and hard mask weighting each on or off;
5. student-teacher and student-ground-truth mask IoU on the held-out images, before and after.

Every stage's output stays in OUT; a second run reuses the data, the teacher and its cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..io import atomic_write
from .data import SA1BDataset
from .evaluate import Agreement, evaluate_agreement
from .losses import LossWeights
from .models import SMALL, build_teacher, small_student, small_teacher
from .synthetic import write_synthetic_sa1b
from .teacher_cache import cache_teacher
from .trainer import STUDENT_FILE, Distiller, TrainConfig

# (hard prompt sampling, hard mask weighting) -> the row's name; the paper's Table 3 in small.
VARIANTS = {
    (False, False): "plain distillation",
    (True, False): "+ hard prompt sampling",
    (False, True): "+ hard mask weighting",
    (True, True): "+ both (TinySAM)",
}


@dataclass
class DemoOptions:
    out: Path
    image_size: int = 128
    train_images: int = 48
    eval_images: int = 12
    teacher_steps: int = 800
    steps: int = 300
    prompts_per_image: int = 16
    lr: float = 5e-4
    seed: int = 0


@dataclass
class DemoResult:
    name: str
    hard_prompts: bool
    hard_mask_weighting: bool
    before: dict[str, Agreement]
    after: dict[str, Agreement]
    final_loss: float


def _config(options: DemoOptions, data: Path, out: Path, steps: int, **fields) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out=str(out),
        student=SMALL,
        teacher=SMALL,
        image_size=options.image_size,
        prompts_per_image=options.prompts_per_image,
        lr=options.lr,
        warmup_steps=max(1, steps // 20),
        epochs=10**6,
        max_steps=steps,
        checkpoint_every=10**9,
        log_every=10,
        seed=options.seed,
        **fields,
    )


def prepare(options: DemoOptions, progress: bool = True, say: Callable[[str], None] = print):
    """Data, the trained small teacher and its embedding cache, made once in ``options.out``.
    Returns (training data, evaluation data, teacher checkpoint, cache folder)."""
    out = Path(options.out)
    size = options.image_size
    shape = (size * 3 // 4, size)
    train, held_out = out / "data" / "train", out / "data" / "eval"
    if not (train / f"sa_{options.train_images - 1}.json").is_file():
        say(f"writing {options.train_images} + {options.eval_images} synthetic images")
        write_synthetic_sa1b(train, options.train_images, size=shape, seed=options.seed)
        write_synthetic_sa1b(held_out, options.eval_images, size=shape, seed=options.seed + 1)
    teacher_path = out / "teacher" / STUDENT_FILE
    if not teacher_path.is_file():
        say(f"training the small teacher on the ground truth ({options.teacher_steps} steps)")
        # Plain prompts, half of them boxes: measured to learn ~2x faster than the
        # distillation defaults, and this teacher only has to be better than random.
        config = _config(
            options,
            train,
            out / "teacher",
            options.teacher_steps,
            hard_prompts=False,
            box_rate=0.5,
        )
        Distiller(small_teacher(size), None, config).run(progress=progress)
        shutil.rmtree(out / "teacher_cache", ignore_errors=True)  # a new teacher's cache is stale
    cache = out / "teacher_cache"
    teacher = build_teacher(SMALL, size, teacher_path)
    dataset = SA1BDataset(train, size)
    names = [entry.name for entry in dataset.entries]
    say("caching the teacher's image embeddings")
    cache_teacher(teacher.image_encoder, dataset, cache, SMALL, shard_size=16, names=names)
    return train, held_out, teacher_path, cache


def run_demo(
    options: DemoOptions,
    variants: list[tuple[bool, bool]],
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> list[DemoResult]:
    """Distil one student per (hard prompt sampling, hard mask weighting) variant from the
    same initialisation and data; returns before/after agreement for each."""
    train, held_out, teacher_path, cache = prepare(options, progress, say)
    size = options.image_size
    evaluation = SA1BDataset(held_out, size)
    teacher = build_teacher(SMALL, size, teacher_path)
    before = None  # every variant starts from the same student
    results = []
    for hard_prompts, hard_mask_weighting in variants:
        name = VARIANTS[hard_prompts, hard_mask_weighting]
        say(f"distilling the student: {name} ({options.steps} steps)")
        out = Path(options.out) / _run_name(hard_prompts, hard_mask_weighting)
        config = _config(
            options,
            train,
            out,
            options.steps,
            teacher_cache=str(cache),
            hard_prompts=hard_prompts,
            losses=replace(LossWeights(), hard_mask_weighting=hard_mask_weighting),
            decoder_from_teacher=True,
        )
        cached_teacher = build_teacher(SMALL, size, teacher_path, with_image_encoder=False)
        torch.manual_seed(options.seed)
        distiller = Distiller(small_student(size), cached_teacher, config)
        if before is None:
            before = evaluate_agreement(distiller.student, teacher, evaluation, seed=options.seed)
        history = distiller.run(progress=progress)
        after = evaluate_agreement(distiller.student, teacher, evaluation, seed=options.seed)
        final_loss = sum(row["total"] for row in history[-10:]) / len(history[-10:])
        results.append(
            DemoResult(name, hard_prompts, hard_mask_weighting, before, after, final_loss)
        )
    with atomic_write(Path(options.out) / "results.json", "w") as f:
        json.dump([asdict(r) for r in results], f, indent=1)
    return results


def _run_name(hard_prompts: bool, hard_mask_weighting: bool) -> str:
    return f"student_hps{int(hard_prompts)}_hmw{int(hard_mask_weighting)}"


def results_table(results: list[DemoResult]) -> str:
    """A Markdown table: IoU of the student with the teacher and with the ground truth."""
    lines = [
        "| variant | prompts | student-teacher IoU before -> after "
        "| student-GT IoU before -> after | teacher-GT IoU |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for kind, after in result.after.items():
            before = result.before[kind]
            lines.append(
                f"| {result.name} | {kind} "
                f"| {before.student_teacher:.3f} -> {after.student_teacher:.3f} "
                f"| {before.student_gt:.3f} -> {after.student_gt:.3f} "
                f"| {after.teacher_gt:.3f} |"
            )
    return "\n".join(lines)
