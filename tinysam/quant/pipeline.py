"""The whole of ``tinysam quantize`` as one library call: calibrate on a few images, search the
scales, save the quantized model (tensors + JSON), export int8 ONNX, and report how close its
masks are to the float model's (``report.md`` / ``report.json``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write, load_image
from ..modeling import Sam
from ..perf import bounded_heap
from ..predictor import SamPredictor
from .calibrate import collect
from .model import prepare, set_deploy
from .report import agreement_table, layer_table, mask_agreement
from .search import SearchConfig, search_scales
from .store import check_architecture, load_quantized, save_quantized


@dataclass
class QuantizeSettings:
    """Everything ``quantize`` depends on besides the model and the images."""

    weight_bits: int = 8
    act_bits: int = 8
    prompts: int = 16  # grid prompts per calibration image
    rows: int = 1024  # sampled output positions per layer, over all calibration images
    seed: int = 0
    search: SearchConfig = field(default_factory=SearchConfig)
    onnx: bool = True  # the int8 ONNX export (8-bit models only)
    activations: str = "uint8"
    test_prompts: int = 16

    def __post_init__(self) -> None:
        for name in ("prompts", "rows", "test_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def rows_per_image(settings: QuantizeSettings, images: int) -> int:
    """Each image's share of the per-layer sample (the search's cost follows the total)."""
    return max(1, -(-settings.rows // max(1, images)))


def peak_memory_gb() -> float:
    """This process's peak resident memory so far (Linux and macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def quantize(
    sam: Sam,
    calib_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: QuantizeSettings,
    *,
    source: str = "",
    model_type: str | None = None,
    test_paths: Sequence[str | os.PathLike] | None = None,
    progress=None,
    say=None,
) -> dict:
    """Quantize ``sam`` into ``out``; returns a summary (layers, seconds, ONNX folder, mask
    agreement). ``test_paths`` default to the calibration images; ``progress(iterable, what)``
    wraps the long loops (e.g. tqdm); ``say(line)`` gets one line as each stage ends."""
    from ..checkpoint import detect_model_type

    out = Path(out)
    calib_paths = [Path(p) for p in calib_paths]
    test_is_calibration = test_paths is None
    test_paths = calib_paths if test_paths is None else [Path(p) for p in test_paths]
    progress = progress or (lambda iterable, what: iterable)
    say = say or (lambda line: None)
    model_type = model_type or detect_model_type(sam.state_dict()) or "vit_t"
    check_architecture(sam, model_type)  # before minutes of search, not at the reload
    weight_bits, act_bits = settings.weight_bits, settings.act_bits
    qmodel = prepare(sam, weight_bits, act_bits)

    start = time.perf_counter()
    per_image = rows_per_image(settings, len(calib_paths))
    records = collect(
        qmodel,
        (load_image(p) for p in calib_paths),  # one image in memory at a time
        prompts_per_image=settings.prompts,
        rows=per_image,
        seed=settings.seed,
        progress=lambda it: progress(it, "calibrate"),
    )
    collected = time.perf_counter() - start
    say(
        f"calibrate: {len(calib_paths)} images, {per_image} sampled positions per layer and "
        f"image, {collected:.0f} s, peak memory {peak_memory_gb():.1f} GiB"
    )
    results = search_scales(
        qmodel, records, settings.search, progress=lambda it: progress(it, "search")
    )
    del records
    searched = time.perf_counter() - start - collected
    improved = sum(r.searched_distance < r.minmax_distance for r in results)
    say(
        f"search: {len(results)} layers in {searched:.0f} s ({improved} better than min-max), "
        f"peak memory {peak_memory_gb():.1f} GiB"
    )
    info = {
        "source_checkpoint": source,
        "calibration": {
            "images": [p.name for p in calib_paths],
            "prompts_per_image": settings.prompts,
            "prompts": "one-point prompts from the everything grid (32x32)",
            "rows_per_layer": settings.rows,
            "rows_per_layer_and_image": per_image,
            "seed": settings.seed,
        },
        "search": asdict(settings.search),
        "seconds": {"calibration": round(collected, 1), "search": round(searched, 1)},
    }
    save_quantized(qmodel, out, model_type, **info)
    summary = {"out": str(out), "layers": len(results), **info["seconds"]}
    say(f"saved: {out / 'quantized.pt'}")

    onnx_dir = None
    if settings.onnx and weight_bits == 8 and act_bits == 8:
        from .onnx_int8 import export_quantized_onnx

        onnx_dir = out / "onnx"
        started = time.perf_counter()
        export_quantized_onnx(qmodel, onnx_dir, model_type, activations=settings.activations)
        summary["onnx"] = str(onnx_dir)
        say(f"onnx: int8 model in {onnx_dir} ({time.perf_counter() - started:.0f} s)")

    del qmodel  # the report reloads what was saved
    # Report: the model as saved and reloaded (what users get), against the float model.
    reloaded = load_quantized(out)
    candidates = {f"W{weight_bits}A{act_bits} simulated": SamPredictor(reloaded)}
    deploy = load_quantized(out)
    set_deploy(deploy)
    candidates["deploy mode (as the int8 ONNX model)"] = SamPredictor(deploy)
    if onnx_dir is not None:
        from ..runtime.predictor import OnnxPredictor

        candidates["int8 ONNX Runtime"] = OnnxPredictor(onnx_dir)
    with bounded_heap():  # four models' activations, image after image: see tinysam.perf
        agreement = mask_agreement(
            SamPredictor(sam),
            candidates,
            [load_image(p) for p in test_paths],
            settings.test_prompts,
            seed=settings.seed,
        )
    write_report(out, model_type, settings, agreement, results, test_paths, test_is_calibration)
    for name, kinds in agreement.items():
        ious = ", ".join(f"{kind} {a.mean_iou:.3f}" for kind, a in kinds.items())
        say(f"report: {name}: mean mask IoU with the float model: {ious}")
    say(f"done in {time.perf_counter() - start:.0f} s, peak memory {peak_memory_gb():.1f} GiB")
    summary["agreement"] = {
        name: {kind: round(a.mean_iou, 4) for kind, a in kinds.items()}
        for name, kinds in agreement.items()
    }
    return summary


