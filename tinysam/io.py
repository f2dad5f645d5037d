"""File I/O at the package's edges: images in, masks and downloads out, always atomically."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


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


def describe_os_error(err: OSError, path: str | os.PathLike) -> str:
    """A one-line explanation of a failed write, naming the usual fix."""
    if err.errno == errno.ENOSPC:
        return f"disk full while writing {path}; free some space and run again"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; choose another location"
    return f"cannot write {path}: {err.strerror or err}"


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    from PIL import ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: not a readable image file ({err})") from err


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (or bool) array as a PNG, atomically."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    try:
        with atomic_write(path) as f:
            Image.fromarray(array).save(f, format="PNG")
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
