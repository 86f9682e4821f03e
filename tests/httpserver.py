"""A real loopback HTTP server for download/ingest tests and benchmarks.

`ImageServer` runs a `ThreadingHTTPServer` on 127.0.0.1 (random free port) in a daemon thread
and serves synthetic images plus a set of misbehaving routes (errors, slowness, truncation,
oversized bodies, redirect loops, noai headers) so that clients are tested against real sockets.

`latency` delays every answer (simulates a distant host, so concurrency can be measured).
Built-in routes (anything added with `add` takes precedence):
  /img/<seed>.jpg         a good JPEG (`image_bytes(seed)`)
  /404, /always500        those statuses
  /flaky500/<name>        500 for the first `flaky_failures` requests per name, then `good_image`
  /slow                   `good_image` after `slow_seconds`
  /slow-body              headers and half of `good_image`, then a `slow_seconds` stall, then the rest
  /truncated              declares len(good_image) but sends half, then closes
  /drop                   closes the connection without answering
  /big, /big-chunked      `big_bytes` of body, with Content-Length / chunked without it
  /loop -> /loop2 -> /loop  redirect loop; /redirect/<path> -> 302 to /<path>
  /noai, /noimageai       `good_image` with X-Robots-Tag "noai" / "otherbot: noimageai, noindex"
Hostile routes (they hold a connection until the client leaves or the server closes):
  /trickle                declares 1 MB, then sends one byte every `trickle_interval` s, forever
  /trickle-headers        a status line, then one header byte every `trickle_interval` s, forever
  /stall                  headers, then nothing, forever
  /drop-chunked           half of `good_image` in chunks, then hangs up without the last chunk
  /gzip-bomb              Content-Encoding: gzip of `bomb_bytes` zeros (about 1000:1)
  /html                   an HTML page served as text/html (e.g. behind an image URL)
  /endless/<n>            302 to /endless/<n+1>: redirects that never repeat and never end
  /to-ftp, /to-file       302 to ftp://... and file:///etc/passwd
"""

from __future__ import annotations

import functools
import socket
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from pipelines.synth import encode, make_image

_PIECE = 64 * 1024


