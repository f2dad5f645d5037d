"""A cluster that cannot start says so within a deadline (issue 26, kind 5), and a job's outputs
are a function of its inputs alone, whatever the process did before (kind 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinysam.batch.runner import ClusterError, connect_ray
from tinysam.masks import encode_masks

from conftest import REPO


def _loopback_down_prefix() -> list[str]:
    """``unshare -n``: a new network namespace, whose loopback is down. Root only."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here to take the loopback network away")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not allowed here: {probe.stderr.decode().strip()}")
    return [unshare, "-n"]


def test_ray_with_the_loopback_down_fails_at_once_with_one_line(tmp_path, vit_t_checkpoint):
    """Before: 7 minutes of silence while Ray waited on 127.0.0.1."""
    prefix = _loopback_down_prefix()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / "a.png")
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "tinysam.cli", "everything", str(tmp_path / "a.png"),
         "--out", str(tmp_path / "out"), "--ray", "--checkpoint", str(vit_t_checkpoint),
         "--points-per-side", "4"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tinysam everything: error: cannot start a local Ray cluster")
    assert "loopback network 127.0.0.1 is unusable" in lines[0]
    assert not (tmp_path / "out" / "a.json").exists()


def test_starting_or_joining_a_cluster_has_a_deadline(monkeypatch):
    """Ray's own start waits minutes on an address that does not answer: ``connect_ray``
    gives it ``seconds`` and then says so (``ray.init`` stands in for one that hangs)."""
    ray = pytest.importorskip("ray")
    release = threading.Event()
    calls = []

    def hangs(**options):
        calls.append(options["address"])
        release.wait(60)

    monkeypatch.setattr(ray, "init", hangs)
    started = time.monotonic()
    try:
        with pytest.raises(
            ClusterError, match=r"could not join Ray at 127\.0\.0\.1:6379 within 1 s"
        ):
            connect_ray("127.0.0.1:6379", seconds=1.0)  # never contacted: init is the stand-in
    finally:
        release.set()
    assert calls == ["127.0.0.1:6379"] and time.monotonic() - started < 30

    def fails(**options):
        raise ConnectionError("Could not find any running Ray instance.\nPlease start one")

    monkeypatch.setattr(ray, "init", fails)
    with pytest.raises(ClusterError, match="could not start Ray: Please start one"):
        connect_ray("auto", seconds=5.0)


# --------------------------------------------------------------------------- same bytes
def _instances_dataset(root: Path, golden: Path) -> tuple[Path, Path, Path]:
    """Three photos with 20 detector boxes each (a COCO annotations and a detections file)."""
    rng = np.random.default_rng(26)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations, detections = [], [], []
    for image_id, (name, size) in enumerate(
        [("picture1.jpg", (320, 240)), ("picture2.jpg", (300, 260)), ("picture3.jpg", (280, 200))],
        start=1,
    ):
        with Image.open(golden / "images" / name) as photo:
            photo.convert("RGB").resize(size).save(images_dir / f"{image_id}.png")
        w, h = size
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for _ in range(20):
            x0, y0 = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            bw, bh = rng.uniform(10, w - x0), rng.uniform(10, h - y0)
            mask = np.zeros((h, w), bool)
            mask[int(y0) : int(y0 + bh), int(x0) : int(x0 + bw)] = True
            (rle,) = encode_masks(mask[None])
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                 "segmentation": rle, "area": int(mask.sum()), "bbox": [x0, y0, bw, bh],
                 "iscrowd": 0}
            )  # fmt: skip
            detections.append(
                {"image_id": image_id, "category_id": 1, "score": float(rng.uniform(0.3, 1)),
                 "bbox": [x0 + rng.normal(0, 2), y0 + rng.normal(0, 2), bw, bh]}
            )  # fmt: skip
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "dets.json").write_text(json.dumps(detections))
    return root / "gt.json", root / "dets.json", images_dir


@pytest.mark.slow  # three eval runs in new processes (~25 s); CI's slow phase
def test_eval_instances_whole_and_resumed_write_the_same_bytes(tmp_path, golden, vit_t_checkpoint):
    """The same job run whole, and run as ``--limit 1`` then resumed in a new process: the
    second and third images' masks must not depend on what the process did before them."""
    gt, dets, images = _instances_dataset(tmp_path, golden)

    def evaluate(out: Path, *extra: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "tinysam.cli", "eval", "instances", "--annotations", str(gt),
             "--detections", str(dets), "--images", str(images), "--out", str(out),
             "--checkpoint", str(vit_t_checkpoint), "--threads", "2", *extra],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    evaluate(tmp_path / "whole")
    evaluate(tmp_path / "resumed", "--limit", "1")
    first = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert {r["image_id"] for r in first} == {1}
    evaluate(tmp_path / "resumed")
    whole = (tmp_path / "whole" / "results.json").read_bytes()
    assert len(json.loads(whole)) == 60
    assert (tmp_path / "resumed" / "results.json").read_bytes() == whole
