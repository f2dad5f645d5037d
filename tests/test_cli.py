"""The `tinysam` command: outputs a person can use, one-line errors with exit status 2."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import mask_iou, one_error_line, run_cli, unpack_masks

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "assets" / "picture1.jpg"


def _segment_args(checkpoint, out):
    """One click on the sample image, the golden checkpoint, a mask written to ``out``."""
    return ["segment", SAMPLE, "--point", "365,225", "--checkpoint", checkpoint, "--out", out]


def test_segment_writes_best_mask_overlay_and_json(
    capsys, tmp_path, vit_t_checkpoint, vit_t_outputs
):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code, stdout, _ = run_cli(capsys, *_segment_args(vit_t_checkpoint, out), "--overlay", overlay)
    assert code == 0
    result = json.loads(stdout.strip())
    assert len(result["scores"]) == 3
    assert result["best"] == int(np.argmax(result["scores"]))
    assert np.allclose(result["scores"], vit_t_outputs["p0_scores"], atol=1e-4)

    mask = np.asarray(Image.open(out))
    assert mask.shape == (770, 769) and set(np.unique(mask)) <= {0, 255}
    expected = unpack_masks(vit_t_outputs["p0_masks"], 769)[result["best"]]
    assert mask_iou(mask == 255, expected) >= 0.999
    assert result["area"][result["best"]] == int((mask == 255).sum())

    picture = np.asarray(Image.open(overlay))
    original = np.asarray(Image.open(SAMPLE).convert("RGB"))
    assert picture.shape == (770, 769, 3)
    changed = np.any(picture != original, axis=-1)
    assert changed[mask == 255].mean() > 0.9  # the mask is tinted
    assert tuple(picture[225, 365]) == (0, 200, 0)  # the positive click is drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "overlay.png"]


def test_segment_all_masks_and_single_mask(capsys, tmp_path, vit_t_checkpoint):
    out = tmp_path / "m.png"
    code, stdout, _ = run_cli(
        capsys,
        "segment",
        SAMPLE,
        "--box",
        "150,100,600,650",
        "--point",
        "365,225,1",
        "--checkpoint",
        vit_t_checkpoint,
        "--out",
        out,
        "--all-masks",
    )
    assert code == 0
    assert json.loads(stdout)["masks"] == [str(tmp_path / f"m_{i}.png") for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_0.png", "m_1.png", "m_2.png"]

    code, stdout, _ = run_cli(
        capsys,
        "segment",
        SAMPLE,
        "--point",
        "365,225",
        "--point",
        "100,600,0",
        "--checkpoint",
        vit_t_checkpoint,
        "--out",
        out,
        "--single-mask",
    )
    assert code == 0
    result = json.loads(stdout)
    assert len(result["scores"]) == 1 and result["best"] == 0 and out.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["segment", "missing.jpg", "--point", "1,2", "--out", "m.png"],
            "image not found: missing.jpg",
        ),
        (["segment", SAMPLE, "--point", "1;2", "--out", "m.png"], "point must be X,Y or X,Y,LABEL"),
        (
            ["segment", SAMPLE, "--point", "1,2,3,4", "--out", "m.png"],
            "point must be X,Y or X,Y,LABEL",
        ),
        (["segment", SAMPLE, "--point", "nan,2", "--out", "m.png"], "point must be"),
        (["segment", SAMPLE, "--box", "1,2,3", "--out", "m.png"], "box must be X0,Y0,X1,Y1"),
        (["segment", SAMPLE, "--out", "m.png"], "give at least one --point or a --box"),
        (["segment", SAMPLE, "--point", "900,10", "--out", "m.png"], "outside the 769x770 image"),
        (["segment", SAMPLE, "--point", "10,10"], "--out"),
        (["segment", SAMPLE, "--point", "10,10,7", "--out", "m.png"], "LABEL must be 1"),
        (["segment", SAMPLE, "--point", "10,10,-1", "--out", "m.png"], "LABEL must be 1"),
        (["segment", SAMPLE, "--point", "10,10,0.5", "--out", "m.png"], "LABEL must be 1"),
        (
            ["segment", SAMPLE, "--point", "10,10", "--out", "m.png", "--max-pixels", "1000"],
            "769x770 = 592130 pixels, more than the limit of 1000",
        ),
        (["segment", SAMPLE, "--box", "600,100,150,650", "--out", "m.png"], "x0 <= x1"),
    ],
)
def test_usage_errors(capsys, tmp_path, vit_t_checkpoint, args, message):
    os.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args, "--checkpoint", vit_t_checkpoint)
    assert code == 2
    assert message in one_error_line(err, "segment")
    assert not (tmp_path / "m.png").exists()


def test_bad_checkpoints(capsys, tmp_path, golden):
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"\x00" * 100)
    for checkpoint, message in [
        (corrupt, "is corrupt or not a PyTorch file"),
        (golden / "vit_small_seed3_encoder.pth", "image encoder alone"),
        (tmp_path / "absent.pth", "checkpoint not found"),
    ]:
        code, _, err = run_cli(
            capsys,
            "segment",
            SAMPLE,
            "--point",
            "1,1",
            "--checkpoint",
            checkpoint,
            "--out",
            tmp_path / "m.png",
        )
        assert code == 2 and message in one_error_line(err, "segment")


def test_bad_device(capsys, vit_t_checkpoint):
    code, _, err = run_cli(capsys, "info", "--checkpoint", vit_t_checkpoint, "--device", "gpu0")
    assert code == 2 and "is not a torch device" in one_error_line(err, "info")


def test_wrong_model_flag(capsys, tmp_path, vit_t_checkpoint):
    code, _, err = run_cli(capsys, "info", "--checkpoint", vit_t_checkpoint, "--model", "vit_b")
    assert code == 2
    assert "is a vit_t model, not vit_b; use --model vit_t" in one_error_line(err, "info")


def test_full_disk_is_one_line(capsys, tmp_path, vit_t_checkpoint, monkeypatch):
    def no_space(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    out = tmp_path / "m.png"
    code, _, err = run_cli(capsys, *_segment_args(vit_t_checkpoint, out))
    assert code == 2
    assert "disk full while writing" in one_error_line(err, "segment")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_info_reports_source(capsys, monkeypatch, vit_t_checkpoint):
    monkeypatch.setenv("TINYSAM_CHECKPOINT", str(vit_t_checkpoint))
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert "model:       vit_t" in out
    assert "parameters:  10.13 M" in out
    assert f"{vit_t_checkpoint} (from $TINYSAM_CHECKPOINT)" in out


def test_help_and_console_script(tmp_path):
    """The installed entry point runs, and --help explains the prompts."""
    exe = Path(sys.executable).with_name("tinysam")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "tinysam.cli"]
    done = subprocess.run(
        [*command, "segment", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert "X,Y[,LABEL]" in done.stdout and "--overlay" in done.stdout
    bad = subprocess.run([*command, "frobnicate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_everything_folder_writes_json_and_overlay_and_resumes(
    capsys, tmp_path, golden, vit_t_checkpoint
):
    import shutil

    from pycocotools import mask as mask_utils

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE, images / "a.jpg")
    shutil.copy(golden / "images" / "picture2.jpg", images / "b.jpg")
    (images / "notes.txt").write_text("not an image")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = [
        "everything",
        images,
        "--out",
        out,
        "--overlay",
        "--checkpoint",
        vit_t_checkpoint,
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0.5",
        "--stability-thresh",
        "0.3",
    ]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 2  # the broken image is reported, the others are done
    assert "skipped broken.png" in err and "1 image(s) could not be read: broken.png" in err
    summary = json.loads(stdout)
    assert summary["images"] == 3 and summary["skipped"] == 0 and summary["masks"] > 0
    assert summary["failed"] == ["broken.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json",
        "a.overlay.png",
        "b.json",
        "b.overlay.png",
    ]
    (images / "broken.png").unlink()

    document = json.loads((out / "a.json").read_text())
    assert (document["height"], document["width"]) == (770, 769)
    assert document["mode"] == "hierarchical" and document["points_per_side"] == 4
    for ann in document["annotations"]:
        rle = {
            "size": ann["segmentation"]["size"],
            "counts": ann["segmentation"]["counts"].encode(),
        }
        assert mask_utils.decode(rle).sum() == ann["area"]
    assert np.asarray(Image.open(out / "a.overlay.png")).shape == (770, 769, 3)

    (out / "b.json").unlink()
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    assert json.loads(stdout)["skipped"] == 1 and (out / "b.json").is_file()
    code, stdout, _ = run_cli(capsys, *args)
    assert json.loads(stdout) == {"images": 2, "skipped": 2, "masks": 0}


def test_everything_into_its_own_folder_overwrites_nothing(capsys, tmp_path, vit_t_checkpoint):
    """--out equal to the input folder, with overlays, two images sharing a stem: every input
    survives, every image gets its own outputs, and the second run finds nothing new to do."""
    import shutil

    from tests.test_io import bomb_png

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "dup.jpg")
    Image.open(SAMPLE).resize((64, 48)).save(folder / "dup.png")
    Image.open(SAMPLE).resize((40, 40)).save(folder / "foo.png")
    inputs = {p.name: p.read_bytes() for p in folder.iterdir()}
    # Entries that must be reported and skipped, never fatal, wherever they sort.
    (folder / "a_bomb.png").write_bytes(bomb_png(30000, 30000))
    (folder / "b_dir.jpg").mkdir()
    (folder / "c_link.jpg").symlink_to(folder / "gone.jpg")
    (folder / "d_truncated.png").write_bytes((folder / "foo.png").read_bytes()[:80])
    (folder / ".foo.json.abcd1234.part").write_text("{ half a jso")  # a killed write
    args = [
        "everything", folder, "--out", folder, "--overlay", "--checkpoint", vit_t_checkpoint,
        "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0",
    ]  # fmt: skip
    code, stdout, err = run_cli(capsys, *args)
    summary = json.loads(stdout)
    assert code == 2, err
    assert summary["failed"] == ["a_bomb.png", "b_dir.jpg", "c_link.jpg", "d_truncated.png"]
    assert "more than the limit" in err and "broken symbolic link" in err
    assert "is not a file" in err and "truncated" in err
    assert "Traceback" not in err
    for name, data in inputs.items():
        assert (folder / name).read_bytes() == data, f"{name} was overwritten"
    written = {p.name for p in folder.iterdir()} - set(inputs)
    assert written >= {
        "dup.jpg.json", "dup.jpg.overlay.png", "dup.png.json", "dup.png.overlay.png",
        "foo.json", "foo.overlay.png",
    }  # fmt: skip
    assert not any(name.endswith(".part") for name in written)
    assert json.loads((folder / "dup.png.json").read_text())["width"] == 64
    code, stdout, _ = run_cli(capsys, *args)
    summary = json.loads(stdout)
    assert summary["skipped"] == 3 and summary["images"] == 7  # the overlays are not new images


def test_everything_refuses_outputs_that_would_overwrite_an_input(capsys, tmp_path):
    from tinysam.everything.outputs import check_no_clobber

    folder = tmp_path / "p"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.overlay.png")
    Image.new("RGB", (8, 8)).save(folder / "x.overlay.jpg")
    # x.overlay.jpg's overlay would be x.overlay.overlay.png; x.overlay.png shares its stem
    # with x.overlay.jpg, so both keep their extension: nothing collides, nothing is skipped.
    code, _, err = run_cli(
        capsys, "everything", folder, "--out", folder, "--checkpoint", "missing.pth"
    )
    assert code == 2 and "checkpoint" in err  # planning passed, the model was asked for
    with pytest.raises(ValueError, match="would overwrite an input image"):
        check_no_clobber({folder / "a.png": [folder / "a.png"]})
    with pytest.raises(ValueError, match="would both write"):
        check_no_clobber({folder / "a.png": [tmp_path / "o"], folder / "b.png": [tmp_path / "o"]})


def test_everything_errors(capsys, tmp_path, vit_t_checkpoint):
    code, _, err = run_cli(capsys, "everything", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and "input not found" in one_error_line(err, "everything")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "everything", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "no images" in one_error_line(err, "everything")
    code, _, err = run_cli(
        capsys, "everything", SAMPLE, "--out", tmp_path / "o", "--points-per-side", "2"
    )
    assert code == 2 and "must be 4..256, got 2" in one_error_line(err, "everything")
    # A grid past the stated maximum is refused before any work (100,000 a side asked numpy
    # for 75 GiB; 2,000 ran on with no bound).
    for side in ("2000", "100000"):
        code, _, err = run_cli(
            capsys, "everything", SAMPLE, "--out", tmp_path / "o", "--points-per-side", side
        )
        assert code == 2 and f"must be 4..256, got {side}" in one_error_line(err, "everything")
    assert not (tmp_path / "o").exists()


def test_backend_onnx_segment_and_everything(capsys, tmp_path, onnx_dir, vit_t_outputs):
    out = tmp_path / "mask.png"
    onnx = ["--backend", "onnx", "--onnx-dir", onnx_dir]
    args = ["segment", SAMPLE, "--point", "365,225", "--out", out, *onnx]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    result = json.loads(stdout)
    assert np.allclose(result["scores"], vit_t_outputs["p0_scores"], atol=1e-4)
    expected = unpack_masks(vit_t_outputs["p0_masks"], 769)[result["best"]]
    assert mask_iou(np.asarray(Image.open(out)) == 255, expected) >= 0.999

    code, stdout, _ = run_cli(capsys, *args[:-4], "--backend", "openvino", "--onnx-dir", onnx_dir)
    assert code == 0
    assert np.allclose(json.loads(stdout)["scores"], vit_t_outputs["p0_scores"], atol=1e-4)

    code, stdout, _ = run_cli(
        capsys, "everything", SAMPLE, "--out", tmp_path / "all", "--points-per-side", "4",
        "--pred-iou-thresh", "0.5", "--stability-thresh", "0.3", *onnx,
    )  # fmt: skip
    assert code == 0 and json.loads(stdout)["masks"] > 0
    assert (tmp_path / "all" / "picture1.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "onnx"], "--backend onnx needs --onnx-dir DIR"),
        (["--backend", "onnx", "--onnx-dir", "nowhere"], "ONNX model directory not found"),
        (["--backend", "onnx", "--onnx-dir", ".", "--device", "cuda"], "for the torch backend"),
        (["--backend", "openvino"], "--backend openvino needs --onnx-dir DIR"),
        (["--backend", "torch", "--onnx-dir", "."], "--onnx-dir is for --backend auto, onnx"),
        (["--onnx-dir", "."], "is not a tinysam ONNX export"),
        (["--onnx-dir", "nowhere"], "ONNX model directory not found"),
    ],
)
def test_backend_errors(capsys, tmp_path, monkeypatch, extra, message):
    monkeypatch.delenv("TINYSAM_ONNX_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "segment", SAMPLE, "--point", "1,2", "--out", "m.png", *extra)
    assert code == 2
    assert message in one_error_line(err, "segment")


def test_export_errors(capsys, tmp_path, vit_t_checkpoint):
    code, _, err = run_cli(
        capsys, "export", "--checkpoint", vit_t_checkpoint, "--out-dir", tmp_path / "x",
        "--opset", "17",
    )  # fmt: skip
    assert code == 2 and "--opset must be at least 18" in one_error_line(err, "export")
    missing = tmp_path / "no.pth"
    code, _, err = run_cli(capsys, "export", "--checkpoint", missing, "--out-dir", tmp_path)
    assert code == 2 and "no.pth" in one_error_line(err, "export")
    assert not (tmp_path / "x").exists()


def test_segment_a_thin_image(capsys, tmp_path, vit_t_checkpoint):
    """5000x1 is a valid image: resized to 1024x1, never to zero pixels across."""
    Image.fromarray(np.full((1, 5000, 3), 120, np.uint8)).save(tmp_path / "thin.png")
    code, stdout, err = run_cli(
        capsys, "segment", tmp_path / "thin.png", "--point", "100,0",
        "--checkpoint", vit_t_checkpoint, "--out", tmp_path / "m.png",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["size"] == [1, 5000]
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (1, 5000)
