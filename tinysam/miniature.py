"""``tinysam distill miniature``: the paper's three claims on the demo's synthetic data, in one
folder, with the numbers that say whether each is shown at this scale. It composes three
features (distillation, everything-mode evaluation, quantization), so it sits above them.

1. distillation: the demo's four variants (hard prompt sampling, hard mask weighting) over
   several seeds, with paired intervals (``tinysam.distill.ablation``);
2. the hierarchical everything mode: dense against hierarchical prompting with the demo's
   teacher and its TinySAM student on the held-out images, decoder prompts and time beside
   recall of the ground-truth objects at IoU 0.5 and their mean best IoU;
3. Q-TinySAM: the TinySAM student of the first seed quantized (W8A8, ``tinysam quantize``'s
   search on a few training images), its agreement with the float student and its IoU with the
   ground truth, float against simulated W8A8 and the int8 ONNX model.

Every stage keeps a record of the settings that made it (as the demo's do), so a rerun
reuses what matches and an interrupted run goes on where it stopped. ``miniature.md`` and
``miniature.json`` gather the tables, the verdicts, the time each stage took and the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .distill.demo import (
    VARIANTS,
    DemoOptions,
    finish_stage,
    run_demo,
    run_name,
    stage_done,
    start_stage,
)
from .io import atomic_write, check_recorded_text, check_replaceable, write_json_output

MARKDOWN, SUMMARY = "miniature.md", "miniature.json"
TINYSAM = (True, True)  # the student the hierarchical and quantization stages use
# The demo's held-out images are 96 x 128: a 16 x 16 grid (8 pixels apart) covers them as
# the paper's 32 x 32 covers 1024-pixel images; the hierarchical first round is 4 x 4.
POINTS_PER_SIDE = 16
# Targets from the issue that set this demo's goals.
TEACHER_TARGET = {"box": 0.85, "point": 0.7}
# A device is "shown" when it keeps the masks: within this much of its baseline's IoU.
SAME_QUALITY = 0.02
MIN_SAVING = 0.25  # the hierarchical mode's decoder prompts saved, at least


@dataclass
class MiniatureOptions:
    demo: DemoOptions
    points_per_side: int = POINTS_PER_SIDE
    calibration_images: int = 4  # training images the quantizer's search sees
    quant_rows: int = 512  # sampled positions per layer (tinysam quantize --rows)
    quant_candidates: int = 100  # grid points per scale search (the paper's)
    quant_rounds: int = 3
    # Everything-mode thresholds for small models: their logits peak near 3 (SAM's beyond
    # 10), so SAM's 0.88 / 0.95 and the covered-area 8.5 keep nothing. Picked on training
    # images with a teacher trained like the demo's (never on the held-out images).
    filters: dict = field(
        default_factory=lambda: {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.3}
    )
    high_score_thresh: float = 1.0


def run_miniature(
    options: MiniatureOptions, progress: bool = True, say: Callable[[str], None] = print
) -> dict:
    """All three stages into ``options.demo.out``; returns what ``miniature.json`` holds."""
    from .distill.ablation import check_outputs, summarize, write_outputs
    from .perf import cpu_kind

    out = Path(options.demo.out)
    check_replaceable([out / SUMMARY])
    check_recorded_text(out / MARKDOWN, out / SUMMARY)
    check_outputs(out)  # the ablation's
    started = time.perf_counter()
    variants = list(VARIANTS)
    results = run_demo(options.demo, variants, progress=progress, say=say)
    ablation = summarize(results)
    ablation_table, plot = write_outputs(out, ablation)
    teacher_gt = {kind: results[0].after[kind].teacher_gt for kind in ("point", "box")}
    everything = _everything_stage(options, progress, say)
    quantized = _quantization_stage(options, progress, say)
    document = {
        "cpu": cpu_kind(),
        "options": {**asdict(options), "demo": {**asdict(options.demo), "out": str(out)}},
        "teacher_gt_iou": teacher_gt,
        "ablation": ablation,
        "everything": everything,
        "quantization": quantized,
        "seconds": _stage_seconds(options, everything, quantized, time.perf_counter() - started),
    }
    document["markdown"] = miniature_markdown(document, ablation_table, plot.name)
    write_json_output(out / SUMMARY, "demo-miniature", document)
    with atomic_write(out / MARKDOWN, "w") as f:
        f.write(document["markdown"])
    return document


def _student_path(options: MiniatureOptions) -> Path:
    demo = options.demo
    return Path(demo.out) / f"seed_{demo.seed}" / run_name(*TINYSAM) / "student.pt"


def _demo_settings(options: MiniatureOptions) -> dict:
    return {k: v for k, v in asdict(options.demo).items() if k != "out"}


def _stored_stage(folder: Path, settings: dict, key: str, valid: Callable[[object], bool]):
    """A finished stage's stored results (its record's ``key``) when they were made with
    ``settings`` and pass ``valid``; otherwise the folder is claimed (cleared if ours) for the
    stage to be made again, and None."""
    import shutil

    made = stage_done(folder, settings)
    if made is not None:
        try:
            if valid(made[key]):
                return made[key]
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        shutil.rmtree(folder)  # ours, finished, but not readable: made again
    start_stage(folder, settings)
    return None


def _everything_ok(models) -> bool:
    from .evaluation.hierarchical_vs_dense import ImageComparison

    for model in models.values():
        float(model["seconds"])
        for row in model["rows"]:
            ImageComparison(**row)  # every field, no other
            numbers = [v for name, v in row.items() if name != "image"]
            if not all(isinstance(v, (int, float)) and v >= 0 for v in numbers):
                return False
    return bool(models)


def _quantization_ok(result) -> bool:
    numbers = [v for kinds in result["gt_iou"].values() for v in kinds.values()]
    numbers += [v for kinds in result["agreement_with_float"].values() for v in kinds.values()]
    return (
        "float" in result["gt_iou"]
        and all(isinstance(v, float) and 0 <= v <= 1 for v in numbers)
        and float(result["seconds"]) >= 0
    )


def _everything_stage(options: MiniatureOptions, progress: bool, say) -> dict:
    """Dense against hierarchical, teacher and student; rows per image, kept in the record."""
    from .distill.models import SMALL, build_student, build_teacher
    from .evaluation.hierarchical_vs_dense import compare_everything
    from .predictor import SamPredictor

    demo = options.demo
    folder = Path(demo.out) / "everything"
    settings = {
        "demo": _demo_settings(options),
        "points_per_side": options.points_per_side,
        "filters": options.filters,
        "high_score_thresh": options.high_score_thresh,
    }
    stored = _stored_stage(folder, settings, "models", _everything_ok)
    if stored is not None:
        say(f"everything mode: reusing {folder}")
        return stored
    held_out = Path(demo.out) / "data" / "eval"
    images = sorted(held_out.glob("*.jpg"), key=lambda p: p.name)
    truth = {str(p): _objects(p.with_suffix(".json")) for p in images}
    models = {
        "teacher": build_teacher(SMALL, demo.image_size, Path(demo.out) / "teacher" / "student.pt"),
        "TinySAM student": build_student(SMALL, demo.image_size, _student_path(options)),
    }
    results: dict[str, dict] = {}
    for name, model in models.items():
        say(f"everything mode, dense and hierarchical: the {name} on {len(images)} images")
        start = time.perf_counter()
        rows = compare_everything(
            SamPredictor(model.eval()),
            images,
            options.points_per_side,
            progress=progress,
            ground_truth=truth,
            high_score_thresh=options.high_score_thresh,
            **options.filters,
        )
        results[name] = {
            "rows": [asdict(r) for r in rows],
            "seconds": time.perf_counter() - start,
        }
    finish_stage(folder, settings, models=results)
    return results


def _objects(path: Path) -> list[dict]:
    from .distill.data import read_annotations

    return [a["segmentation"] for a in read_annotations(path.read_bytes(), str(path))]


def _quantization_stage(options: MiniatureOptions, progress: bool, say) -> dict:
    """W8A8 of the TinySAM student with ``tinysam quantize``'s pipeline; agreement with the
    float student (the report's grid prompts) and IoU with the ground truth."""
    from importlib.util import find_spec

    from tqdm.auto import tqdm

    from .distill.evaluate import ground_truth_iou
    from .distill.models import SMALL, build_student
    from .predictor import SamPredictor
    from .quant.pipeline import QuantizeSettings, quantize
    from .quant.search import SearchConfig
    from .quant.store import load_quantized
    from .runtime import OnnxPredictor

    demo = options.demo
    folder = Path(demo.out) / "qtinysam"
    settings = {
        "demo": _demo_settings(options),
        "calibration_images": options.calibration_images,
        "rows": options.quant_rows,
        "candidates": options.quant_candidates,
        "rounds": options.quant_rounds,
    }
    stored = _stored_stage(folder, settings, "quantization", _quantization_ok)
    if stored is not None:
        say(f"Q-TinySAM: reusing {folder}")
        return stored
    train = sorted((Path(demo.out) / "data" / "train").glob("*.jpg"), key=lambda p: p.name)
    held_out = Path(demo.out) / "data" / "eval"
    student = build_student(SMALL, demo.image_size, _student_path(options)).eval()
    # The int8 ONNX row needs tinysam[export,onnx]; without them the stage still runs.
    exportable = all(find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    if not exportable:
        say("Q-TinySAM: no int8 ONNX model (pip install 'tinysam[export,onnx]' for one)")
    quant_settings = QuantizeSettings(
        onnx=exportable,
        rows=options.quant_rows,
        seed=demo.seed,
        search=SearchConfig(candidates=options.quant_candidates, rounds=options.quant_rounds),
    )
    say(f"Q-TinySAM: quantizing the TinySAM student on {options.calibration_images} images")
    start = time.perf_counter()
    summary = quantize(
        student,
        train[: options.calibration_images],
        folder / "model",
        quant_settings,
        model_type=SMALL,
        test_paths=sorted(held_out.glob("*.jpg"), key=lambda p: p.name),
        progress=lambda items, what: tqdm(items, desc=what, disable=not progress),
        say=lambda line: say(f"Q-TinySAM: {line}"),
    )
    seconds = time.perf_counter() - start
    predictors = {
        "float": SamPredictor(student),
        "W8A8 simulated": SamPredictor(load_quantized(folder / "model")),
    }
    if "onnx" in summary:
        predictors["int8 ONNX Runtime"] = OnnxPredictor(Path(summary["onnx"]))
    say("Q-TinySAM: IoU with the ground truth, float and quantized")
    truth = ground_truth_iou(predictors, held_out, seed=demo.seed)
    agreement = {"float": {"point": 1.0, "box": 1.0}, **summary["agreement"]}
    result = {"agreement_with_float": agreement, "gt_iou": truth, "seconds": seconds}
    finish_stage(folder, settings, quantization=result)
    return result


def _recorded_seconds(folder: Path) -> float | None:
    """The seconds a finished stage's record gives (None for records without them)."""
    import json

    from .distill.demo import RECORD

    try:
        return float(json.loads((folder / RECORD).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stage_seconds(
    options: MiniatureOptions, everything: dict, quantized: dict, this_run: float
) -> dict:
    """Seconds each stage took when it was made; a rerun reuses stages, so ``this_run`` (this
    invocation's wall time) can be much less than their sum."""
    demo = options.demo
    out = Path(demo.out)
    students = [
        _recorded_seconds(out / f"seed_{seed}" / run_name(*variant))
        for seed in range(demo.seed, demo.seed + demo.seeds)
        for variant in VARIANTS
    ]  # this run's students only (the folder may hold more seeds from another run)
    return {
        "teacher training": _recorded_seconds(out / "teacher"),
        "student distillation (all seeds and variants)": sum(s or 0.0 for s in students),
        "everything mode": sum(m["seconds"] for m in everything.values()),
        "quantization": quantized["seconds"],
        "this run": this_run,
    }


def _verdict(shown: bool) -> str:
    return "**shown at this scale**" if shown else "**not shown at this scale**"


def teacher_section(teacher_gt: dict) -> str:
    met = all(teacher_gt[k] >= TEACHER_TARGET[k] for k in TEACHER_TARGET)
    return (
        "## The teacher\n\n"
        f"Mean IoU with the ground truth on the held-out images: one point "
        f"{teacher_gt['point']:.3f} (target {TEACHER_TARGET['point']}), box "
        f"{teacher_gt['box']:.3f} (target {TEACHER_TARGET['box']}): "
        + ("target met." if met else "target **not** met: a weaker teacher than asked for.")
    )


def ablation_section(ablation: dict, table: str, plot: str) -> str:
    from .distill.ablation import CONFIDENCE, KINDS

    lines = ["## Distillation: hard prompt sampling and hard mask weighting (Table 3)", "", table]
    lines += ["", f"![ablation]({plot})", ""]
    helps, intervals = False, 0
    for name, kinds in ablation.items():
        for kind in KINDS:
            difference = kinds[kind]["student_gt"].get("difference")
            if difference is None:  # the baseline
                continue
            helps = helps or difference["verdict"] == "helps beyond seed noise"
            intervals += 1
            lines.append(
                f"- {name}, {kind} prompts: student-GT IoU {difference['mean']:+.3f} against "
                f"plain distillation, {difference['verdict']}"
            )
    lines += [
        "",
        f"A distillation device improves the student beyond seed noise: {_verdict(helps)}. "
        f"Were these {intervals} intervals (95% each) independent, at least one would exclude "
        f"zero by chance alone {1 - CONFIDENCE**intervals:.0%} of the time: one such interval "
        "is weak evidence.",
    ]
    return "\n".join(lines)


def everything_section(everything: dict) -> str:
    from .evaluation.hierarchical_vs_dense import ImageComparison, modes_table, total

    rows = {
        name: [ImageComparison(**r) for r in model["rows"]] for name, model in everything.items()
    }
    lines = ["## Hierarchical everything mode", "", modes_table(rows)]
    for name, model_rows in rows.items():
        t = total(model_rows)
        if not t.dense_prompts or not t.objects:
            continue
        saving = 1 - t.hierarchical_prompts / t.dense_prompts
        recall_change = (t.hierarchical_found - t.dense_found) / t.objects
        quality_change = (t.hierarchical_best_iou - t.dense_best_iou) / t.objects
        # The claim: about half the decoder work for nearly the same masks. A model that finds
        # nothing densely cannot show it.
        shown = (
            t.dense_found > 0
            and saving >= MIN_SAVING
            and min(recall_change, quality_change) >= -SAME_QUALITY
        )
        lines.append(
            f"- {name}: {saving:.0%} fewer decoder prompts, "
            f"{1 - t.hierarchical_seconds / max(t.dense_seconds, 1e-9):.0%} less time; "
            f"recall@0.5 {recall_change:+.3f}, mean best IoU {quality_change:+.3f} against "
            f"dense: {_verdict(shown)}"
        )
    return "\n".join(lines)


def quantization_section(quantized: dict) -> str:
    agreement, truth = quantized["agreement_with_float"], quantized["gt_iou"]
    lines = [
        "## Q-TinySAM (W8A8) of the TinySAM student",
        "",
        "| model | IoU with the float student, point / box | IoU with the ground truth, "
        "point / box |",
        "|---|---|---|",
    ]
    for name in truth:
        a = agreement.get(name, {})
        with_float = f"{a['point']:.3f} / {a['box']:.3f}" if a else "-"
        lines.append(
            f"| {name} | {with_float} | {truth[name]['point']:.3f} / {truth[name]['box']:.3f} |"
        )
    float_iou = truth["float"]
    # A student that finds nothing has no quality to keep.
    shown = min(float_iou.values()) > 0 and all(
        float_iou[kind] - iou[kind] <= SAME_QUALITY
        for name, iou in truth.items()
        if name != "float"
        for kind in ("point", "box")
    )
    lines += [
        "",
        f"8-bit keeps the float student's IoU with the ground truth (within {SAME_QUALITY}): "
        f"{_verdict(shown)}.",
    ]
    return "\n".join(lines)


def miniature_markdown(document: dict, ablation_table: str, plot: str) -> str:
    stages = {k: v for k, v in document["seconds"].items() if k != "this run" and v}
    seconds = ", ".join(f"{name} {value / 60:.1f} min" for name, value in stages.items())
    demo = document["options"]["demo"]
    head = (
        "# The method in miniature\n\n"
        f"{demo['seeds']} seeds, {demo['style']} synthetic data at {demo['image_size']} "
        f"pixels, CPU: {document['cpu']}. Time as each stage was made: {seconds} "
        f"(this run: {document['seconds']['this run'] / 60:.1f} min; a rerun reuses stages)."
    )
    sections = [
        head,
        teacher_section(document["teacher_gt_iou"]),
        ablation_section(document["ablation"], ablation_table, plot),
        everything_section(document["everything"]),
        quantization_section(document["quantization"]),
    ]
    return "\n\n".join(sections) + "\n"
