"""``tinysam distill demo``: the whole distillation pipeline, small enough for minutes on a CPU.

1. synthetic SA-1B-format data: training images and held-out evaluation images;
2. a small SAM-ViT teacher, first trained on the training images' ground truth (a random
   teacher has nothing to teach);
3. its embeddings cached as ``cache-teacher`` does for ViT-H;
4. a quarter-width TinyViT student distilled from the cache, its prompt encoder and mask
   decoder starting as copies of the teacher's (as MobileSAM's do of SAM's), with hard prompt
   sampling and hard mask weighting each on or off;
5. student-teacher and student-ground-truth mask IoU on the held-out images, before and after.

Every stage's output stays in OUT, each with a record of the settings that made it; a second
run reuses a stage (data, teacher, cache, each student) only where its record matches, so an
interrupted ablation goes on where it stopped. ``seeds`` distils every variant once per seed
(students ``seed``, ``seed + 1``, ...; the data and the teacher stay ``seed``'s), and
``tinysam.distill.ablation`` turns them into means, spreads and paired intervals.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ..io import (
    BROKEN,
    DONE,
    FOREIGN,
    ForeignFileError,
    check_replaceable,
    output_state,
    write_json_output,
)
from .data import SA1BDataset
from .evaluate import Agreement, evaluate_agreement
from .losses import LossWeights
from .models import SMALL, SMALL_TEACHER_LAYOUT, build_teacher, small_student, small_teacher
from .synthetic import write_synthetic_sa1b
from .teacher_cache import cache_teacher
from .trainer import LAST_FILE, STUDENT_FILE, Distiller, TrainConfig

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
    seeds: int = 1
    style: str = "plain"  # the synthetic data (see tinysam.distill.synthetic)


@dataclass
class DemoResult:
    name: str
    hard_prompts: bool
    hard_mask_weighting: bool
    before: dict[str, Agreement]
    after: dict[str, Agreement]
    final_loss: float
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> DemoResult:
        fields = dict(values)
        for when in ("before", "after"):
            fields[when] = {kind: Agreement(**a) for kind, a in values[when].items()}
        return cls(**fields)


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


RESULTS = "results.json"  # every run's before/after agreement, seed by seed
RECORD = "made_with.json"  # in each stage's folder: the settings that made it (and results)


def stage_done(folder: Path, settings: dict) -> dict | None:
    """The record of ``folder`` when it holds this stage finished with ``settings``, else
    None: a folder of ours made otherwise, interrupted or cut short is cleared to be made
    again. A folder with content but no record of ours is never touched:
    ``ForeignFileError``."""
    record = folder / RECORD
    state = output_state(record)
    if state == DONE:
        made = json.loads(record.read_text())
        same = made.get("settings") == json.loads(json.dumps(settings))
        if same and made.get("finished") is True:
            return made
    if state in (DONE, BROKEN):
        shutil.rmtree(folder)
        return None
    if state == FOREIGN or (folder.is_dir() and any(folder.iterdir())):
        raise ForeignFileError(
            f"{folder} exists and was not made by this demo (no {RECORD} of ours, e.g. an "
            "older version's); move it away or choose another --out"
        )
    return None


def start_stage(folder: Path, settings: dict) -> None:
    """Claim ``folder`` before writing in it, so an interrupted stage is known to be ours."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_output(folder / RECORD, "demo-stage", {"settings": settings, "finished": False})


def finish_stage(folder: Path, settings: dict, **results) -> None:
    document = {"settings": settings, "finished": True, **results}
    write_json_output(folder / RECORD, "demo-stage", document)
    # A finished stage is reused or made again, never resumed: its training state (3x the
    # model: weights and optimizer moments) would only take disk space.
    (folder / LAST_FILE).unlink(missing_ok=True)


