"""The demo's ablation over seeds: mean and spread of each variant, and whether each device
(hard prompt sampling, hard mask weighting) helps beyond the noise between seeds.

Every variant is distilled once per seed from the same data and teacher, and seed ``s`` gives
every variant the same student initialisation and prompt draws, so the variants of one seed
form a pair: the difference to the plain baseline is taken seed by seed, and its 95%
confidence interval is Student's t over those differences (``n - 1`` degrees of freedom).
An interval that excludes zero is called an effect; one that straddles it, seed noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

METRICS = {"student_teacher": "student-teacher IoU", "student_gt": "student-GT IoU"}
TABLE, SUMMARY, PLOT = "ablation.md", "summary.json", "ablation.png"
KINDS = ("point", "box")
BASELINE = (False, False)
CONFIDENCE = 0.95


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_interval(differences: Sequence[float]) -> tuple[float, float] | None:
    """The ``CONFIDENCE`` interval of the mean of paired differences (None for one seed)."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return None
    mean, std = _mean_std(differences)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def verdict(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "one seed: no interval"
    low, high = interval
    if low > 0:
        return "helps beyond seed noise"
    if high < 0:
        return "hurts beyond seed noise"
    return "within seed noise"


def summarize(results: Sequence) -> dict:
    """``{variant name: {kind: {metric: {...}}}}`` from ``DemoResult``s of several seeds:
    per-seed values, mean, std, and (not for the baseline) the paired difference to it with
    its interval and verdict."""
    by_variant: dict[tuple[bool, bool], dict[int, object]] = {}
    names = {}
    for result in results:
        key = (result.hard_prompts, result.hard_mask_weighting)
        by_variant.setdefault(key, {})[result.seed] = result
        names[key] = result.name
    baseline = by_variant.get(BASELINE, {})
    summary = {}
    for key, runs in by_variant.items():
        seeds = sorted(runs)
        entry = {"seeds": seeds}
        for kind in KINDS:
            entry[kind] = {}
            for metric in METRICS:
                values = [getattr(runs[s].after[kind], metric) for s in seeds]
                mean, std = _mean_std(values)
                row = {"values": values, "mean": mean, "std": std}
                paired = [s for s in seeds if s in baseline]
                if key != BASELINE and paired:
                    diffs = [
                        values[seeds.index(s)] - getattr(baseline[s].after[kind], metric)
                        for s in paired
                    ]
                    interval = t_interval(diffs)
                    row["difference"] = {
                        "values": diffs,
                        "mean": _mean_std(diffs)[0],
                        "interval": list(interval) if interval else None,
                        "verdict": verdict(interval),
                    }
                entry[kind][metric] = row
        summary[names[key]] = entry
    return summary


def _cell(row: dict) -> str:
    std = "" if math.isnan(row["std"]) else f" ± {row['std']:.3f}"
    return f"{row['mean']:.3f}{std}"


def _difference(row: dict) -> str:
    difference = row.get("difference")
    if difference is None:
        return "—"
    interval = difference["interval"]
    span = "" if interval is None else f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return f"{difference['mean']:+.3f}{span}"


def summary_table(summary: dict) -> str:
    """Markdown: mean ± std over seeds, and the paired difference to plain distillation
    with its 95% interval, for each variant, prompt kind and metric."""
    lines = [
        "| variant | prompts | seeds | student-teacher IoU | vs plain [95% CI] "
        "| student-GT IoU | vs plain [95% CI] | verdict (student-teacher, student-GT) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        for kind in KINDS:
            rows = entry[kind]
            verdicts = [rows[m].get("difference", {}).get("verdict", "baseline") for m in METRICS]
            lines.append(
                f"| {name} | {kind} | {len(entry['seeds'])} "
                f"| {_cell(rows['student_teacher'])} | {_difference(rows['student_teacher'])} "
                f"| {_cell(rows['student_gt'])} | {_difference(rows['student_gt'])} "
                f"| {', '.join(verdicts)} |"
            )
    return "\n".join(lines)


def plot_summary(summary: dict, path: str | Path) -> Path:
    """A PNG: per prompt kind, each variant's mean IoU (bars) with ± std error bars and its
    per-seed values (dots), student-teacher and student-GT side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(
            "the ablation plot needs matplotlib: pip install 'tinysam[eval]'"
        ) from err
    import numpy as np

    from ..io import save_png

    names = list(summary)
    figure, axes = plt.subplots(1, len(KINDS), figsize=(11, 4.2), sharey=True)
    width = 0.38
    for axis, kind in zip(axes, KINDS):
        for offset, (metric, label) in zip((-width / 2, width / 2), METRICS.items()):
            means = [summary[n][kind][metric]["mean"] for n in names]
            stds = [summary[n][kind][metric]["std"] for n in names]
            stds = [0.0 if math.isnan(s) else s for s in stds]
            xs = [i + offset for i in range(len(names))]
            axis.bar(xs, means, width, yerr=stds, capsize=4, label=label, alpha=0.8)
            for x, name in zip(xs, names):
                values = summary[name][kind][metric]["values"]
                axis.plot([x] * len(values), values, "k.", markersize=4)
        axis.set_title(f"{kind} prompts")
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean mask IoU (held-out), ± std over seeds")
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.set_dpi(110)
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    path = Path(path)
    save_png(pixels, path)  # marked as ours, like every PNG we write
    return path


def check_outputs(out: str | Path) -> None:
    """Refuse (``ForeignFileError``) to start where an ablation output path holds a file this
    package did not write: the JSON and PNG carry our mark; the table is ours when it is
    the one our summary recorded."""
    from ..io import check_recorded_text, check_replaceable

    out = Path(out)
    check_replaceable([out / SUMMARY, out / PLOT])
    check_recorded_text(out / TABLE, out / SUMMARY)


def write_outputs(out: str | Path, summary: dict) -> tuple[str, Path]:
    """The table (``ablation.md``), ``summary.json`` and the plot in ``out``; returns the
    table and the plot's path. Call ``check_outputs`` first."""
    from ..io import atomic_write, write_json_output

    out = Path(out)
    table = summary_table(summary)
    write_json_output(out / SUMMARY, "demo-ablation", {"markdown": table, "variants": summary})
    with atomic_write(out / TABLE, "w") as f:
        f.write(table + "\n")
    return table, plot_summary(summary, out / PLOT)
