"""HTTP image downloader for the ingest stage: bounded, retrying, never raising per URL.

`download` fetches one URL and always returns a `DownloadResult` whose `status` is "ok" or a
short machine-readable reason (see `REASONS`). `download_many` fans a (possibly huge, lazy)
iterable of URLs out over worker threads, keeping at most 2 * concurrency URLs in flight so
memory stays bounded for millions of inputs.

Requests go straight through urllib3: one `Client` (a pool of kept-alive connections per host)
is shared by all download threads. Redirects are followed by hand so that every hop is
size-bounded and scheme-checked. Every URL is bounded in time as a whole (`deadline`: DNS,
connect, attempts, redirects, waits and body), so a server trickling bytes cannot hold a worker;
compressed bodies are decoded under `max_bytes`.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
import urllib3.exceptions as u3

from curate.deadline import Deadline, WatchedHTTPPool, WatchedHTTPSPool

REASONS: tuple[str, ...] = (
    "ok", "bad_scheme", "bad_url", "http_<code>", "http_5xx", "timeout", "connection_error",
    "truncated", "too_large", "too_many_redirects", "noai", "ssl_error", "decode_error", "error",
)
"""Every value `DownloadResult.status` can take ("http_<code>" is e.g. "http_404")."""

RETRYABLE: frozenset[str] = frozenset({"http_5xx", "timeout", "connection_error", "truncated"})
"""Failure reasons that are usually transient and therefore retried with backoff."""

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_NOAI_TOKENS = frozenset({"noai", "noimageai"})
_TOKEN_SPLIT = re.compile(r"[\s,:;]+")
_CHUNK = 64 * 1024
_DRAIN_LIMIT = 64 * 1024
_ACCEPT = "image/avif,image/webp,image/*,*/*;q=0.8"
_ACCEPT_ENCODING = "identity, gzip;q=0.5, deflate;q=0.5"  # what `_read_body` decodes under max_bytes

_sleep: Callable[[float], object] = time.sleep
_default_client: Client | None = None
_default_lock = threading.Lock()


@dataclass(frozen=True)
class DownloadSettings:
    """Knobs for one download run; defaults suit polite bulk crawling of image hosts."""

    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 8.0
    max_bytes: int = 32 * 2**20
    max_redirects: int = 5
    respect_noai: bool = True
    user_agent: str = "dinocurate/0.1 (+image curation)"
    concurrency: int = 32
    deadline: float = 120.0  # seconds for one URL in all: attempts, redirects, backoff and body

    def __post_init__(self) -> None:
        """Reject nonsensical settings early instead of failing every URL later."""
        if self.timeout <= 0 or self.deadline <= 0:
            raise ValueError("timeout and deadline must be > 0")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("retries and max_redirects must be >= 0")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0")
        if self.max_bytes < 1 or self.concurrency < 1:
            raise ValueError("max_bytes and concurrency must be >= 1")


@dataclass
class DownloadResult:
    """Outcome for one input URL: body when ok, otherwise a reason and a one-line detail."""

    url: str
    status: str
    data: bytes | None
    http_status: int | None
    attempts: int
    error: str | None
    content_type: str | None

    @property
    def ok(self) -> bool:
        """True when the body was downloaded in full."""
        return self.status == "ok"


class Client:
    """HTTP connection pools shared by download threads: kept-alive connections reused per host.

    Thread-safe; `pool_size` connections are kept per host (more are opened when needed). Its
    connections obey the calling thread's `Deadline`, and DNS lookups are bounded too.
    """

    def __init__(self, pool_size: int = 32, hosts: int = 256) -> None:
        try:
            import certifi
            ca_certs: str | None = certifi.where()  # the CA bundle requests uses, where installed
        except ImportError:
            ca_certs = None
        self._manager = urllib3.PoolManager(num_pools=hosts, maxsize=pool_size, block=False, retries=False,
                                            ca_certs=ca_certs)
        self._manager.pool_classes_by_scheme = {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}

    def get(self, url: str, headers: dict[str, str], timeout: float) -> urllib3.BaseHTTPResponse:
        """Send one GET; the response's body is left unread (streamed by the caller)."""
        return self._manager.urlopen("GET", url, headers=headers, timeout=urllib3.Timeout(timeout, timeout),
                                     redirect=False, retries=False, preload_content=False, decode_content=False)

    def close(self) -> None:
        """Close every pooled connection."""
        self._manager.clear()


def download(url: str, settings: DownloadSettings, client: Client | None = None) -> DownloadResult:
    """Fetch one URL with retries; never raises for a per-URL problem.

    Without `client`, a process-wide one is used (connections are reused across calls).
    """
    return _download(url, settings, client if client is not None else _shared_client(), None)


