from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinysam import perf
from tinysam.io import atomic_write, load_image, save_png


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_save_png_bool_mask(tmp_path):
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 2] = True
    save_png(mask, tmp_path / "m.png")
    back = np.asarray(Image.open(tmp_path / "m.png"))
    assert back.dtype == np.uint8 and back[1, 2] == 255 and back.sum() == 255


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    image = load_image(tmp_path / "r.png")
    assert image.shape == (20, 10, 3)


def test_load_image_errors(tmp_path):
    (tmp_path / "x.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image file"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.jpg")


def test_tune_allocator_respects_opt_out(monkeypatch):
    monkeypatch.setattr(perf, "_tuned", False)
    monkeypatch.setenv("TINYSAM_TUNE_MALLOC", "0")
    assert perf.tune_allocator() is False
    monkeypatch.delenv("TINYSAM_TUNE_MALLOC")
    assert perf.tune_allocator() is True  # glibc Linux, as on CI
    assert perf.tune_allocator() is True
