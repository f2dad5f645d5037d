"""The demo's ablation over seeds: spreads, paired intervals, verdicts, the table and the plot
(made from results written by hand; the demo's own run is tested in test_distill_cli)."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from tinysam.distill.ablation import (
    plot_summary,
    summarize,
    summary_table,
    t_interval,
    verdict,
)
from tinysam.distill.demo import VARIANTS, DemoResult
from tinysam.distill.evaluate import Agreement
from tinysam.io import DONE, output_state


def _result(variant, seed, point, box=0.5):
    after = {
        "point": Agreement(point, point / 2, 0.9, 10),
        "box": Agreement(box, box / 2, 0.9, 10),
    }
    before = {kind: Agreement(0.1, 0.1, 0.9, 10) for kind in after}
    return DemoResult(VARIANTS[variant], *variant, before, after, 0.0, seed)


def test_the_interval_is_students_t_over_paired_differences():
    low, high = t_interval([0.1, 0.2, 0.3])
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, 2 df) * s / sqrt(n)
    assert low == pytest.approx(0.2 - half) and high == pytest.approx(0.2 + half)
    assert t_interval([0.4]) is None
    assert verdict((0.01, 0.03)) == "helps beyond seed noise"
    assert verdict((-0.03, -0.01)) == "hurts beyond seed noise"
    assert verdict((-0.01, 0.03)) == "within seed noise"
    assert verdict(None) == "one seed: no interval"


def test_variants_are_paired_with_the_baseline_seed_by_seed():
    plain = {0: 0.50, 1: 0.60, 2: 0.40}  # seed noise far larger than the effects below
    results = [_result((False, False), s, v) for s, v in plain.items()]
    results += [_result((True, True), s, v + 0.03 + 0.001 * s) for s, v in plain.items()]
    results += [_result((True, False), s, v - 0.05 + 0.002 * s) for s, v in plain.items()]
    results += [_result((False, True), s, v + (0.1, -0.1, 0.0)[s]) for s, v in plain.items()]
    summary = summarize(results)
    both = summary["+ both (TinySAM)"]["point"]["student_teacher"]
    assert both["values"] == pytest.approx([0.53, 0.631, 0.432])
    assert both["mean"] == pytest.approx(0.531)
    assert both["std"] == pytest.approx(0.0995, abs=1e-4)  # the spread across seeds is wide
    # ... but paired, the +0.03 stands out of it
    assert both["difference"]["mean"] == pytest.approx(0.031)
    assert both["difference"]["verdict"] == "helps beyond seed noise"
    hard_prompts = summary["+ hard prompt sampling"]["point"]["student_teacher"]
    assert hard_prompts["difference"]["verdict"] == "hurts beyond seed noise"
    weighting = summary["+ hard mask weighting"]["point"]["student_teacher"]
    assert weighting["difference"]["verdict"] == "within seed noise"
    assert "difference" not in summary["plain distillation"]["point"]["student_teacher"]
    assert summary["plain distillation"]["seeds"] == [0, 1, 2]

    table = summary_table(summary).splitlines()
    assert len(table) == 2 + 4 * 2  # a row per variant and prompt kind
    row = next(line for line in table if line.startswith("| + both (TinySAM) | point"))
    assert "0.531 ± 0.100" in row and "+0.031 [" in row and "helps beyond seed noise" in row


def test_the_plot_is_a_png_with_error_bars(tmp_path):
    results = [_result(v, s, 0.4 + 0.1 * s) for v in VARIANTS for s in range(3)]
    path = plot_summary(summarize(results), tmp_path / "ablation.png")
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 600
    assert output_state(path) == DONE  # marked as ours: a rerun may replace it
