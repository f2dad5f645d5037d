"""Checkpoint resolution and download, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from tinysam import backends, build
from tinysam.build import CheckpointError, resolve_checkpoint
from tinysam.io import DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/ok"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path.startswith("/checkpoint"):
            data = self.server.checkpoint_bytes
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path.startswith("/truncated"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(vit_t_checkpoint):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.checkpoint_bytes = vit_t_checkpoint.read_bytes()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_download_success(server, tmp_path):
    dest = download_file(f"{server}/ok.pth", tmp_path / "w.pth", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["w.pth"]


def test_interrupted_transfer_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="interrupted after .* of 1048576 bytes"):
        download_file(f"{server}/truncated.pth", tmp_path / "w.pth", progress=False)
    assert _leftovers(tmp_path) == []


def test_interrupted_transfer_keeps_previous_file(server, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"old")
    with pytest.raises(DownloadError):
        download_file(f"{server}/truncated.pth", tmp_path / "w.pth", progress=False)
    assert (tmp_path / "w.pth").read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["w.pth"]


def test_http_404(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server}/missing.pth", tmp_path / "w.pth", progress=False)
    assert _leftovers(tmp_path) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No TINYSAM_CHECKPOINT, an empty cache of our own."""
    monkeypatch.delenv("TINYSAM_CHECKPOINT", raising=False)
    monkeypatch.setenv("TINYSAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_resolution_downloads_then_uses_cache(server, isolated, monkeypatch, vit_t_checkpoint):
    monkeypatch.setitem(build.WEIGHT_URLS, "vit_t", f"{server}/checkpoint/tinysam_42.3.pth")
    first = resolve_checkpoint("vit_t", progress=False)
    assert first.source == "download"
    assert first.path == isolated / "tinysam_42.3.pth"
    assert first.path.read_bytes() == vit_t_checkpoint.read_bytes()
    second = resolve_checkpoint("vit_t", progress=False)
    assert second.source == "cache" and second.path == first.path

    sam, resolved = backends.load_model(progress=False)
    assert resolved.source == "cache"
    assert sum(p.numel() for p in sam.parameters()) > 10_000_000


def test_environment_variable_wins_over_cache(isolated, monkeypatch, vit_t_checkpoint):
    isolated.mkdir(parents=True)
    (isolated / "tinysam_42.3.pth").write_bytes(b"cached")
    monkeypatch.setenv("TINYSAM_CHECKPOINT", str(vit_t_checkpoint))
    resolved = resolve_checkpoint("vit_t")
    assert resolved.source == "environment" and resolved.path == vit_t_checkpoint


def test_explicit_argument_wins(isolated, monkeypatch, vit_t_checkpoint, tmp_path):
    monkeypatch.setenv("TINYSAM_CHECKPOINT", str(tmp_path / "elsewhere.pth"))
    resolved = resolve_checkpoint("vit_t", vit_t_checkpoint)
    assert resolved.source == "argument" and resolved.path == vit_t_checkpoint


def test_offline_says_where_to_put_the_file(isolated, monkeypatch):
    monkeypatch.setitem(
        build.WEIGHT_URLS, "vit_t", f"http://127.0.0.1:{_closed_port()}/tinysam_42.3.pth"
    )
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("vit_t", progress=False)
    message = str(info.value)
    assert "cannot reach" in message
    assert str(isolated / "tinysam_42.3.pth") in message
    assert "TINYSAM_CHECKPOINT" in message and "\n" not in message
    assert not isolated.exists() or _leftovers(isolated) == []


def test_no_download_requested(isolated):
    with pytest.raises(CheckpointError, match="no vit_t checkpoint found"):
        resolve_checkpoint("vit_t", download=False)


def test_failed_download_surfaces_as_checkpoint_error(server, isolated, monkeypatch):
    monkeypatch.setitem(build.WEIGHT_URLS, "vit_t", f"{server}/truncated/tinysam_42.3.pth")
    with pytest.raises(CheckpointError, match="interrupted"):
        resolve_checkpoint("vit_t", progress=False)
    assert _leftovers(isolated) == []