def download_many(urls: Iterable[str], settings: DownloadSettings) -> Iterator[tuple[int, DownloadResult]]:
    """Download `urls` on `settings.concurrency` threads, yielding (input index, result) as they finish.

    The input is consumed lazily: at most 2 * concurrency URLs are pulled ahead of the results
    already yielded. Closing the generator early cancels queued work and stops retry waits.
    """
    window = 2 * settings.concurrency
    finished: queue.SimpleQueue[tuple[int, DownloadResult]] = queue.SimpleQueue()
    stop = threading.Event()
    client = Client(pool_size=settings.concurrency)

    def work(index: int, url: str) -> None:
        try:
            result = _download(url, settings, client, stop)
        except Exception as exc:  # a bug must not hang the consumer waiting for this index
            result = _result(url, "error", _one_line(exc))
        finished.put((index, result))

    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="download")
    try:
        in_flight = 0
        source = enumerate(urls)
        exhausted = False
        while True:
            while not exhausted and in_flight < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                pool.submit(work, *item)
                in_flight += 1
            if in_flight == 0:
                return
            index, result = finished.get()
            in_flight -= 1
            yield index, result
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()


def _shared_client() -> Client:
    """The process-wide client of plain `download` calls, made on first use."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def _download(url: str, settings: DownloadSettings, client: Client, stop: threading.Event | None) -> DownloadResult:
    """Validate, then attempt up to retries + 1 times with capped exponential backoff."""
    problem = _check_url(url)
    if problem is not None:
        return _result(url, *problem)
    attempts = 0
    with Deadline(settings.deadline) as deadline:
        while True:
            attempts += 1
            result = _attempt(url, settings, client, deadline)
            result.attempts = attempts
            if result.status not in RETRYABLE or attempts > settings.retries:
                return result
            delay = min(settings.backoff * 2 ** (attempts - 1), settings.backoff_max)
            if delay >= deadline.remaining():
                return result
            if stop is None:
                _sleep(delay)
            elif stop.wait(delay):
                return result


def _attempt(url: str, settings: DownloadSettings, client: Client, deadline: Deadline) -> DownloadResult:
    """One attempt: follow up to max_redirects redirects, then classify and read the final response."""
    headers = {"User-Agent": settings.user_agent, "Accept": _ACCEPT, "Accept-Encoding": _ACCEPT_ENCODING}
    current = url
    hops = 0
    resp: urllib3.BaseHTTPResponse | None = None
    reading = False
    try:
        while True:
            left = deadline.remaining()
            if left <= 0:
                return _past_deadline(url, settings, resp)
            reading = False
            resp = client.get(current, headers, min(settings.timeout, left))
            reading = True
            try:
                if resp.status not in _REDIRECT_CODES or "location" not in resp.headers:
                    result = _read_final(url, resp, settings, deadline)
                    return _past_deadline(url, settings, resp) if deadline.expired else result
                if hops == settings.max_redirects:
                    return _result(url, "too_many_redirects", f"more than {settings.max_redirects} redirects", resp)
                target = _redirect_target(current, resp)
                _drain(resp)
            finally:
                _finish(resp)
            hops += 1
            problem = _check_url(target)
            if problem is not None:
                status, error = problem
                return _result(url, status, f"redirect to {target!r}: {error}", resp)
            current = target
    except Exception as exc:
        if deadline.expired or deadline.remaining() <= 0:
            return _past_deadline(url, settings, resp)
        return _result(url, _classify(exc, reading), _one_line(exc), resp)


def _finish(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to its pool; one whose body was not read to the end is closed first."""
    if not resp.closed:
        resp.close()
    resp.release_conn()


def _past_deadline(url: str, settings: DownloadSettings, resp: urllib3.BaseHTTPResponse | None) -> DownloadResult:
    return _result(url, "timeout", f"deadline of {settings.deadline:g} s for the whole download passed", resp)


