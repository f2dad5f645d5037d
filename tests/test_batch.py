"""Many images locally and on a real Ray cluster (started here, on 127.0.0.1): the same bytes,
resuming, a killed worker retried, a corrupt image reported while the rest finish."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinysam.backends import load_predictor
from tinysam.batch import run_local, run_ray
from tinysam.everything.outputs import EverythingJob, everything_outputs, output_names

from conftest import REPO

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'tinysam[ray]'")

SETTINGS = dict(mode="dense", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, golden) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for k, name in enumerate(["picture1.jpg", "picture2.jpg", "picture3.jpg"] * 2):
        with Image.open(golden / "images" / name) as image:
            image.resize((96 + 16 * k, 80)).save(folder / f"img{k}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def _cluster_teardown():
    yield
    ray.shutdown()


@pytest.fixture()
def cluster(_cluster_teardown):
    """A local Ray cluster of this process's own (started again if a test shut it down)."""
    if not ray.is_initialized():
        # The workers import this module (SlowEverythingJob) like the driver does.
        paths = os.pathsep.join([str(REPO / "tests"), str(REPO)])
        ray.init(
            address="local",  # a new cluster of our own, whatever else runs on this machine
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": paths, "RAY_USAGE_STATS_ENABLED": "0"}},
        )


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_job(checkpoint: Path, photos: Path, out: Path, job_class=EverythingJob) -> EverythingJob:
    images = sorted(photos.iterdir())
    names = output_names(images)
    plan = {str(i): [str(p) for p in everything_outputs(names[i], out, False)] for i in images}
    spec = functools.partial(load_predictor, "torch", checkpoint=checkpoint, threads=1)
    return job_class(spec, plan, **SETTINGS)


def outputs_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.json"))}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, vit_t_checkpoint, photos):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("local")
    job = make_job(vit_t_checkpoint, photos, out)
    summary = run_local(job, list(job.plan), progress=False)
    torch.set_num_threads(before)
    return summary, outputs_of(out)


@pytest.mark.slow  # a Ray cluster on 127.0.0.1 (~30 s to start, shared); CI's slow phase
def test_ray_writes_the_same_bytes_as_a_local_run(
    cluster, local_run, vit_t_checkpoint, photos, tmp_path
):
    local, expected = local_run
    assert local.done == 6 and list(local.failed) == [str(photos / "corrupt.png")]
    assert "not an image" in local.failed[str(photos / "corrupt.png")]
    job = make_job(vit_t_checkpoint, photos, tmp_path)
    summary = run_ray(job, list(job.plan), workers=2, threads=1, progress=False)
    assert summary.done == 6 and summary.skipped == 0
    assert list(summary.failed) == [str(photos / "corrupt.png")]  # reported, the rest finished
    assert sum(summary.per_worker.values()) == 6
    assert outputs_of(tmp_path) == expected  # byte for byte

    # A second run after an interrupted one does only what is missing.
    for name in ("img1.json", "img4.json"):
        (tmp_path / name).unlink()
    again = run_ray(job, list(job.plan), workers=2, threads=1, progress=False)
    assert again.skipped == 4 and again.done == 2  # the corrupt image is tried again
    assert list(again.failed) == [str(photos / "corrupt.png")]
    assert outputs_of(tmp_path) == expected


class SlowEverythingJob(EverythingJob):
    """Records each worker's pid (so the test can kill one) and works slowly enough to be
    caught mid-job."""

    pid_dir: str = ""

    def setup(self) -> None:
        super().setup()
        Path(self.pid_dir, str(os.getpid())).touch()

    def run(self, item: str):
        time.sleep(1.0)
        return super().run(item)