def prepare(options: DemoOptions, progress: bool = True, say: Callable[[str], None] = print):
    """Data, the trained small teacher and its embedding cache, made once in ``options.out``.
    Returns (training data, evaluation data, teacher checkpoint, cache folder)."""
    out = Path(options.out)
    size = options.image_size
    shape = (size * 3 // 4, size)
    train, held_out = out / "data" / "train", out / "data" / "eval"
    data_settings = {
        "train_images": options.train_images,
        "eval_images": options.eval_images,
        "shape": list(shape),
        "seed": options.seed,
        "style": options.style,
    }
    if stage_done(out / "data", data_settings) is None:
        say(f"writing {options.train_images} + {options.eval_images} synthetic images")
        start_stage(out / "data", data_settings)
        write = partial(write_synthetic_sa1b, size=shape, style=options.style)
        write(train, options.train_images, seed=options.seed)
        write(held_out, options.eval_images, seed=options.seed + 1)
        finish_stage(out / "data", data_settings)
    teacher_path = out / "teacher" / STUDENT_FILE
    teacher_settings = {
        "layout": SMALL_TEACHER_LAYOUT,
        "data": data_settings,
        "image_size": size,
        "steps": options.teacher_steps,
        "lr": options.lr,
        "prompts_per_image": options.prompts_per_image,
    }
    if stage_done(out / "teacher", teacher_settings) is None:
        say(f"training the small teacher on the ground truth ({options.teacher_steps} steps)")
        start_stage(out / "teacher", teacher_settings)
        start = time.perf_counter()
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
        finish_stage(out / "teacher", teacher_settings, seconds=time.perf_counter() - start)
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
    """Distil one student per (hard prompt sampling, hard mask weighting) variant and seed;
    within a seed every variant starts from the same student and draws the same prompts.
    Returns before/after agreement for each, seed by seed; runs already made with the same
    settings are reused."""
    check_replaceable([Path(options.out) / RESULTS])  # refused now, not after the work
    train, held_out, teacher_path, cache = prepare(options, progress, say)
    size = options.image_size
    evaluation = SA1BDataset(held_out, size)
    teacher = build_teacher(SMALL, size, teacher_path)
    results = []
    shared = {k: v for k, v in asdict(options).items() if k not in ("out", "seeds", "seed")}
    for seed in range(options.seed, options.seed + options.seeds):
        before = None  # every variant of a seed starts from the same student
        for hard_prompts, hard_mask_weighting in variants:
            name = VARIANTS[hard_prompts, hard_mask_weighting]
            out = Path(options.out) / f"seed_{seed}" / run_name(hard_prompts, hard_mask_weighting)
            settings = {
                **shared,
                "data_seed": options.seed,
                "seed": seed,
                "hard_prompts": hard_prompts,
                "hard_mask_weighting": hard_mask_weighting,
            }
            made = stage_done(out, settings)
            stored = _stored_result(made) if made is not None else None
            if stored is not None:
                say(f"seed {seed}, {name}: reusing {out}")
                before = stored.before
                results.append(stored)
                continue
            if made is not None:  # our record, but no result we can read: made again
                shutil.rmtree(out)
            say(f"seed {seed}: distilling the student, {name} ({options.steps} steps)")
            start_stage(out, settings)
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
            config.seed = seed
            cached_teacher = build_teacher(SMALL, size, teacher_path, with_image_encoder=False)
            torch.manual_seed(seed)
            distiller = Distiller(small_student(size, seed=seed + 1), cached_teacher, config)
            if before is None:
                before = evaluate_agreement(distiller.student, teacher, evaluation, seed=seed)
            start = time.perf_counter()
            history = distiller.run(progress=progress)
            seconds = time.perf_counter() - start
            after = evaluate_agreement(distiller.student, teacher, evaluation, seed=seed)
            final_loss = sum(row["total"] for row in history[-10:]) / len(history[-10:])
            result = DemoResult(
                name, hard_prompts, hard_mask_weighting, before, after, final_loss, seed
            )
            finish_stage(out, settings, result=asdict(result), seconds=seconds)
            results.append(result)
    runs = [asdict(r) for r in results]
    write_json_output(Path(options.out) / RESULTS, "demo-results", {"runs": runs})
    return results


def _stored_result(made: dict) -> DemoResult | None:
    """The result a student's record holds, or None where it is missing or malformed."""
    try:
        result = DemoResult.from_dict(made["result"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    values = [getattr(a, m) for a in (*result.before.values(), *result.after.values())
              for m in ("student_teacher", "student_gt", "teacher_gt")]  # fmt: skip
    if not all(isinstance(v, float) and 0 <= v <= 1 for v in values):
        return None
    return result


def run_name(hard_prompts: bool, hard_mask_weighting: bool) -> str:
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
