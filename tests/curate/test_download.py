"""curate.download against a real loopback HTTP server: exact statuses, attempts and server hits."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import tracemalloc

import pytest

from curate.download import RETRYABLE, Client, DownloadResult, DownloadSettings, download, download_many
from tests.httpserver import ImageServer, image_bytes

FAST = DownloadSettings(timeout=2.0, retries=2, backoff=0.01, backoff_max=0.05, max_bytes=2**20, concurrency=4)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(slow_seconds=1.5) as srv:
        yield srv


def get(srv: ImageServer, path: str, **changes: object) -> DownloadResult:
    return download(srv.url(path), replace(FAST, **changes))


def test_ok_returns_exact_bytes_and_metadata(server: ImageServer) -> None:
    res = get(server, "/img/7.jpg")
    assert res.status == "ok" and res.ok
    assert res.data == image_bytes(7)
    assert (res.http_status, res.attempts, res.error, res.content_type) == (200, 1, None, "image/jpeg")
    assert res.url == server.url("/img/7.jpg")
    assert server.hits["/img/7.jpg"] == 1 and server.ok_hits["/img/7.jpg"] == 1


def test_added_file_and_exact_size_limit(server: ImageServer) -> None:
    body = bytes(range(256)) * 40
    server.add("/exact.bin", body, "application/octet-stream")
    server.add("/exact-chunked.bin", body, "application/octet-stream", chunked=True)
    for path in ("/exact.bin", "/exact-chunked.bin"):
        assert get(server, path, max_bytes=len(body)).data == body
        assert get(server, path, max_bytes=len(body) - 1).status == "too_large"


def test_404_is_not_retried(server: ImageServer) -> None:
    res = get(server, "/404")
    assert (res.status, res.http_status, res.attempts, res.data) == ("http_404", 404, 1, None)
    assert res.error == "HTTP 404 Not Found"
    assert server.hits["/404"] == 1 and server.ok_hits["/404"] == 0


def test_flaky_500_succeeds_on_third_attempt(server: ImageServer) -> None:
    res = get(server, "/flaky500/a")
    assert (res.status, res.attempts, res.http_status) == ("ok", 3, 200)
    assert res.data == server.good_image
    assert server.hits["/flaky500/a"] == 3 and server.ok_hits["/flaky500/a"] == 1


def test_flaky_500_fails_when_retries_run_out(server: ImageServer) -> None:
    res = get(server, "/flaky500/b", retries=1)
    assert (res.status, res.attempts, res.http_status) == ("http_5xx", 2, 500)


def test_always_500_exhausts_retries(server: ImageServer) -> None:
    res = get(server, "/always500", retries=3)
    assert (res.status, res.http_status, res.attempts) == ("http_5xx", 500, 4)
    assert server.hits["/always500"] == 4


def test_backoff_is_exponential_and_capped(server: ImageServer, monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr("curate.download._sleep", delays.append)
    res = get(server, "/always500", retries=5, backoff=0.1, backoff_max=0.5)
    assert res.attempts == 6
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_slow_response_times_out_and_is_retried(server: ImageServer) -> None:
    start = time.monotonic()
    res = get(server, "/slow", timeout=0.3, retries=1)
    assert (res.status, res.attempts, res.http_status) == ("timeout", 2, None)
    assert server.hits["/slow"] == 2
    assert time.monotonic() - start < 2.5  # two full slow answers would take 3 s


def test_stall_mid_body_is_a_timeout(server: ImageServer) -> None:
    res = get(server, "/slow-body", timeout=0.3, retries=0)
    assert (res.status, res.attempts, res.http_status) == ("timeout", 1, 200)


def test_truncated_body_is_retried_then_reported(server: ImageServer) -> None:
    res = get(server, "/truncated", retries=1)
    assert (res.status, res.attempts, res.http_status, res.data) == ("truncated", 2, 200, None)
    assert server.hits["/truncated"] == 2


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_big_bodies_are_too_large_without_retry(server: ImageServer, path: str) -> None:
    res = get(server, path, max_bytes=2**20)
    assert (res.status, res.attempts, res.http_status, res.data) == ("too_large", 1, 200, None)
    assert server.hits[path] == 1
    assert ("Content-Length" in res.error) == (path == "/big")


def test_redirect_loop(server: ImageServer) -> None:
    res = get(server, "/loop", max_redirects=5)
    assert (res.status, res.attempts, res.http_status) == ("too_many_redirects", 1, 302)
    assert server.hits["/loop"] + server.hits["/loop2"] == 6


def test_redirect_is_followed_within_limit(server: ImageServer) -> None:
    res = get(server, "/redirect/img/3.jpg")
    assert (res.status, res.http_status, res.data) == ("ok", 200, image_bytes(3))
    assert server.hits["/redirect/img/3.jpg"] == 1 and server.hits["/img/3.jpg"] == 1
    assert get(server, "/redirect/redirect/img/3.jpg", max_redirects=2).status == "ok"
    assert get(server, "/redirect/redirect/img/3.jpg", max_redirects=1).status == "too_many_redirects"
    assert get(server, "/redirect/img/3.jpg", max_redirects=0).status == "too_many_redirects"


def test_redirect_to_other_scheme_is_refused(server: ImageServer) -> None:
    server.add("/to-file", b"", headers={"Location": "file:///etc/passwd"}, status=302)
    server.add("/to-nowhere", b"", headers={"Location": "https://"}, status=301)
    server.add("/to-broken", b"", headers={"Location": "http://[::1/x"}, status=308)
    res = get(server, "/to-file")
    assert (res.status, res.http_status, res.attempts) == ("bad_scheme", 302, 1)
    assert "file:///etc/passwd" in res.error
    assert get(server, "/to-nowhere").status == "bad_url"
    assert get(server, "/to-broken").status == "bad_url"
    server.add("/relative", b"", headers={"Location": "img/5.jpg"}, status=307)
    assert get(server, "/relative").data == image_bytes(5)


def test_redirect_body_is_not_read(server: ImageServer) -> None:
    server.add("/heavy-redirect", server.big_body, "text/html", {"Location": "/img/2.jpg"}, status=302)
    assert get(server, "/img/2.jpg").status == "ok"  # first-use allocations out of the way
    tracemalloc.start()
    res = get(server, "/heavy-redirect")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (res.status, res.data) == ("ok", image_bytes(2))
    assert peak < len(server.big_body) // 4


@pytest.mark.parametrize("path", ["/noai", "/noimageai"])
def test_noai_header_is_respected(server: ImageServer, path: str) -> None:
    res = get(server, path)
    assert (res.status, res.attempts, res.http_status, res.data) == ("noai", 1, 200, None)
    assert server.hits[path] == 1
    res = get(server, path, respect_noai=False)
    assert (res.status, res.data) == ("ok", server.good_image)


@pytest.mark.parametrize(
    "value, blocked",
    [("NoAI", True), ("noindex,noimageai", True), ("googlebot: noai", True), ("noindex, nofollow", False),
     ("noaix", False), ("", False)],
)
def test_noai_token_parsing(server: ImageServer, value: str, blocked: bool) -> None:
    server.add("/tagged.jpg", b"x", headers={"X-Robots-Tag": value})
    assert get(server, "/tagged.jpg").status == ("noai" if blocked else "ok")


@pytest.mark.parametrize(
    "url, status",
    [("ftp://x", "bad_scheme"), ("file:///etc/passwd", "bad_scheme"), ("javascript:alert(1)", "bad_scheme"),
     ("not a url", "bad_url"), ("", "bad_url"), ("http://", "bad_url"), ("http://[::1", "bad_url"),
     ("http://host:99999/x", "bad_url")],
)
def test_bad_urls_fail_without_network(url: str, status: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    client = Client()
    client.get = refuse  # type: ignore[method-assign]
    res = download(url, FAST, client=client)
    assert (res.status, res.attempts, res.data, res.http_status) == (status, 0, None, None)
    assert res.url == url and res.error


def test_connection_refused_and_dropped_are_retried(server: ImageServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    res = download(f"http://127.0.0.1:{port}/x.jpg", replace(FAST, retries=1))
    assert (res.status, res.attempts, res.http_status) == ("connection_error", 2, None)
    res = get(server, "/drop", retries=1)
    assert (res.status, res.attempts) == ("connection_error", 2)
    assert server.hits["/drop"] == 2


def test_gzip_bodies_are_decoded_and_bad_gzip_reported(server: ImageServer) -> None:
    payload = b"abc" * 1000
    server.add("/gz", gzip.compress(payload), "text/plain", {"Content-Encoding": "gzip"})
    server.add("/badgz", b"definitely not gzip", "text/plain", {"Content-Encoding": "gzip"})
    assert get(server, "/gz").data == payload
    assert get(server, "/gz", max_bytes=2000).status == "too_large"
    res = get(server, "/badgz")
    assert (res.status, res.attempts) == ("decode_error", 1)


def test_client_reuses_one_connection_and_sends_user_agent(server: ImageServer) -> None:
    client = Client()
    results = [download(server.url(f"/img/{i}.jpg"), FAST, client=client) for i in range(20)]
    results.append(download(server.url("/404"), FAST, client=client))
    results.append(download(server.url("/redirect/img/0.jpg"), FAST, client=client))
    client.close()
    assert [r.status for r in results] == ["ok"] * 20 + ["http_404", "ok"]
    assert server.connections_total == 1
    assert server.request_headers("/img/0.jpg")["User-Agent"] == FAST.user_agent
    assert get(server, "/img/1.jpg", user_agent="tester/1").status == "ok"
    assert server.request_headers("/img/1.jpg")["User-Agent"] == "tester/1"


def test_download_many_reuses_connections_per_host(server: ImageServer) -> None:
    """Keep-alive: 300 URLs of one host over 8 threads take at most 8 connections, not 300."""
    urls = [server.url(f"/img/{i % 40}.jpg") for i in range(300)] + [server.url("/404")] * 10
    results = dict(download_many(urls, replace(FAST, concurrency=8)))
    assert [results[i].status for i in range(310)] == ["ok"] * 300 + ["http_404"] * 10
    assert server.connections_total <= 8


def test_host_names_are_resolved_and_a_hanging_lookup_is_bounded(server: ImageServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    res = download(f"http://localhost:{server.port}/img/3.jpg", FAST)
    assert (res.status, res.data) == ("ok", image_bytes(3))
    real = socket.getaddrinfo

    def hang(host: str, *args: object, **kwargs: object) -> object:
        if host == "hangs.invalid":
            time.sleep(3)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    start = time.monotonic()
    res = download("http://hangs.invalid/x.jpg", replace(FAST, timeout=0.3, retries=1))
    assert time.monotonic() - start < 2.0
    assert (res.status, res.attempts) == ("timeout", 2) and "DNS lookup" in res.error
    res = download("http://unknown-host.invalid/x.jpg", replace(FAST, retries=0))
    assert res.status in ("connection_error", "timeout") and res.data is None  # NXDOMAIN, or no resolver


def test_settings_are_validated() -> None:
    for bad in ({"timeout": 0}, {"retries": -1}, {"concurrency": 0}, {"max_bytes": 0}, {"backoff": -1}):
        with pytest.raises(ValueError):
            DownloadSettings(**bad)
    assert RETRYABLE == {"http_5xx", "timeout", "connection_error", "truncated"}


def mixed_urls(srv: ImageServer, n: int) -> list[tuple[str, str]]:
    kinds = [
        (lambda i: srv.url(f"/img/{i}.jpg"), "ok"),
        (lambda i: srv.url("/404"), "http_404"),
        (lambda i: srv.url(f"/redirect/img/{i}.jpg"), "ok"),
        (lambda i: srv.url("/noai"), "noai"),
        (lambda i: f"ftp://host/{i}", "bad_scheme"),
        (lambda i: srv.url(f"/flaky500/m{i}"), "ok"),
        (lambda i: srv.url("/always500"), "http_5xx"),
        (lambda i: srv.url("/big-chunked"), "too_large"),
        (lambda i: srv.url("/truncated"), "truncated"),
    ]
    return [(kinds[i % len(kinds)][0](i), kinds[i % len(kinds)][1]) for i in range(n)]


def test_download_many_yields_exactly_one_result_per_input(server: ImageServer) -> None:
    cases = mixed_urls(server, 200)
    settings = replace(FAST, concurrency=8)
    got = dict.fromkeys(range(len(cases)))
    for index, res in download_many((url for url, _ in cases), settings):
        assert got[index] is None, f"index {index} yielded twice"
        got[index] = res
    for index, (url, expected) in enumerate(cases):
        assert got[index].url == url
        assert got[index].status == expected, (url, got[index])
        if "/img/" in url:
            assert got[index].data == image_bytes(int(url.rsplit("/", 1)[1][:-4]))
    assert not [t for t in threading.enumerate() if t.name.startswith("download")]


def test_download_many_pulls_input_lazily(server: ImageServer) -> None:
    concurrency, n = 4, 300
    pulled = 0

    def source() -> Iterator[str]:
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield server.url(f"/img/{i % 50}.jpg")

    settings = replace(FAST, concurrency=concurrency)
    yielded, max_ahead = 0, 0
    for index, res in download_many(source(), settings):
        assert res.status == "ok"
        yielded += 1
        max_ahead = max(max_ahead, pulled - yielded)
        if yielded % 50 == 0:
            time.sleep(0.05)  # a slow consumer must not let the producer run ahead
    assert (yielded, pulled) == (n, n)
    assert max_ahead <= 2 * concurrency


def test_download_many_runs_concurrently() -> None:
    with ImageServer(slow_seconds=0.5) as srv:
        start = time.monotonic()
        results = list(download_many([srv.url("/slow")] * 8, replace(FAST, concurrency=8)))
        elapsed = time.monotonic() - start
    assert sorted(i for i, _ in results) == list(range(8))
    assert all(r.status == "ok" for _, r in results)
    assert elapsed < 2.5  # sequentially this takes 4 s


def test_download_many_close_early_stops_workers(server: ImageServer) -> None:
    settings = replace(FAST, concurrency=4, retries=10, backoff=5.0, backoff_max=5.0)
    urls = [server.url("/img/1.jpg")] + [server.url("/always500")] * 1000
    gen = download_many(iter(urls), settings)
    assert next(gen)[0] == 0
    start = time.monotonic()
    gen.close()
    assert time.monotonic() - start < 2.0  # well under one 5 s backoff wait
    assert server.hits["/always500"] <= 2 * settings.concurrency
    assert not [t for t in threading.enumerate() if t.name.startswith("download")]


def test_download_many_empty_input() -> None:
    assert list(download_many([], FAST)) == []
