"""The board's one download policy (edge_runtime/service/download.py) against a real HTTP server on loopback that
lies, drips, redirects elsewhere or sends too much: every refusal names why and leaves no partial file behind;
a genuine download, and one resumed at the right offset, arrive whole."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_runtime.service.download import Cancelled, DownloadPolicy, FetchError, download

BODY = bytes(range(256)) * 400          # 100 KiB


class FileServer:
    """A loopback HTTP server whose answer the test sets: mode in {"ok", "no-range", "wrong-offset", "wrong-total", "drip",
    "redirect-other-port", "redirect-same", "oversize"}."""

    def __init__(self):
        self.mode, self.requests = "ok", []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/bundle.tar"

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if self.mode == "redirect-other-port":
            h.send_response(302)
            h.send_header("Location", f"http://127.0.0.1:{self.httpd.server_port + 1}/bundle.tar")
            h.end_headers()
        elif self.mode == "redirect-same" and h.path == "/bundle.tar":
            h.send_response(302)
            h.send_header("Location", "/moved/bundle.tar")
            h.end_headers()
        elif self.mode == "drip":
            h.send_response(200)
            h.send_header("Content-Length", str(len(BODY)))
            h.end_headers()
            try:
                for b in BODY:
                    h.wfile.write(bytes([b]))
                    h.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.mode == "wrong-total" and start:
            body = BODY[start:] + BODY
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{2 * len(BODY) - 1}/{2 * len(BODY)}")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif self.mode == "wrong-offset" and start:
            body = BODY[start - 10:]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start - 10}-{len(BODY) - 1}/{len(BODY)}")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif start and self.mode != "no-range":
            body = BODY[start:]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        else:
            body = BODY * 3 if self.mode == "oversize" else BODY
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


POLICY = DownloadPolicy(max_bytes=1 << 20, reserve_bytes=0)


def test_a_genuine_download_arrives_whole(server, tmp_path):
    part = tmp_path / "a.part"
    assert download(server.url, part, len(BODY), POLICY) == 0
    assert part.read_bytes() == BODY


def test_a_stopped_download_resumes_at_its_offset(server, tmp_path):
    part = tmp_path / "a.part"
    part.write_bytes(BODY[:1000])
    assert download(server.url, part, len(BODY), POLICY) == 1000
    assert part.read_bytes() == BODY and server.requests[-1][1] == "bytes=1000-"


def test_a_server_without_ranges_sends_it_whole_again(server, tmp_path):
    server.mode = "no-range"
    part = tmp_path / "a.part"
    part.write_bytes(BODY[:1000])
    assert download(server.url, part, len(BODY), POLICY) == 0
    assert part.read_bytes() == BODY


@pytest.mark.parametrize("mode", ["wrong-offset", "wrong-total"])
def test_a_content_range_that_does_not_answer_the_request_is_refused_and_the_part_removed(server, tmp_path, mode):
    server.mode = mode
    part = tmp_path / "a.part"
    part.write_bytes(BODY[:1000])
    with pytest.raises(FetchError, match="Content-Range"):
        download(server.url, part, len(BODY), POLICY)
    assert not part.exists()                                # the next, genuine download starts clean
    server.mode = "ok"
    assert download(server.url, part, len(BODY), POLICY) == 0 and part.read_bytes() == BODY


def test_a_server_that_drips_is_dropped_by_the_minimum_rate(server, tmp_path):
    server.mode = "drip"
    part = tmp_path / "a.part"
    policy = DownloadPolicy(max_bytes=1 << 20, reserve_bytes=0, min_rate=1000, rate_window=1.0)
    with pytest.raises(FetchError, match="under the minimum"):
        download(server.url, part, len(BODY), policy)
    assert not part.exists()


def test_a_download_over_its_total_time_is_dropped(server, tmp_path):
    server.mode = "drip"
    policy = DownloadPolicy(max_bytes=1 << 20, reserve_bytes=0, min_rate=0, total_seconds=1.0)
    with pytest.raises(FetchError, match="not finished within"):
        download(server.url, tmp_path / "a.part", len(BODY), policy)
    assert not (tmp_path / "a.part").exists()


def test_more_than_the_stated_size_is_refused(server, tmp_path):
    server.mode = "oversize"
    with pytest.raises(FetchError, match="more than"):
        download(server.url, tmp_path / "a.part", len(BODY), POLICY)
    assert not (tmp_path / "a.part").exists()


def test_a_redirect_to_another_port_is_refused_one_on_the_same_server_followed(server, tmp_path):
    server.mode = "redirect-other-port"
    with pytest.raises(FetchError, match="redirect to another server refused"):
        download(server.url, tmp_path / "a.part", len(BODY), POLICY)
    assert not (tmp_path / "a.part").exists()
    server.mode = "redirect-same"
    assert download(server.url, tmp_path / "b.part", len(BODY), POLICY) == 0
    assert (tmp_path / "b.part").read_bytes() == BODY


def test_no_room_on_the_disk_is_refused_before_anything_is_fetched(server, tmp_path):
    policy = DownloadPolicy(max_bytes=1 << 20, reserve_bytes=1 << 62)
    with pytest.raises(FetchError, match="kept free") as exc:
        download(server.url, tmp_path / "a.part", len(BODY), policy)
    assert exc.value.disk_full and server.requests == []


def test_a_cancelled_download_keeps_its_part_to_resume(server, tmp_path):
    server.mode = "drip"
    cancel = threading.Event()
    part = tmp_path / "a.part"
    t = threading.Timer(1.0, cancel.set)
    t.start()
    with pytest.raises(Cancelled):
        download(server.url, part, len(BODY), DownloadPolicy(max_bytes=1 << 20, reserve_bytes=0, min_rate=0),
                 cancel=cancel)
    assert part.exists() and 0 < part.stat().st_size < len(BODY)
