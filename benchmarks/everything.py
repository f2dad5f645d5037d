"""Everything mode, dense vs hierarchical, fast many-prompt decoder vs the plain decoder.

For each mode the table gives the prompts sent to the decoder, the time split into encoder /
decoder / post-processing, and the masks kept. The baseline ("plain") is the same generator
with the many-prompt decoder switched off, measured in the same run; the authors' code took
162 s for dense 32x32 on this 770x769 image on the same kind of machine.

    python benchmarks/everything.py [--checkpoint PATH] [--pred-iou-thresh 0.88]
        [--stability-thresh 0.95] [--points-per-side 32] [--threads 2] [--skip-plain]
        [--post-masks 256 --post-size 1200x1800] [--memory-image PHOTO [--onnx-dir EXPORT]]
        [--precision bf16]

--precision bf16 adds dense everything mode in bf16 (the encoder, and the many-prompt decoder's
masks where the CPU has bf16 arithmetic) against the fp32 fast row of the same run, with the
share of fp32's masks that bf16 finds again (mask IoU >= 0.9).

--memory-image runs ``tinysam everything`` on that image (dense, then hierarchical), each in
its own process, and prints each run's peak resident memory (the kernel's count for the child:
``os.wait4``) against the 1 GiB goal: on torch, and with --onnx-dir also on ONNX Runtime,
OpenVINO and auto (its one-time backend choice is made before it is measured).

The last table is the post-processing of masks that are all kept (thresholds 0): stability
scores, boxes and RLE of each mask at the image's size, the reference's way (upscale every
mask's logits, ``upscale_logits``) against the low-res cells (``everything.upscaled``), on
mask-like logits (smooth blobs with wavy edges, as trained decoders make; random weights make
pixel noise instead, whose RLE is as long as the mask and goes the reference's way).

Without --checkpoint a seeded random vit_t is used: timings do not depend on the weights, but
how many prompts pass the IoU filter (and so how many masks are made) does.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from tinysam import (
    SamAutomaticMaskGenerator,
    SamHierarchicalMaskGenerator,
    SamPredictor,
    build_sam_vit_t,
)
from tinysam.everything.mask_ops import (
    batched_mask_to_box,
    calculate_stability_score,
    mask_to_rle,
)
from tinysam.everything.upscaled import UpscaledMasks
from tinysam.io import load_image
from tinysam.masks import mask_iou
from tinysam.perf import bf16_is_fast
from tinysam.predictor_base import DEFAULT_MANY_PROMPTS
from tinysam.transforms import ResizeLongestSide, upscale_logits

IMAGE = Path(__file__).resolve().parents[1] / "assets" / "picture1.jpg"


def make_generator(generator_class, predictor, args):
    extra = {}
    if generator_class is SamHierarchicalMaskGenerator:
        extra["high_score_thresh"] = args.high_score_thresh
    return generator_class(
        predictor,
        **extra,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh,
        output_mode="coco_rle",
    )


def run(generator_class, sam, image, args, fast: bool, precision: str = "fp32") -> dict:
    many_prompts = DEFAULT_MANY_PROMPTS if fast else 1 << 30
    predictor = SamPredictor(sam, many_prompts=many_prompts, precision=precision)
    generator = make_generator(generator_class, predictor, args)
    start = time.perf_counter()
    records = generator.generate(image)
    total = time.perf_counter() - start
    stats = generator.stats
    return {
        "prompts": stats.prompts,
        "rounds": stats.rounds,
        "encoder": stats.encoder_s,
        "decoder": stats.decoder_s,
        "post": total - stats.encoder_s - stats.decoder_s,
        "total": total,
        "masks": len(records),
        "covered": stats.covered_fraction,
        "records": records,
    }


def mask_like_logits(count: int, extent: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``count`` low-res logit maps (256x256) of elliptic blobs with wavy edges inside the
    image's part of the frame (``extent``), sloped ~3 per low-res pixel and clipped to
    [-30, 20] as SAM's are."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    out = torch.empty(count, 256, 256)
    for i in range(count):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor(extent)).tolist()
        radius = 4 + float(torch.rand(1, generator=g)) ** 2 * 80
        aspect = 0.5 + float(torch.rand(1, generator=g))
        angle = float(torch.rand(1, generator=g)) * math.pi
        dx, dy = xs - cx, ys - cy
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        distance = torch.sqrt((u * aspect) ** 2 + (v / aspect) ** 2)
        wave = 0.15 * radius * torch.sin(torch.atan2(v, u) * 5 + i)
        out[i] = ((radius + wave - distance) * 3).clamp(-30, 20)
    return out


def post_processing(low_res: torch.Tensor, size: tuple[int, int]) -> dict:
    """Seconds per mask of both ways (the generator's batches: 8 full-size maps at a time for
    the reference, 64 masks for the cells) and how many RLEs are identical."""
    input_size = ResizeLongestSide(1024).get_preprocess_shape(*size, 1024)
    geometry = UpscaledMasks(input_size, size)
    reference_rles, cells_rles = [], []
    start = time.perf_counter()
    for batch in low_res.split(8):
        logits = upscale_logits(batch[:, None], input_size, size)[:, 0]
        calculate_stability_score(logits, 0.0, 1.0)
        masks = logits > 0
        batched_mask_to_box(masks)
        reference_rles += mask_to_rle(masks)
    reference = time.perf_counter() - start
    start = time.perf_counter()
    for batch in low_res.split(64):
        cells = geometry.analyse(batch, [1.0, -1.0, 0.0])
        cells.count(1.0), cells.count(-1.0)
        segments = cells.segments(0.0)
        segments.boxes(len(batch))
        cells_rles += segments.rles(np.arange(len(batch)), (0, 0), size)
    fast = time.perf_counter() - start
    same = sum(a["counts"] == b["counts"] for a, b in zip(reference_rles, cells_rles))
    return {"reference": reference / len(low_res), "cells": fast / len(low_res), "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-thresh", type=float, default=0.95)
    parser.add_argument(
        "--high-score-thresh",
        type=float,
        default=8.5,
        help="hierarchical covered-area logit cutoff (random weights rarely reach 8.5)",
    )
    parser.add_argument("--skip-plain", action="store_true", help="only the fast path")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: add a bf16 row"
    )
    parser.add_argument("--post-masks", type=int, default=256, help="masks in the last table")
    parser.add_argument("--post-size", default="1200x1800", help="HxW of the last table's image")
    parser.add_argument("--post-only", action="store_true", help="only the last table")
    parser.add_argument(
        "--memory-image", type=Path, help="only the peak memory of `tinysam everything` on it"
    )
    parser.add_argument(
        "--onnx-dir",
        help="with --memory-image: also measure the onnx and openvino backends on this export, "
        "and auto (with --checkpoint: the export's encoder, torch's decoder)",
    )
    args = parser.parse_args()
    if args.memory_image is not None:
        memory_table(args)
        return
    if args.post_only:
        torch.set_num_threads(args.threads)
        post_table(args)
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = build_sam_vit_t(args.checkpoint)
    image = load_image(IMAGE)
    print(
        f"{IMAGE.name} {image.shape[1]}x{image.shape[0]}, {args.points_per_side} points per side, "
        f"pred_iou_thresh {args.pred_iou_thresh}, stability {args.stability_thresh}, "
        f"high_score_thresh {args.high_score_thresh}, "
        f"{args.threads} threads"
    )
    header = (
        f"{'mode':<13}{'decoder':<9}{'prompts':>9}{'encoder':>10}{'decoder':>10}"
        f"{'post':>9}{'total':>9}{'masks':>7}{'speedup':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, cls in (
        ("dense", SamAutomaticMaskGenerator),
        ("hierarchical", SamHierarchicalMaskGenerator),
    ):
        rows = {"fast": run(cls, sam, image, args, fast=True)}
        if not args.skip_plain:
            rows["plain"] = run(cls, sam, image, args, fast=False)
        for path, r in rows.items():
            speedup = rows["plain"]["total"] / r["total"] if "plain" in rows else float("nan")
            print(
                f"{name:<13}{path:<9}{r['prompts']:>9}{r['encoder']:>9.2f}s{r['decoder']:>9.2f}s"
                f"{r['post']:>8.2f}s{r['total']:>8.2f}s{r['masks']:>7}{speedup:>8.2f}x"
            )
        if name == "dense":
            dense_fast = rows["fast"]
        if name == "hierarchical":
            fast = rows["fast"]
            print(
                f"  hierarchical rounds (prompts): {fast['rounds']}, "
                f"covered by round 1: {fast['covered']:.0%}"
            )
    if args.precision == "bf16":
        bf16_line(sam, image, args, dense_fast)
    limit_line(sam, image, args, dense_fast)
    post_table(args)


def bf16_line(sam, image, args, fp32: dict) -> None:
    """Dense everything mode in bf16 against the fp32 fast row: time and masks found again."""
    from pycocotools import mask as coco_mask  # noqa: PLC0415

    bf16 = run(SamAutomaticMaskGenerator, sam, image, args, fast=True, precision="bf16")
    ours = [coco_mask.decode(r["segmentation"]) for r in bf16["records"]]
    found = 0
    for record in fp32["records"]:
        mask = coco_mask.decode(record["segmentation"])
        found += max((mask_iou(mask, o) for o in ours), default=0.0) >= 0.9
    print(
        f"dense bf16: encoder {bf16['encoder']:.2f}s decoder {bf16['decoder']:.2f}s "
        f"total {bf16['total']:.2f}s = {fp32['total'] / bf16['total']:.2f}x fp32's; "
        f"{bf16['masks']} masks, {found}/{fp32['masks']} of fp32's found again (IoU >= 0.9); "
        f"{'native' if bf16_is_fast() else 'emulated: no AVX512-BF16/AMX, decoder stays fp32'}"
    )


def flop_count(sam, image, args) -> tuple[float, float]:
    """GFLOP of the dense fast run as torch counts them (matrix products; a multiply-add is
    two): the encoder, and everything after it (the many-prompt decoder and the masks)."""
    from torch.utils.flop_counter import FlopCounterMode

    # Parameters that need no gradient: FlopCounterMode's module tracker rejects, under
    # no_grad, views of parameters that require one (they have no grad_fn).
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    predictor = SamPredictor(sam)
    generator = make_generator(SamAutomaticMaskGenerator, predictor, args)
    # torch counts baddbmm but not its in-place form, which the decoder's LayerNorms use.
    counted = {torch.ops.aten.baddbmm_: inplace_baddbmm_flops}
    with FlopCounterMode(display=False, custom_mapping=counted) as encoder:
        predictor.set_image(image)
    with FlopCounterMode(display=False, custom_mapping=counted) as everything:
        generator.generate(image)  # set_image is skipped: the same image
    return encoder.get_total_flops() / 1e9, everything.get_total_flops() / 1e9


def inplace_baddbmm_flops(self_shape, batch1_shape, batch2_shape, *args, **kwargs) -> int:
    """``baddbmm_``: a multiply-add per (batch, row, column, inner) index, as two FLOPs."""
    batch, rows, inner = batch1_shape
    return 2 * batch * rows * inner * batch2_shape[-1]


def limit_line(sam, image, args, dense_fast: dict) -> None:
    """The dense run against its own FLOPs over the machine's GEMM rate (torch.mm 2048^2)."""
    from tinysam.evaluation.limits import measure_limits
    from tinysam.perf import cpu_kind

    encoder, rest = flop_count(sam, image, args)
    rate = measure_limits(args.threads).fp32_gflops_torch
    ideal = (encoder + rest) / rate
    print(
        f"\ndense, fast decoder: {encoder:.1f} GFLOP encoder + {rest:.1f} GFLOP decoder and masks "
        f"({rest / dense_fast['prompts']:.3f} GFLOP a prompt); torch GEMM {rate:.0f} GFLOP/s "
        f"({cpu_kind()}, {args.threads} threads) -> ideal {ideal:.2f} s, measured "
        f"{dense_fast['total']:.2f} s = {ideal / dense_fast['total']:.0%} of the limit "
        f"({dense_fast['total'] / ideal:.1f}x off)"
    )


