"""Resumes trust only outputs they can verify, and runs never replace files they did not write.

Each output a batch command writes (``everything``'s JSON and overlay, ``embed``'s ``.npz``,
``boxes``' parts) carries a mark in its first bytes and counts as done only when it is also
whole (``tinysam.io.output_state``). A file cut short by a crash, a full disk or a truncation is
redone and named in the summary's ``redone``; a file of the user's at an output path stops the
run with one line, before any work, and is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinysam.embeddings import load_embedding, read_index
from tinysam.io import BROKEN, DONE, FOREIGN, MISSING, output_state, save_png, write_json_output

from conftest import one_error_line, run_cli

GRID = ["--mode", "dense", "--points-per-side", "4", "--pred-iou-thresh", "0"]
GRID += ["--stability-thresh", "0"]


@pytest.fixture()
def photos(tmp_path, golden) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, name in enumerate(["picture1.jpg", "picture2.jpg"]):
        with Image.open(golden / "images" / name) as image:
            image.resize((96 + 16 * k, 80)).save(folder / f"{'ab'[k]}.jpg")
    return folder


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def summary_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the states
@pytest.mark.parametrize("suffix", [".json", ".png", ".npz"])
def test_output_states_of_every_format(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    assert output_state(path) == MISSING
    if suffix == ".json":
        write_json_output(path, "everything", {"annotations": list(range(200))})
    elif suffix == ".png":
        save_png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), path)
    else:
        from tinysam.embeddings import save_embedding
        from tinysam.predictor_base import ImageState

        state = ImageState(np.zeros((1, 8, 4, 4), np.float32), (10, 10), (8, 8))
        save_embedding(path, state, "0" * 32, "a.png")
    assert output_state(path) == DONE
    whole = path.read_bytes()
    for keep in (0.0, 0.1, 0.5, 0.9):
        path.write_bytes(whole[: int(len(whole) * keep)])
        assert output_state(path) == BROKEN, keep
    # The same kind of file, valid, but not ours: never replaced.
    if suffix == ".json":
        path.write_text(json.dumps({"mine": True}))
    elif suffix == ".png":
        Image.new("RGB", (8, 8)).save(path)
    else:
        np.savez(path, features=np.zeros(3))
    assert output_state(path) == FOREIGN
    path.unlink()
    path.mkdir()
    assert output_state(path) == FOREIGN


# --------------------------------------------------------------------------- broken outputs
def test_embed_redoes_a_truncated_embedding(capsys, tmp_path, photos, vit_t_checkpoint):
    out = tmp_path / "emb"
    argv = ["embed", photos, "--out", out, "--checkpoint", vit_t_checkpoint]
    assert run_cli(capsys, *argv)[0] == 0
    first = load_embedding(out / "a.npz").features
    truncate(out / "a.npz")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = summary_of(stdout)
    assert summary["redone"] == ["a.jpg"] and summary["skipped"] == 1
    assert "redoing a.jpg" in err
    np.testing.assert_array_equal(load_embedding(out / "a.npz").features, first)
    assert sorted(p.name for p in read_index(out).values()) == ["a.npz", "b.npz"]


@pytest.mark.slow  # ~12 s end to end: CI's slow phase (the fast suite's budget)
def test_boxes_redo_a_truncated_part(capsys, tmp_path, vit_t_checkpoint):
    from test_evaluation import write_dataset

    annotations, images = write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["boxes", annotations, "--images", images, "--out", out]
    argv += ["--checkpoint", vit_t_checkpoint]
    assert run_cli(capsys, *argv)[0] == 0
    whole = (out / "results.json").read_bytes()
    truncate(out / "parts" / "1.json", 0.3)
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert summary_of(stdout)["redone"] == [
        json.loads(annotations.read_text())["images"][0]["file_name"]
    ]
    assert (out / "results.json").read_bytes() == whole


def test_everything_redoes_a_truncated_json(capsys, tmp_path, photos, vit_t_checkpoint):
    out = tmp_path / "out"
    argv = ["everything", photos / "a.jpg", "--out", out, *GRID]
    argv += ["--checkpoint", vit_t_checkpoint]
    assert run_cli(capsys, *argv)[0] == 0
    whole = (out / "a.json").read_bytes()
    assert json.loads(whole)["format"] == "tinysam-everything"
    truncate(out / "a.json")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert summary_of(stdout)["redone"] == ["a.jpg"]
    assert (out / "a.json").read_bytes() == whole
    # Whole now: the next run skips it.
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and summary_of(stdout)["skipped"] == 1


# --------------------------------------------------------------------------- foreign files
def test_a_users_overlay_in_the_folder_is_an_input_and_never_overwritten(
    capsys, photos, vit_t_checkpoint
):
    mine = photos / "b.overlay.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(mine)
    before = mine.read_bytes()
    argv = ["everything", photos, "--out", photos, "--overlay", *GRID]
    code, out, err = run_cli(capsys, *argv, "--checkpoint", vit_t_checkpoint)
    assert code == 2 and out == ""
    line = one_error_line(err, "everything")
    assert "b.overlay.png" in line and "would overwrite an input image" in line
    assert mine.read_bytes() == before
    assert not (photos / "a.json").exists()  # refused before any work


def test_our_own_overlays_in_the_folder_are_not_inputs(capsys, photos, vit_t_checkpoint):
    argv = ["everything", photos, "--out", photos, "--overlay", *GRID]
    argv += ["--checkpoint", vit_t_checkpoint]
    assert run_cli(capsys, *argv)[0] == 0
    assert (photos / "a.overlay.png").exists()
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert summary_of(stdout)["images"] == 2 and summary_of(stdout)["skipped"] == 2


@pytest.mark.parametrize("command", ["everything", "embed"])
def test_a_users_file_at_an_output_path_stops_the_run(
    capsys, tmp_path, photos, vit_t_checkpoint, command
):
    out = tmp_path / "out"
    out.mkdir()
    name = "a.json" if command == "everything" else "a.npz"
    mine = out / name
    if command == "everything":
        mine.write_text('{"my": "notes"}')
    else:
        np.savez(mine, features=np.arange(100))
    before = mine.read_bytes()
    argv = [command, photos, "--out", out, "--checkpoint", vit_t_checkpoint]
    if command == "everything":
        argv += GRID
    for force in ([], ["--force"]):
        code, stdout, err = run_cli(capsys, *argv, *force)
        assert code == 2 and stdout == ""
        line = one_error_line(err, command)
        assert "was not written by tinysam" in line and name in line
        assert mine.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [name]


# --------------------------------------------------------------------------- serve --embeddings
def _embedding_file(path: Path, sha256: str, **change) -> Path:
    """An embedding file as ``tinysam embed`` writes it, with ``change`` applied."""
    arrays = {
        "tinysam_embedding": np.asarray(1),
        "features": np.zeros((1, 256, 64, 64), np.float32),
        "original_size": np.asarray([80, 96]),
        "input_size": np.asarray([853, 1024]),
        "sha256": np.asarray(sha256),
        "image": np.asarray("a.png"),
    }
    arrays.update(change)
    np.savez(path, **arrays)
    return path


def _zip_bomb(path: Path, sha256: str) -> Path:
    """A small file whose features claim 1x256x512x512 float32 (256 MiB) of zeros."""
    import zipfile

    shape = (1, 256, 512, 512)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("tinysam_embedding.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(1))
        with archive.open("features.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(16 << 20)
            for _ in range(int(np.prod(shape)) * 4 // len(zeros)):
                f.write(zeros)
        for name, value in [("original_size", [80, 96]), ("input_size", [853, 1024])]:
            with archive.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(value))
        with archive.open("sha256.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(sha256))
    assert path.stat().st_size < 2 << 20
    return path


def _with(**change):
    return lambda path, sha256: _embedding_file(path, sha256, **change)


def _not_a_zip(path: Path, sha256: str) -> Path:
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    return path


def _features(shape, value=0.0, dtype=np.float32):
    return np.full(shape, value, dtype)


EMBEDDING_CASES = {
    "three_channels": (_with(features=_features((1, 3, 64, 64))), "shape [1, 3, 64, 64]"),
    "half_size": (_with(features=_features((1, 256, 32, 32))), "model's are [1, 256, 64, 64]"),
    "zero_input_size": (_with(input_size=np.asarray([0, 0])), "are not (H, W)"),
    "wrong_input_size": (_with(input_size=np.asarray([800, 1024])), "resized to"),
    "wrong_image_size": (_with(original_size=np.asarray([81, 96])), "not this (80, 96)"),
    "huge_values": (_with(features=_features((1, 256, 64, 64), 3e38)), "beyond"),
    "nan": (_with(features=_features((1, 256, 64, 64), np.nan)), "NaN"),
    "float64": (_with(features=_features((1, 256, 64, 64), 0.0, np.float64)), "float64"),
    "zip_bomb": (_zip_bomb, "would inflate"),
    "another_images": (lambda path, sha256: _embedding_file(path, "f" * 32), "another image"),
    "not_a_zip": (_not_a_zip, "not a usable"),
}


@pytest.mark.parametrize("case", sorted(EMBEDDING_CASES))
def test_serve_checks_precomputed_embeddings_and_encodes_instead(tmp_path, vit_t_model, case):
    from fastapi.testclient import TestClient

    from tinysam import SamPredictor
    from tinysam.embeddings import file_sha256
    from tinysam.serve.app import create_app
    from tinysam.serve.service import DemoService

    image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    buffer = __import__("io").BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    image_id = file_sha256(data)
    make, words = EMBEDDING_CASES[case]
    path = make(tmp_path / "a.npz", image_id)
    service = DemoService(SamPredictor(vit_t_model), embeddings={image_id: path})
    client = TestClient(create_app(service))
    answer = client.post("/api/images", files={"file": ("a.png", data)})
    assert answer.status_code == 200 and answer.json()["image_id"] == image_id
    health = client.get("/api/health").json()
    assert health["precomputed"] == 0 and health["embeddings_rejected"] == 1
    assert words in health["embedding_problem"], health["embedding_problem"]
    click = client.post(
        f"/api/images/{image_id}/predict", json={"points": [[40, 30]], "labels": [1]}
    )
    assert click.status_code == 200 and np.isfinite(click.json()["score"])


def test_serve_uses_a_good_precomputed_embedding(tmp_path, vit_t_model):
    """The checks pass what ``tinysam embed`` writes (the control for the cases above)."""
    from tinysam import SamPredictor
    from tinysam.embeddings import file_sha256, save_embedding
    from tinysam.serve.service import DemoService

    image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    buffer = __import__("io").BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    predictor = SamPredictor(vit_t_model)
    predictor.set_image(image)
    save_embedding(tmp_path / "a.npz", predictor.image_state(), file_sha256(data), "a.png")
    service = DemoService(predictor, embeddings={file_sha256(data): tmp_path / "a.npz"})
    service.add_image(data)
    assert service.precomputed == 1 and service.embeddings_rejected == 0


def test_sharded_teacher_cache_resumes_from_its_own_marked_shards(tmp_path):
    """The Ray teacher cache's job, run here: its shard markers are ours, so a second run skips
    them, and a marker cut short is redone."""
    import torch

    from tinysam.batch import run_local
    from tinysam.distill.models import small_teacher
    from tinysam.distill.pipeline import finish_sharded_cache, sharded_cache_job
    from tinysam.distill.synthetic import write_synthetic_sa1b
    from tinysam.io import DONE, output_state

    data = write_synthetic_sa1b(tmp_path / "sa1b", 3, size=(64, 64), seed=1)
    torch.save(small_teacher(64).state_dict(), tmp_path / "teacher.pt")
    out = tmp_path / "cache"
    settings = (data, out, "small", tmp_path / "teacher.pt", 64, 2, torch.device("cpu"))
    job, shards = sharded_cache_job(*settings)
    first = run_local(job, shards)
    assert first.done == 2 and all(output_state(job.outputs(s)[0]) == DONE for s in shards)
    marker = job.outputs("1")[0]
    marker.write_bytes(marker.read_bytes()[:40])
    job, shards = sharded_cache_job(*settings)
    again = run_local(job, shards)
    assert (again.skipped, again.redone, again.done) == (1, ["1"], 1)
    summary = finish_sharded_cache(job, again)
    assert (summary["shards"], summary["cached"]) == (2, 3)
