"""Hostile HTTP servers on 127.0.0.1: every URL ends in a recorded status within a bounded time.

Settings are tight (deadline 1.5 s, per-read timeout 1 s, trickle every 0.2 s so that no per-read
timeout ever fires): only the whole-request deadline can end a trickle.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace

import pytest

from curate.download import DownloadSettings, download, download_many
from curate.ingest import IngestSettings, ingest
from curate.parts import read_table
from tests.httpserver import ImageServer, gzip_zeros

TIGHT = DownloadSettings(timeout=1.0, retries=2, backoff=0.01, backoff_max=0.05, max_bytes=2**20, concurrency=4,
                         deadline=1.5)
SLACK = 3.0  # seconds of scheduling slack on a busy 2-core machine (without the deadline: forever)

# path -> status every URL must end in
HOSTILE = {
    "/trickle": "timeout",
    "/trickle-headers": "timeout",
    "/stall": "timeout",
    "/drop-chunked": "truncated",
    "/truncated": "truncated",
    "/gzip-bomb": "too_large",
    "/endless/0": "too_many_redirects",
    "/loop": "too_many_redirects",
    "/to-ftp": "bad_scheme",
    "/to-file": "bad_scheme",
    "/drop": "connection_error",
}


@pytest.fixture(scope="module")
def hostile() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=30, trickle_interval=0.2, bomb_bytes=64 * 2**20) as srv:
        gzip_zeros(srv.bomb_bytes)  # compressed once up front: ~1 s on a busy machine, not the client's deadline
        yield srv


@pytest.mark.parametrize("path", sorted(HOSTILE))
def test_each_hostile_route_ends_in_its_status_within_the_deadline(hostile, path):
    start = time.monotonic()
    res = download(hostile.url(path), TIGHT)
    elapsed = time.monotonic() - start
    assert res.status == HOSTILE[path], res
    assert res.data is None and res.error and "\n" not in res.error
    assert elapsed < TIGHT.deadline + SLACK


def test_trickle_is_cut_by_the_deadline_not_by_a_read_timeout(hostile):
    """With a per-read timeout longer than the deadline, only the deadline ends it (no retry after)."""
    start = time.monotonic()
    res = download(hostile.url("/trickle"), replace(TIGHT, timeout=10.0, deadline=1.0, retries=5))
    assert time.monotonic() - start < 1.0 + SLACK
    assert (res.status, res.attempts, res.http_status) == ("timeout", 1, 200)
    assert "deadline of 1 s" in res.error


def test_gzip_bomb_is_refused_without_inflating_it(hostile):
    tracemalloc.start()
    res = download(hostile.url("/gzip-bomb"), replace(TIGHT, max_bytes=4 * 2**20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.status == "too_large" and res.attempts == 1
    assert peak < 16 * 2**20  # 64 MB expanded would be far more


def test_html_behind_an_image_url_is_recorded_as_not_an_image(hostile, tmp_path):
    (tmp_path / "urls.txt").write_text(hostile.url("/html") + "\n")
    ingest([str(tmp_path / "urls.txt")], tmp_path / "w", IngestSettings(workers=1, download=TIGHT))
    (row,) = read_table(tmp_path / "w").to_pylist()
    assert (row["status"], row["http_status"]) == ("not_image", 200)


def test_a_run_of_hostile_urls_has_bounded_total_time(hostile, tmp_path):
    """Through ingest: every URL a record with its status; the total is bounded by the deadlines."""
    paths = sorted(HOSTILE) * 2 + ["/img/1.jpg", "/img/2.jpg"]
    (tmp_path / "urls.txt").write_text("".join(f"{hostile.url(p)}?{i}\n" for i, p in enumerate(paths)))
    settings = IngestSettings(part_size=100, workers=1, download=replace(TIGHT, concurrency=8))
    start = time.monotonic()
    counts = ingest([str(tmp_path / "urls.txt")], tmp_path / "w", settings)
    elapsed = time.monotonic() - start
    rows = read_table(tmp_path / "w").to_pylist()
    assert [r["status"] for r in rows] == [HOSTILE.get(p, "ok") for p in paths]
    assert sum(counts.values()) == len(paths)
    # 24 URLs on 8 threads: at most 3 deadlines one after the other
    assert elapsed < 3 * TIGHT.deadline + 3 * SLACK


def test_download_many_total_time_is_bounded(hostile):
    urls = [hostile.url(p) for p in ("/trickle", "/stall", "/trickle-headers")] * 4
    start = time.monotonic()
    results = dict(download_many(urls, replace(TIGHT, concurrency=4, deadline=1.0)))
    assert time.monotonic() - start < 3 * 1.0 + 2 * SLACK
    assert sorted(results) == list(range(12)) and {r.status for r in results.values()} == {"timeout"}


def test_a_certificate_that_does_not_verify_is_an_ssl_error(tmp_path):
    """TLS is verified: a self-signed certificate ends in ssl_error (not retried, not accepted)."""
    import socket
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    handshakes = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                handshakes.append("completed")
            except (OSError, ssl.SSLError):
                handshakes.append("refused")

    threading.Thread(target=serve, daemon=True).start()
    try:
        res = download(f"https://localhost:{listener.getsockname()[1]}/x.jpg", TIGHT)
    finally:
        listener.close()
    assert (res.status, res.attempts, res.data) == ("ssl_error", 1, None)
    assert "certificate" in res.error.lower() and "completed" not in handshakes