@pytest.mark.slow  # ~50 s; `pytest -m slow` (CI runs it)
def test_a_killed_worker_is_retried_and_the_job_completes(
    cluster, local_run, vit_t_checkpoint, photos, tmp_path
):
    _, expected = local_run
    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "out"
    job = make_job(vit_t_checkpoint, photos, out, SlowEverythingJob)
    job.pid_dir = str(pids)
    result = {}

    def drive() -> None:
        result["summary"] = run_ray(job, list(job.plan), workers=1, threads=1, progress=False)

    driver = threading.Thread(target=drive)
    driver.start()
    # Up to 180 s for the worker to start and finish one image: on a loaded 2-core machine
    # (CI beside other work) starting a Ray worker alone took over 60 s.
    for _ in range(1800):
        if list(out.glob("*.json")):
            break
        time.sleep(0.1)
    victims = [int(p.name) for p in pids.iterdir()]
    assert victims, "no worker started"
    os.kill(victims[0], signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive()
    summary = result["summary"]
    assert summary.stopped is None and summary.done == 6, summary
    assert len(list(pids.iterdir())) >= 2  # Ray started a new worker
    assert outputs_of(out) == expected


@pytest.mark.slow  # ~70 s: a cluster started from scratch; `pytest -m slow` (CI runs it)
def test_cli_on_a_cluster_started_with_ray_start(local_run, vit_t_checkpoint, photos, tmp_path):
    """`ray start --head` on 127.0.0.1, then `tinysam everything --ray-address` joins it."""
    _, expected = local_run
    import socket

    ray.shutdown()  # this process's own cluster, if an earlier test started one
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Ray >= 2.52 protects a cluster with a token (~/.ray/auth_token); clients opt in.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        out = tmp_path / "out"
        command = [
            sys.executable, "-m", "tinysam.cli", "everything", str(photos), "--out", str(out),
            "--checkpoint", str(vit_t_checkpoint), "--threads", "1", "--mode", "dense",
            "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0",
            "--ray-address", f"127.0.0.1:{port}", "--workers", "2",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 2, done.stderr  # the corrupt image
        summary = json.loads(done.stdout)
        assert summary["failed"] == ["corrupt.png"] and summary["images"] == 7
        assert sum(summary["per_worker"].values()) == 6
        assert "1 image(s) could not be read: corrupt.png" in done.stderr
        assert outputs_of(out) == expected
    finally:
        head.terminate()  # --block: stopping it stops the processes it started, only those
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        head.stderr.close()


def test_without_ray_the_cli_names_the_extra(capsys, tmp_path, photos, monkeypatch):
    from conftest import one_error_line, run_cli

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, _, err = run_cli(
        capsys, "everything", photos, "--out", tmp_path, "--ray", "--checkpoint", "x.pth"
    )
    assert code == 2 and "pip install 'tinysam[ray]'" in one_error_line(err, "everything")


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, vit_t_checkpoint, photos):
    """`tinysam embed` of the photos, run locally (one thread, as the Ray workers)."""
    from conftest import run_cli

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("embeddings")

    class Capture:  # run_cli's capsys, without a test function around it
        def readouterr(self):
            return "", ""

    code = run_cli(
        Capture(), "embed", photos, "--out", out, "--checkpoint", vit_t_checkpoint,
        "--threads", "1",
    )[0]  # fmt: skip
    torch.set_num_threads(before)
    return code, out


def test_embed_writes_loadable_embeddings_and_an_index(embedded, photos, vit_t_model):
    from tinysam import SamPredictor
    from tinysam.embeddings import file_sha256, load_embedding, read_index
    from tinysam.io import load_image

    code, out = embedded
    assert code == 2  # the corrupt image is reported
    assert sorted(p.name for p in out.glob("*.npz")) == [f"img{k}.npz" for k in range(6)]
    index = read_index(out)
    data = (photos / "img3.png").read_bytes()
    assert index[file_sha256(data)] == out / "img3.npz"

    fresh = SamPredictor(vit_t_model)
    fresh.set_image(load_image(photos / "img3.png"))
    loaded = SamPredictor(vit_t_model)
    loaded.restore_image_state(load_embedding(out / "img3.npz"))
    assert loaded.original_size == fresh.original_size and loaded.input_size == fresh.input_size
    prompt = {"point_coords": [[40.0, 30.0]], "point_labels": [1]}
    masks_a, scores_a, _ = fresh.predict(**prompt)
    masks_b, scores_b, _ = loaded.predict(**prompt)
    assert (masks_a == masks_b).mean() > 0.999
    assert scores_a == pytest.approx(scores_b, abs=1e-4)  # 2 threads vs 1 in the encoder


@pytest.mark.slow  # a Ray cluster on 127.0.0.1 (~30 s to start, shared); CI's slow phase
def test_embed_on_ray_gives_the_same_arrays(cluster, embedded, vit_t_checkpoint, photos, tmp_path):
    import numpy as np

    from tinysam.embeddings import EmbeddingJob, load_embedding

    _, local = embedded
    images = sorted(photos.iterdir())
    plan = {str(i): str(tmp_path / f"{i.stem}.npz") for i in images}
    spec = functools.partial(load_predictor, "torch", checkpoint=vit_t_checkpoint, threads=1)
    summary = run_ray(EmbeddingJob(spec, plan), list(plan), workers=2, threads=1, progress=False)
    assert summary.done == 6 and len(summary.failed) == 1
    for k in range(6):
        a = load_embedding(local / f"img{k}.npz")
        b = load_embedding(tmp_path / f"img{k}.npz")
        assert np.array_equal(a.features, b.features)


def test_serve_answers_known_uploads_without_encoding(embedded, photos, vit_t_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tinysam import SamPredictor
    from tinysam.embeddings import read_index
    from tinysam.serve.app import create_app
    from tinysam.serve.service import DemoService

    _, out = embedded
    with_index = DemoService(SamPredictor(vit_t_model), embeddings=read_index(out))
    plain = DemoService(SamPredictor(vit_t_model))
    data = (photos / "img2.png").read_bytes()
    answers = []
    for service in (with_index, plain):
        client = TestClient(create_app(service))
        image_id = client.post("/api/images", files={"file": ("a.png", data)}).json()["image_id"]
        click = {"points": [[50, 40]], "labels": [1]}
        answers.append(client.post(f"/api/images/{image_id}/predict", json=click).json())
    assert with_index.precomputed == 1 and plain.precomputed == 0
    assert answers[0]["score"] == pytest.approx(answers[1]["score"], abs=1e-4)


# --------------------------------------------------------------------------- boxes -> masks


@pytest.mark.slow  # a Ray cluster on 127.0.0.1 (~30 s to start, shared); CI's slow phase
def test_boxes_to_masks_locally_and_on_ray_give_the_same_results(
    cluster, vit_t_checkpoint, tmp_path
):
    """`tinysam boxes` on a COCO annotations file: the masks of its boxes, as COCO results,
    the same bytes from a local run and from two Ray workers (a killed-and-resumed local run
    too); a missing image is reported, the rest finish."""
    from test_evaluation import write_dataset

    from conftest import run_cli

    class Quiet:
        def readouterr(self):
            return "", ""

    annotations, images = write_dataset(tmp_path / "data")
    gt = json.loads(annotations.read_text())
    gt["images"].append({"id": 9, "file_name": "missing.png", "height": 10, "width": 10})
    gt["annotations"].append(
        {"id": 99, "image_id": 9, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9}
    )
    annotations.write_text(json.dumps(gt))
    common = ["--images", images, "--checkpoint", vit_t_checkpoint, "--threads", "1"]
    before = torch.get_num_threads()
    code, _, _ = run_cli(Quiet(), "boxes", annotations, "--out", tmp_path / "local", *common)
    torch.set_num_threads(before)
    assert code == 2  # the missing image
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    assert len(local) == 6 and {r["image_id"] for r in local} == {1, 2, 3}
    assert all(r["score"] == 1.0 and r["segmentation"]["size"] for r in local)

    summary = run_cli(
        Quiet(), "boxes", annotations, "--out", tmp_path / "ray", *common,
        "--ray", "--workers", "2",
    )  # fmt: skip
    assert summary[0] == 2
    assert (tmp_path / "ray" / "results.json").read_bytes() == (
        tmp_path / "local" / "results.json"
    ).read_bytes()

    (tmp_path / "local" / "parts" / "2.json").unlink()  # as if killed before image 2
    code, _, _ = run_cli(Quiet(), "boxes", annotations, "--out", tmp_path / "local", *common)
    torch.set_num_threads(before)
    assert (tmp_path / "local" / "results.json").read_text() == json.dumps(local)


# --------------------------------------------------------------------------- teacher cache


@pytest.mark.slow  # a Ray cluster on 127.0.0.1 (~30 s to start, shared); CI's slow phase
def test_cache_teacher_sharded_over_ray_workers(cluster, tmp_path):
    """`distill cache-teacher --ray`: shards spread over two workers, read back by the trainer's
    reader (checksums verified) with the embeddings the single-process cache holds."""
    import numpy as np

    from tinysam.distill.models import small_teacher
    from tinysam.distill.synthetic import write_synthetic_sa1b
    from tinysam.distill.teacher_cache import TeacherEmbeddings

    from conftest import run_cli

    class Quiet:
        def readouterr(self):
            return "", ""

    data = write_synthetic_sa1b(tmp_path / "sa1b", 5, size=(96, 128), seed=4)
    torch.save(small_teacher(128).state_dict(), tmp_path / "teacher.pt")
    common = [
        "distill", "cache-teacher", "--teacher", "small", "--checkpoint", tmp_path / "teacher.pt",
        "--data", data, "--image-size", "128", "--shard-size", "2", "--device", "cpu",
    ]  # fmt: skip
    assert run_cli(Quiet(), *common, "--out", tmp_path / "local")[0] == 0
    code = run_cli(Quiet(), *common, "--out", tmp_path / "ray", "--ray", "--workers", "2")[0]
    assert code == 0
    local = TeacherEmbeddings(tmp_path / "local")
    spread = TeacherEmbeddings(tmp_path / "ray")
    assert len(spread) == len(local) == 5 and len(spread.index["shards"]) == 3
    for name in local.where:
        np.testing.assert_allclose(spread[name].numpy(), local[name].numpy(), atol=2e-3)

    # Resume: a lost shard is the only one done again.
    (tmp_path / "ray" / "shard_00001.json").unlink()
    before = (tmp_path / "ray" / "shard_00000.npy").stat().st_mtime_ns
    assert run_cli(Quiet(), *common, "--out", tmp_path / "ray", "--ray")[0] == 0
    assert (tmp_path / "ray" / "shard_00000.npy").stat().st_mtime_ns == before
    assert len(TeacherEmbeddings(tmp_path / "ray")) == 5
    code, _, _ = run_cli(Quiet(), *common, "--out", tmp_path / "local", "--ray")
    assert code == 2  # a folder cached without --ray is not mixed with a sharded one