def write_report(out, model_type, settings, agreement, results, test_paths, calibration) -> None:
    """``report.json`` and ``report.md``: mask agreement and the per-layer search results."""
    bits = f"W{settings.weight_bits}A{settings.act_bits}"
    report = {
        "agreement": {
            name: {kind: asdict(a) for kind, a in kinds.items()}
            for name, kinds in agreement.items()
        },
        "test_images": [Path(p).name for p in test_paths],
        "test_is_calibration_set": calibration,
        "layers": [r.as_dict() for r in results],
    }
    improved = sum(r.searched_distance < r.minmax_distance for r in results)
    markdown = "\n\n".join(
        [
            f"# Quantization report: {model_type}, {bits}",
            "## Masks against the float model\n\n" + agreement_table(agreement),
            f"Test images: {', '.join(report['test_images'])}"
            + (" (the calibration images)" if calibration else ""),
            f"## Per layer\n\nThe search beat min-max scales on its objective in {improved} of "
            f"{len(results)} layers (never worse by construction).\n\n" + layer_table(results),
        ]
    )
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md", "w") as f:
        f.write(markdown + "\n")


def convert_published(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    float_sam: Sam | None = None,
    test_paths: Sequence[str | os.PathLike] = (),
    test_prompts: int = 16,
    seed: int = 0,
    onnx: bool = True,
    activations: str = "uint8",
    say=None,
) -> dict:
    """``tinysam quantize --from tinysam_w8a8.pth``: the authors' Q-TinySAM as our quantized
    folder (``quant.json`` + ``quantized.pt``, no pickle), its int8 ONNX model, and, given test
    images, a report: the int8 ONNX model's masks against the simulated model's, and both
    against ``float_sam`` when one is given."""
    from ..checkpoint import CheckpointError, read_checkpoint
    from .published import load_published, save_converted
    from .split_products import check_exportable, export_published_onnx

    say = say or (lambda line: None)
    out = Path(out)
    start = time.perf_counter()
    contents = read_checkpoint(None, source, download=False, progress=False)
    if not contents.published_layers:
        raise CheckpointError(
            f"{source} is not a Q-TinySAM file (the authors' pickled model with InferQuant* "
            "layers): quantize a float checkpoint with --checkpoint and --calib instead"
        )
    resolved, model_type = contents.resolved, contents.model_type
    sam = load_published(
        contents.state_dict, contents.published_layers, model_type, str(resolved.path)
    )
    del contents
    if onnx:
        check_exportable(sam)  # before anything is written
    info = {"source_checkpoint": str(resolved.path)}
    save_converted(sam, out, model_type, **info)
    del sam
    say(f"saved: {out / 'quantized.pt'} ({time.perf_counter() - start:.0f} s)")
    converted = load_quantized(out)  # what users get
    summary = {"out": str(out), "layers": len(converted.published_layers)}
    onnx_dir = None
    if onnx:
        onnx_dir = out / "onnx"
        started = time.perf_counter()
        export_published_onnx(converted, onnx_dir, model_type, activations)
        summary["onnx"] = str(onnx_dir)
        say(f"onnx: int8 model in {onnx_dir} ({time.perf_counter() - started:.0f} s)")
    if test_paths:
        images = OneAtATime(test_paths)
        with bounded_heap():
            agreement = _published_agreement(
                converted, onnx_dir, float_sam, images, test_prompts, seed
            )
        write_published_report(out, model_type, agreement, test_paths)
        summary["agreement"] = {}
        for name, kinds in agreement.items():
            ious = ", ".join(f"{kind} {a.mean_iou:.3f}" for kind, a in kinds.items())
            say(f"report: {name}: mean mask IoU {ious}")
            summary["agreement"][name] = {k: round(a.mean_iou, 4) for k, a in kinds.items()}
    say(f"done in {time.perf_counter() - start:.0f} s, peak memory {peak_memory_gb():.1f} GiB")
    return summary


