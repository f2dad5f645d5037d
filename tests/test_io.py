from __future__ import annotations

import io

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
    with pytest.raises(ValueError, match="is not an image"):
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


HEAP_COUNT = """
import ctypes, sys, tempfile, threading
from tinysam import perf
if sys.argv[1] == "tuned":
    assert perf.tune_allocator()
def work():
    blocks = [bytearray(4096) for _ in range(100)]
threads = [threading.Thread(target=work) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    stream = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(out.name).read().count("<heap nr="))
"""


def test_tuned_threads_share_one_heap():
    """glibc gives new threads heaps of their own, each keeping its peak; tuned, every thread
    allocates from the one heap (malloc_info lists the heaps)."""
    import subprocess
    import sys

    def heaps(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", HEAP_COUNT, mode], capture_output=True)
        assert run.returncode == 0, run.stderr.decode()
        return int(run.stdout)

    assert heaps("default") > 1
    assert heaps("tuned") == 1


def bomb_png(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG that claims WxH pixels with a tiny (empty) IDAT: what a decompression bomb's
    header looks like, without the bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_pixel_formats_are_converted_or_refused(tmp_path):
    from tinysam.io import ImageError, read_image

    def tiff(array) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="TIFF")
        return buffer.getvalue()

    sixteen = np.full((4, 5), 65535, np.uint16)
    sixteen[0, 0] = 257
    rgb = read_image(tiff(sixteen))
    assert rgb.shape == (4, 5, 3) and rgb[1, 1, 0] == 255 and rgb[0, 0, 0] == 1  # not clipped
    png16 = io.BytesIO()
    Image.fromarray((np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)).save(png16, "PNG")
    assert read_image(png16.getvalue())[3, 4, 0] == round(57000 * 255 / 65535)
    floats = np.linspace(0.0, 1.0, 20, dtype=np.float32).reshape(4, 5)
    rgb = read_image(tiff(floats))
    assert rgb[0, 0, 0] == 0 and rgb[3, 4, 0] == 255 and rgb[2, 0, 1] == round(10 / 19 * 255)
    with pytest.raises(ImageError, match="only 0..1 floats"):
        read_image(tiff(floats * 300))
    with pytest.raises(ImageError, match="NaN"):
        read_image(tiff(np.full((4, 5), np.nan, np.float32)))
    with pytest.raises(ImageError, match="outside 0..65535"):
        read_image(tiff(np.full((4, 5), -7, np.int32)))


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    from tinysam.io import ImageTooLarge, read_image

    with pytest.raises(ImageTooLarge, match="more than the limit"):
        read_image(bomb_png(30000, 30000))  # 900 M pixels: past Pillow's own bomb check
    with pytest.raises(ImageTooLarge, match="12000x10000 = 120000000 pixels"):
        read_image(bomb_png(12000, 10000, 8, 2))
    (tmp_path / "big.png").write_bytes(bomb_png(300, 200, 8, 2))
    monkeypatch.setenv("TINYSAM_MAX_PIXELS", "1000")
    with pytest.raises(ImageTooLarge, match="300x200 = 60000 pixels, more than the limit of 1000"):
        load_image(tmp_path / "big.png")
    monkeypatch.setenv("TINYSAM_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="TINYSAM_MAX_PIXELS"):
        load_image(tmp_path / "big.png")


def test_entries_that_are_not_image_files(tmp_path):
    from tinysam.io import ImageError

    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path / "dir.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        load_image(tmp_path / "link.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="is not an image"):
        load_image(tmp_path / "empty.png")


def test_thin_images_keep_a_pixel_across():
    from tinysam.transforms import ResizeLongestSide

    resize = ResizeLongestSide(1024)
    assert resize.get_preprocess_shape(1, 5000, 1024) == (1, 1024)
    assert resize.get_preprocess_shape(5000, 2, 1024) == (1024, 1)
    assert resize.apply_image(np.zeros((1, 5000, 3), np.uint8)).shape == (1, 1024, 3)


def test_stale_parts_of_killed_writes_are_swept(tmp_path):
    from tinysam.io import remove_stale_parts

    (tmp_path / ".a.json.k2j4h5l6.part").write_text("{half")
    (tmp_path / ".b.json.k2j4h5l6.part").write_text("not ours to remove")
    (tmp_path / "a.json.part").write_text("a user's file")
    assert remove_stale_parts(tmp_path, {"a.json"}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.k2j4h5l6.part", "a.json.part"]
    assert remove_stale_parts(tmp_path / "missing", {"a.json"}) == 0
