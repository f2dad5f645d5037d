"""File I/O at the package's edges: images in, masks and downloads out, always atomically."""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()
CACHE_ENV = "TINYSAM_CACHE_DIR"


def cache_dir() -> Path:
    """Where downloaded weights and remembered choices live: $TINYSAM_CACHE_DIR, else
    $XDG_CACHE_HOME/tinysam."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinysam"


class DownloadError(RuntimeError):
    """A download that failed; the message says why and what to do."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it over ``path`` only on success.

    A crash, an exception or a full disk leaves any previous ``path`` untouched and no partial
    file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _NEW_FILE_MODE)  # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_parts(folder: str | os.PathLike, names: set[str]) -> int:
    """Delete the temporary files ``atomic_write`` left for ``names`` in ``folder`` when a
    process was killed mid-write; returns how many. Call it before writing, not while another
    process writes the same files."""
    import re

    pattern = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}\.part$")
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match and match.group(1) in names and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    return removed


# --------------------------------------------------------------------------- our outputs
# A resume must trust only outputs it can verify, and a run may replace only files it can prove
# it wrote. Every per-item output carries a mark in its first bytes (so even a truncated one is
# recognisably ours) and is checked whole before it counts as done:
#   JSON  ``{"format": "tinysam-KIND", ...}`` (``write_json_output``), whole if it parses;
#   PNG   a ``tEXt`` chunk ``Software=tinysam`` before the pixels (``save_png``), whole if it
#         decodes;
#   NPZ   a first member named ``tinysam...`` (``embeddings.save_embedding``), whole if every
#         member's CRC holds.
MISSING, DONE, BROKEN, FOREIGN = "missing", "done", "broken", "foreign"
PNG_MARK = ("Software", "tinysam")
_JSON_MARK = b'{"format": "tinysam-'


class ForeignFileError(ValueError):
    """An output path holds a file this package did not write: it is never replaced."""


def write_json_output(path: str | os.PathLike, kind: str, document: dict) -> None:
    """``document`` as ``path``, marked as ours (``"format": "tinysam-KIND"`` first), atomically."""
    with atomic_write(path, "w") as f:
        json.dump({"format": f"tinysam-{kind}", **document}, f, allow_nan=False)


# Files shorter than this, that begin as our outputs begin, were cut before their mark: nothing
# in them can be lost, so they count as ours and broken.
_SHORTER_THAN_A_MARK = 64
_STARTS = {".json": _JSON_MARK, ".png": b"\x89PNG\r\n\x1a\n", ".npz": b"PK\x03\x04"}


def _marked(path: Path, head: bytes) -> bool:
    suffix = path.suffix.lower()
    start = _STARTS.get(suffix)
    if start is not None and len(head) < _SHORTER_THAN_A_MARK:
        if start[: len(head)] == head[: len(start)]:
            return True
    if suffix == ".json":
        return head.startswith(_JSON_MARK)
    if suffix == ".png":
        return b"tEXt" + PNG_MARK[0].encode() + b"\0" + PNG_MARK[1].encode() in head
    if suffix == ".npz":  # the first zip member's name, after its 30-byte local header
        return head[:4] == b"PK\x03\x04" and head[30:37] == b"tinysam"
    return False


def _whole(path: Path) -> bool:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif suffix == ".npz":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False
    except Exception as err:  # zipfile's BadZipFile and friends
        import zipfile

        if isinstance(err, zipfile.BadZipFile):
            return False
        raise
    return True


def output_state(path: str | os.PathLike) -> str:
    """What a run finds at one of its output paths: ``MISSING``; ``DONE`` (ours and whole);
    ``BROKEN`` (ours, but cut short: a crash, a full disk; redo it); ``FOREIGN`` (a file we
    did not write, or a folder: never replace it)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return MISSING
    if not path.is_file():
        return FOREIGN
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return FOREIGN
    if not _marked(path, head):
        return FOREIGN
    return DONE if _whole(path) else BROKEN


def check_replaceable(paths) -> list[Path]:
    """The paths among ``paths`` whose files are ours but broken (to redo); a
    ``ForeignFileError`` naming the first file that is not ours."""
    broken = []
    for path in paths:
        state = output_state(path)
        if state == FOREIGN:
            raise ForeignFileError(
                f"{path} exists and was not written by tinysam (or by an older version); "
                "move it away or choose another output folder"
            )
        if state == BROKEN:
            broken.append(Path(path))
    return broken


def check_recorded_text(path: str | os.PathLike, record: str | os.PathLike) -> None:
    """A plain-text output (a Markdown table) cannot carry our mark: it is ours when it holds
    what ``record`` (our marked JSON written beside it) keeps under ``"markdown"``. Anything
    else at ``path`` is a ``ForeignFileError``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        kept = json.loads(Path(record).read_text(encoding="utf-8"))["markdown"]
    except (OSError, ValueError, KeyError, TypeError):
        kept = None
    if output_state(record) != DONE or not path.is_file() or path.is_symlink():
        kept = None
    if kept is None or path.read_text(errors="replace").strip() != str(kept).strip():
        raise ForeignFileError(
            f"{path} exists and was not written by tinysam; move it away or choose another "
            "output folder"
        )