def memory_table(args) -> None:
    """Peak RSS of the whole command (model, image, encoder, decoder, files), one process per
    mode, so one run's heap does not count in the next."""
    from PIL import Image

    from tinysam.perf import cpu_kind

    width, height = Image.open(args.memory_image).size
    print(
        f"tinysam everything on {args.memory_image.name} ({width}x{height}), "
        f"{args.threads} threads, {cpu_kind()}"
    )
    print(f"{'backend':<10}{'mode':<14}{'seconds':>9}{'peak RSS':>12}{'of 1 GiB':>10}")
    backends = ["torch"] + (["onnx", "openvino", "auto"] if args.onnx_dir else [])
    for backend in backends:
        files = []
        if backend != "onnx" and backend != "openvino" and args.checkpoint:
            files += ["--checkpoint", args.checkpoint]
        if backend != "torch":
            files += ["--onnx-dir", args.onnx_dir]
        if backend == "auto":
            warm_up_choice(args, files)
        for mode in ("dense", "hierarchical"):
            seconds, peak = peak_rss(args, mode, ["--backend", backend, *files])
            print(f"{backend:<10}{mode:<14}{seconds:>8.1f}s{peak:>9.0f} MiB{peak / 1024:>9.0%}")


def peak_rss(args, mode: str, extra: list[str]) -> tuple[float, float]:
    """Seconds and peak resident MiB of one ``tinysam everything`` in its own process (the
    kernel's count for the child: ``os.wait4``)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "tinysam.cli", "everything", str(args.memory_image),
            "--out", out, "--mode", mode, "--threads", str(args.threads), *extra,
            "--points-per-side", str(args.points_per_side),
            "--pred-iou-thresh", str(args.pred_iou_thresh),
            "--stability-thresh", str(args.stability_thresh),
        ]  # fmt: skip
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"tinysam everything --mode {mode} {' '.join(extra)} failed")
    return seconds, usage.ru_maxrss / 1024  # kB -> MiB on Linux


def warm_up_choice(args, files: list[str]) -> None:
    """Let ``--backend auto`` make and cache its one-time choice before it is measured (the
    timing holds every candidate at once; later runs load the winner only)."""
    from tinysam.backends import load_predictor

    checkpoint = files[1] if files[0] == "--checkpoint" else None
    load_predictor("auto", checkpoint=checkpoint, onnx_dir=args.onnx_dir, threads=args.threads)


def post_table(args) -> None:
    size = tuple(int(v) for v in args.post_size.split("x"))
    input_size = ResizeLongestSide(1024).get_preprocess_shape(*size, 1024)
    low_res = mask_like_logits(args.post_masks, (input_size[0] / 4, input_size[1] / 4))
    r = post_processing(low_res, size)
    print(
        f"\npost-processing, every mask kept: {args.post_masks} mask-like logits at "
        f"{size[1]}x{size[0]}, {args.threads} threads"
    )
    header = f"{'way':<34}{'ms per mask':>12}{'x 3072 masks':>14}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    for name, key in (("reference (upscale every mask)", "reference"), ("low-res cells", "cells")):
        per = r[key]
        print(f"{name:<34}{per * 1e3:>12.2f}{per * 3072:>13.1f}s{r['reference'] / per:>8.2f}x")
    print(f"RLEs identical: {r['same']} of {args.post_masks}")


if __name__ == "__main__":
    main()