def _read_final(url: str, resp: urllib3.BaseHTTPResponse, settings: DownloadSettings, deadline: Deadline) -> DownloadResult:
    """Turn a non-redirect response into a result, streaming the body under the size cap."""
    code = resp.status
    if code >= 500:
        _drain(resp)
        return _result(url, "http_5xx", f"HTTP {code} {resp.reason}", resp)
    if not 200 <= code < 300:
        _drain(resp)
        return _result(url, f"http_{code}", f"HTTP {code} {resp.reason}", resp)
    if settings.respect_noai and _is_noai(resp.headers.get("X-Robots-Tag")):
        return _result(url, "noai", f"X-Robots-Tag: {resp.headers['X-Robots-Tag']}", resp)
    declared = _content_length(resp)
    if declared is not None and declared > settings.max_bytes:
        return _result(url, "too_large", f"Content-Length {declared} > max_bytes {settings.max_bytes}", resp)
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        return _result(url, "decode_error", f"unsupported Content-Encoding {encoding!r}", resp)
    # gzip or zlib stream (auto-detected); output bounded by max_bytes, so a gzip bomb stays small
    decoder = None if encoding in ("", "identity") else zlib.decompressobj(47)
    body = bytearray()
    received = 0
    for chunk in resp.stream(_CHUNK, decode_content=False):
        received += len(chunk)
        if decoder is None:
            body += chunk
        else:
            try:
                body += decoder.decompress(chunk, settings.max_bytes + 1 - len(body))
            except zlib.error as exc:
                return _result(url, "decode_error", f"bad {encoding} body: {exc}", resp)
        if len(body) > settings.max_bytes:
            return _result(url, "too_large", f"body exceeded max_bytes {settings.max_bytes}", resp)
        if deadline.remaining() <= 0:
            return _past_deadline(url, settings, resp)
    if declared is not None and received < declared:
        return _result(url, "truncated", f"got {received} of {declared} declared bytes", resp)
    if decoder is not None and not decoder.eof:
        return _result(url, "truncated", f"{encoding} stream ends early", resp)
    return DownloadResult(url, "ok", bytes(body), code, 0, None, resp.headers.get("Content-Type"))


def _check_url(url: object) -> tuple[str, str] | None:
    """(status, error) when `url` cannot be fetched over http(s), else None; no network."""
    if not isinstance(url, str):
        return "bad_url", f"not a string: {type(url).__name__}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        return "bad_url", _one_line(exc)
    if not parts.scheme:
        return "bad_url", "no scheme"
    if parts.scheme.lower() not in ("http", "https"):
        return "bad_scheme", f"scheme {parts.scheme!r} is not http(s)"
    if not parts.hostname:
        return "bad_url", "no host"
    return None


def _redirect_target(current: str, resp: urllib3.BaseHTTPResponse) -> str:
    """Absolute URL of a redirect; Location is decoded like browsers do (UTF-8 sent as latin-1).

    A Location that cannot be joined is returned as is, for `_check_url` to reject.
    """
    location = resp.headers["location"]
    try:
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    try:
        return urljoin(current, location)
    except ValueError:
        return location


def _is_noai(value: str | None) -> bool:
    """True when an X-Robots-Tag value holds a noai/noimageai token, for any (or no) bot name."""
    return bool(value) and not _NOAI_TOKENS.isdisjoint(_TOKEN_SPLIT.split(value.lower()))


def _content_length(resp: urllib3.BaseHTTPResponse) -> int | None:
    """The declared body length, or None when absent or unparseable."""
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value.split(",")[0].strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _drain(resp: urllib3.BaseHTTPResponse) -> None:
    """Read a small unwanted body so the connection can be reused; give up past a limit."""
    declared = _content_length(resp)
    if declared is not None and declared > _DRAIN_LIMIT:
        return
    read = 0
    try:
        for chunk in resp.stream(_CHUNK, decode_content=False):
            read += len(chunk)
            if read > _DRAIN_LIMIT:
                return
    except (u3.HTTPError, OSError):
        pass


def _classify(exc: Exception, reading: bool) -> str:
    """Map a urllib3 exception to a result status (`reading`: raised while reading the body)."""
    if isinstance(exc, u3.SSLError):
        return "ssl_error"
    if isinstance(exc, u3.NewConnectionError):  # urllib3 derives it from ConnectTimeoutError: test it first
        return "connection_error"
    if isinstance(exc, (u3.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, u3.DecodeError):
        return "decode_error"
    if isinstance(exc, (u3.ProtocolError, OSError)):  # the connection broke: mid-body it is a truncated body
        return "truncated" if reading else "connection_error"
    if isinstance(exc, (u3.LocationValueError, u3.LocationParseError, UnicodeError)):
        return "bad_url"
    return "error"


def _one_line(exc: BaseException) -> str:
    """A short single-line description of an exception."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _result(url: object, status: str, error: str, resp: urllib3.BaseHTTPResponse | None = None) -> DownloadResult:
    """A failed result, keeping the HTTP status and content type when a response was seen."""
    http_status = resp.status if resp is not None else None
    content_type = resp.headers.get("Content-Type") if resp is not None else None
    return DownloadResult(str(url), status, None, http_status, 0, error, content_type)