def pending_outputs(
    items: list, outputs_of: Callable[[Any], list], force: bool = False
) -> tuple[list, list]:
    """The items still to do (all of them with ``force``): those whose outputs are not all
    verified done; and among them, those with an output of ours that is broken. A
    ``ForeignFileError`` where an output path holds a file that is not ours."""
    todo, broken = [], []
    for item in items:
        outputs = outputs_of(item)
        if check_replaceable(outputs):
            broken.append(item)
        if force or not all(output_state(p) == DONE for p in outputs):
            todo.append(item)
    return todo, broken


def describe_os_error(err: OSError, path: str | os.PathLike) -> str:
    """A one-line explanation of a failed write, naming the usual fix."""
    if err.errno == errno.ENOSPC:
        return f"disk full while writing {path}; free some space and run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; choose another location"
    return f"cannot write {path}: {err.strerror or err}"


# Pixel limit for images read from files: the whole image is decoded in memory (3 bytes a
# pixel, and more while converting), though the model only sees it at 1024 pixels a side.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "TINYSAM_MAX_PIXELS"

# Pillow modes that convert("RGB") maps faithfully (8 bits a channel, or palette / 1-bit).
_EIGHT_BIT_MODES = {
    "1",
    "L",
    "LA",
    "La",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the fix."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (a decompression bomb, or a photo to scale down)."""


def positive_int_env(name: str, default: int) -> int:
    """``$NAME`` as a positive whole number (``1e6`` allowed), ``default`` when unset or empty;
    a ValueError naming the variable otherwise: a misconfigured server fails at start."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = int(float(value))
    except (ValueError, OverflowError):
        number = 0
    if number < 1:
        raise ValueError(f"${name}={value!r} is not a positive whole number")
    return number


def max_pixels_default() -> int:
    """The pixel limit: ``$TINYSAM_MAX_PIXELS`` if set, else ``DEFAULT_MAX_PIXELS``."""
    try:
        return positive_int_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)
    except ValueError:
        value = os.environ.get(MAX_PIXELS_ENV)
        raise ImageError(f"${MAX_PIXELS_ENV}={value!r} is not a positive pixel count") from None


def image_to_rgb(img: Image.Image, name: str = "image") -> np.ndarray:
    """A decoded Pillow image as HxWx3 uint8 RGB, converting each pixel format explicitly.

    16-bit images are scaled (65535 -> 255), float images must hold values in 0..1; anything
    else that would lose its meaning in Pillow's ``convert("RGB")`` (which clips) is refused.
    """
    mode = img.mode
    if mode in _EIGHT_BIT_MODES:
        return np.asarray(img.convert("RGB"))
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(
                f"{name}: 32-bit integer image with values outside 0..65535; "
                "save it as an 8- or 16-bit image"
            )
        gray = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ImageError(f"{name}: float image contains NaN or infinite values")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise ImageError(
                f"{name}: float image with values in [{values.min():g}, {values.max():g}]; "
                "only 0..1 floats are understood: save it as an 8-bit image"
            )
        gray = np.rint(values * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    raise ImageError(f"{name}: pixel format {mode!r} is not supported; save it as 8-bit RGB")


def read_image(source, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image (a path, bytes or a binary file) as HxWx3 uint8 RGB, EXIF-rotated.

    The size is checked from the header before anything is decoded: images over
    ``max_pixels`` (default: ``max_pixels_default()``) raise ``ImageTooLarge``; unreadable,
    truncated or unsupported files raise ``ImageError``. The one reader for files and uploads.
    """
    import warnings

    from PIL import ImageOps

    if max_pixels is None:
        max_pixels = max_pixels_default()
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    name = name or str(getattr(source, "name", None) or "image")
    too_large = (
        f"{name}: {{}} pixels, more than the limit of {max_pixels}; scale the image down, or "
        f"raise the limit (--max-pixels, or ${MAX_PIXELS_ENV})"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(too_large.format(f"{width}x{height} = {width * height}"))
            if width < 1 or height < 1:
                raise ImageError(f"{name}: image is empty ({width}x{height})")
            img.load()
            rgb = image_to_rgb(ImageOps.exif_transpose(img), name)
    except Image.DecompressionBombError:
        raise ImageTooLarge(too_large.format("over " + str(2 * Image.MAX_IMAGE_PIXELS))) from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image (not a format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"cannot read {name}: damaged or truncated image ({detail})") from None
    return rgb


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (see ``read_image``)."""
    path = Path(path)
    if not path.exists():
        broken = " (a broken symbolic link)" if path.is_symlink() else ""
        raise FileNotFoundError(f"image not found: {path}{broken}")
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    return read_image(path, name=str(path), max_pixels=max_pixels)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (or bool) array as a PNG, atomically, marked as ours."""
    from PIL.PngImagePlugin import PngInfo

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    mark = PngInfo()
    mark.add_text(*PNG_MARK)  # see output_state: the mark that makes it ours
    try:
        with atomic_write(path) as f:
            Image.fromarray(array).save(f, format="PNG", pnginfo=mark)
    except OSError as err:
        raise OSError(err.errno, describe_os_error(err, path)) from err


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    timeout: float = 30.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; the file appears only when complete.

    The received size is checked against the server's Content-Length, so an interrupted
    transfer is reported instead of leaving a truncated checkpoint behind.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    request = urllib.request.Request(url, headers={"User-Agent": "tinysam"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {url} ({reason})") from err

    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        try:
            with (
                atomic_write(dest) as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                if total is not None and received != total:
                    raise DownloadError(
                        f"download of {url} was interrupted after {received} of {total} bytes; "
                        "run again"
                    )
        except http.client.IncompleteRead as err:
            got = received + len(err.partial)
            raise DownloadError(
                f"download of {url} was interrupted after {got} of {total} bytes; run again"
            ) from err
        except (TimeoutError, ConnectionError) as err:
            raise DownloadError(f"download of {url} was interrupted ({err}); run again") from err
        except OSError as err:
            raise DownloadError(describe_os_error(err, dest)) from err
    return dest


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Every hop of a redirect passes ``check_url`` (which raises) before it is contacted."""

    def __init__(self, check_url: Callable[[str], None] | None) -> None:
        self.check_url = check_url

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.check_url is not None:
            self.check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 30.0,
    secret_headers: dict[str, str] | None = None,
    check_url: Callable[[str], None] | None = None,
) -> bytes:
    """The body at ``url`` in memory, refused (``DownloadError``) past ``max_bytes`` or past
    ``timeout`` seconds in all (a server sending a byte every few seconds is cut off then, not
    waited on read by read).

    ``secret_headers`` (an API token) go to ``url``'s server only, never to a server it
    redirects to (a storage service's signed URL, say). ``check_url`` is called with every
    URL a redirect leads to before it is contacted, and refuses it by raising.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "tinysam"})
    for name, value in (secret_headers or {}).items():
        request.add_unredirected_header(name, value)
    opener = urllib.request.build_opener(_CheckedRedirects(check_url))
    chunks, received = [], 0
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise DownloadError(
                    f"{url} is {int(length)} bytes, more than the limit of {max_bytes}"
                )
            while received <= max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DownloadError(
                        f"download of {url} took more than {timeout:g} s "
                        f"({received} bytes so far); the server is too slow"
                    )
                _set_read_timeout(response, left)
                chunk = response.read1(min(1 << 20, max_bytes + 1 - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
            raise DownloadError(
                f"download of {url} took more than {timeout:g} s ({received} bytes so far); "
                "the server is too slow"
            ) from err
        raise DownloadError(f"cannot download {url} ({reason})") from err
    if received > max_bytes:
        raise DownloadError(f"{url} is more than the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _set_read_timeout(response, seconds: float) -> None:
    """The next read waits at most ``seconds`` (what is left of the whole download's time)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))