class OneAtATime:
    """Images read from their paths each time they are iterated: one in memory at a time."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = list(paths)

    def __iter__(self):
        return (load_image(p) for p in self.paths)


def _published_agreement(converted, onnx_dir, float_sam, images, prompts, seed) -> dict:
    """``{comparison: {"point"|"box": MaskAgreement}}`` for the converted model's report."""
    simulated = SamPredictor(converted)
    agreement = {}
    if onnx_dir is not None:
        from ..runtime.predictor import OnnxPredictor

        onnx_predictor = OnnxPredictor(onnx_dir)
        found = mask_agreement(
            simulated, {"int8 ONNX Runtime": onnx_predictor}, images, prompts, seed=seed
        )
        agreement["int8 ONNX Runtime vs the simulated model"] = found["int8 ONNX Runtime"]
    if float_sam is not None:
        candidates = {"simulated": simulated}
        if onnx_dir is not None:
            candidates["int8 ONNX Runtime"] = onnx_predictor
        found = mask_agreement(SamPredictor(float_sam), candidates, images, prompts, seed=seed)
        for name, kinds in found.items():
            agreement[f"{name} vs the float model"] = kinds
    return agreement


def write_published_report(out, model_type, agreement, test_paths) -> None:
    """``report.json`` and ``report.md`` of a converted Q-TinySAM."""
    report = {
        "agreement": {
            name: {kind: asdict(a) for kind, a in kinds.items()}
            for name, kinds in agreement.items()
        },
        "test_images": [Path(p).name for p in test_paths],
    }
    markdown = "\n\n".join(
        [
            f"# Conversion report: Q-TinySAM ({model_type}), the authors' W8A8 layers",
            "## Mean mask IoU\n\n" + agreement_table(agreement, versus=None),
            f"Test images: {', '.join(report['test_images'])}",
        ]
    )
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    with atomic_write(out / "report.md", "w") as f:
        f.write(markdown + "\n")