@functools.lru_cache(maxsize=4)
def gzip_zeros(n: int) -> bytes:
    """A gzip stream of n zero bytes (the body of /gzip-bomb)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [comp.compress(block) for _ in range(n >> 20)]
    parts.append(comp.compress(bytes(n & ((1 << 20) - 1))))
    return b"".join(parts) + comp.flush()


@functools.lru_cache(maxsize=4096)
def image_bytes(seed: int) -> bytes:
    """The JPEG served at /img/<seed>.jpg (deterministic, cached)."""
    return encode(make_image(seed), quality=90)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its owner and stays silent about client disconnects."""

    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs when many clients connect at once
    owner: ImageServer

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients aborting mid-body is expected here; do not print tracebacks."""


class _Handler(BaseHTTPRequestHandler):
    """Routes every GET through the owning `ImageServer`."""

    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True  # headers and body go out in separate writes; avoid 40 ms stalls
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        try:
            self.server.owner._route(self)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def reply(
        self, status: int, body: bytes = b"", content_type: str | None = "image/jpeg",
        headers: dict[str, str] | None = None, chunked: bool = False,
    ) -> None:
        """Send a complete response (chunked on request) and count 200s."""
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status == 200:
            self.server.owner._count(self.server.owner._ok_hits, urlsplit(self.path).path)
        if not chunked:
            self.wfile.write(body)
            return
        for start in range(0, len(body), _PIECE):
            piece = body[start:start + _PIECE]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


class ImageServer:
    """Context manager running a loopback HTTP server with image and failure routes."""

    def __init__(
        self, slow_seconds: float = 3.0, flaky_failures: int = 2, big_bytes: int = 3 * 2**20, latency: float = 0.0,
        trickle_interval: float = 0.5, bomb_bytes: int = 256 * 2**20,
    ) -> None:
        self.slow_seconds = slow_seconds
        self.trickle_interval = trickle_interval
        self.bomb_bytes = bomb_bytes
        self.latency = latency
        self.flaky_failures = flaky_failures
        self.good_image = image_bytes(0)
        self.big_body = bytes(range(256)) * (big_bytes // 256) + bytes(big_bytes % 256)
        self._files: dict[str, tuple[int, bytes, str, dict[str, str], bool]] = {}
        self._last_headers: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._hits: Counter[str] = Counter()
        self._ok_hits: Counter[str] = Counter()
        self._flaky: Counter[str] = Counter()
        self._connections: set[socket.socket] = set()
        self._connections_total = 0
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ImageServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Bind 127.0.0.1:0 and serve in a daemon thread."""
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ImageServer", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, wake sleeping handlers and cut open keep-alive connections."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        """Absolute URL of `path` on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(
        self, path: str, body: bytes, content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None, *, chunked: bool = False, status: int = 200,
    ) -> str:
        """Serve `body` at `path` (overrides built-in routes); returns its URL.

        `chunked` sends it without Content-Length; `status` other than 200 (e.g. 302 with a
        Location header, or 403) makes arbitrary answers possible.
        """
        path = "/" + path.lstrip("/")
        with self._lock:
            self._files[path] = (status, body, content_type, dict(headers or {}), chunked)
        return self.url(path)

    def request_headers(self, path: str) -> dict[str, str]:
        """Headers of the last request for `path` (empty if never requested)."""
        with self._lock:
            return dict(self._last_headers.get("/" + path.lstrip("/"), {}))

    @property
    def hits(self) -> Counter[str]:
        """Snapshot of requests per path (every request, whatever the answer)."""
        with self._lock:
            return Counter(self._hits)

    @property
    def ok_hits(self) -> Counter[str]:
        """Snapshot of requests per path that were answered with status 200."""
        with self._lock:
            return Counter(self._ok_hits)

    @property
    def requests_total(self) -> int:
        """Number of requests received so far."""
        with self._lock:
            return sum(self._hits.values())

    @property
    def connections_total(self) -> int:
        """Number of TCP connections accepted so far (lets tests check keep-alive reuse)."""
        with self._lock:
            return self._connections_total

    def reset_counts(self) -> None:
        """Zero hits, ok_hits, recorded headers and the flaky-route state (keeps added files)."""
        with self._lock:
            self._last_headers.clear()
            self._hits.clear()
            self._ok_hits.clear()
            self._flaky.clear()

    def _count(self, counter: Counter[str], path: str) -> int:
        with self._lock:
            counter[path] += 1
            return counter[path]

    def _track(self, conn: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(conn)
                self._connections_total += 1
            else:
                self._connections.discard(conn)

    def _route(self, h: _Handler) -> None:
        """Answer one request according to the route table in the module docstring."""
        path = urlsplit(h.path).path
        with self._lock:
            self._hits[path] += 1
            self._last_headers[path] = dict(h.headers.items())
            served = self._files.get(path)
        if self.latency > 0:
            self._stopping.wait(self.latency)
        good = self.good_image
        if served is not None:
            status, body, content_type, headers, chunked = served
            h.reply(status, body, content_type, headers, chunked)
        elif path.startswith("/img/") and path.endswith(".jpg") and path[5:-4].isdigit():
            h.reply(200, image_bytes(int(path[5:-4])))
        elif path == "/404":
            h.reply(404, b"not found", "text/plain")
        elif path == "/always500":
            h.reply(500, b"server error", "text/plain")
        elif path.startswith("/flaky500/"):
            if self._count(self._flaky, path) <= self.flaky_failures:
                h.reply(500, b"try again", "text/plain")
            else:
                h.reply(200, good)
        elif path == "/slow":
            self._stopping.wait(self.slow_seconds)
            h.reply(200, good)
        elif path == "/slow-body":
            self._send_partial(h, good, stall=True)
        elif path == "/truncated":
            self._send_partial(h, good, stall=False)
        elif path == "/drop":
            h.close_connection = True
        elif path == "/big":
            h.reply(200, self.big_body, "application/octet-stream")
        elif path == "/big-chunked":
            h.reply(200, self.big_body, "application/octet-stream", chunked=True)
        elif path in ("/loop", "/loop2"):
            h.reply(302, b"", None, {"Location": "/loop2" if path == "/loop" else "/loop"})
        elif path.startswith("/redirect/"):
            h.reply(302, b"", None, {"Location": path[len("/redirect"):]})
        elif path in self._HOSTILE or path.startswith("/endless/"):
            self._hostile(h, path)
        elif path == "/noai":
            h.reply(200, good, headers={"X-Robots-Tag": "noai"})
        elif path == "/noimageai":
            h.reply(200, good, headers={"X-Robots-Tag": "otherbot: noimageai, noindex"})
        else:
            h.reply(404, b"no such route", "text/plain")

    _HOSTILE = frozenset({"/trickle", "/trickle-headers", "/stall", "/drop-chunked", "/gzip-bomb", "/html",
                          "/to-ftp", "/to-file"})

    def _hostile(self, h: _Handler, path: str) -> None:
        """The hostile routes listed in the module docstring."""
        if path.startswith("/endless/"):  # complete answers on a kept-alive connection
            n = int(path[len("/endless/"):] or 0) if path[len("/endless/"):].isdigit() else 0
            h.reply(302, b"", None, {"Location": f"/endless/{n + 1}"})
            return
        if path in ("/to-ftp", "/to-file"):
            target = f"ftp://127.0.0.1:{self.port}/x.jpg" if path == "/to-ftp" else "file:///etc/passwd"
            h.reply(302, b"", None, {"Location": target})
            return
        if path == "/html":
            h.reply(200, b"<!doctype html><html><body><h1>Not an image</h1></body></html>\n" * 20, "text/html")
            return
        if path == "/gzip-bomb":
            h.reply(200, gzip_zeros(self.bomb_bytes), "image/jpeg", {"Content-Encoding": "gzip"})
            return
        if path == "/drop-chunked":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            half = self.good_image[: len(self.good_image) // 2]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))
            h.wfile.flush()
            h.close_connection = True
        elif path == "/trickle-headers":
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(h, b"X-Slow: " + b"a" * 10**6)
        else:
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(10**6))
            h.end_headers()
            h.wfile.flush()
            if path == "/stall":
                self._stopping.wait(3600)
            else:
                self._trickle(h, b"\xff" * 10**6)
        h.close_connection = True  # the answer above is incomplete: hang up

    def _trickle(self, h: _Handler, data: bytes) -> None:
        """Send `data` one byte per `trickle_interval` until done, the client leaves or the server stops."""
        for i in range(len(data)):
            h.wfile.write(data[i:i + 1])
            h.wfile.flush()
            if self._stopping.wait(self.trickle_interval):
                return

    def _send_partial(self, h: _Handler, body: bytes, stall: bool) -> None:
        """Declare the full length, send half; then stall and finish, or hang up (truncation)."""
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        half = len(body) // 2
        h.wfile.write(body[:half])
        h.wfile.flush()
        if stall:
            self._stopping.wait(self.slow_seconds)
            h.wfile.write(body[half:])
        else:
            h.close_connection = True
