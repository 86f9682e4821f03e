"""A whole-request deadline for HTTP downloads: past it, the request's sockets are shut down.

Per-read timeouts do not bound a request: a server that trickles one byte every half second (or
keeps the headers coming) never trips them. When a `Deadline` passes, one watchdog thread (shared
by all deadlines) shuts down every socket the request used, which wakes the blocked read at once.
Sockets are registered by the connection classes of `WatchedHTTPPool`/`WatchedHTTPSPool`, for the
calling thread's current deadline (`Deadline.active`). Those connections also bound the DNS lookup
(by the connect timeout and the deadline), which a socket timeout does not.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
import threading
import time
from types import TracebackType

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

_active = threading.local()


class Deadline:
    """Context manager: a point in time after which the current thread's requests are cut."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._done = False

    @staticmethod
    def active() -> Deadline | None:
        """The deadline of the calling thread's download, if any."""
        return getattr(_active, "deadline", None)

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket | None) -> None:
        """Cut `sock` when the deadline passes (at once if it already has)."""
        if sock is None:
            return
        with self._lock:
            if not self.expired:
                self._sockets.append(sock)
                return
        _shutdown(sock)

    def __enter__(self) -> Deadline:
        _active.deadline = self
        _WATCHDOG.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _active.deadline = None
        with self._lock:
            self._done = True
            self._sockets.clear()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)


class _Watchdog:
    """One thread for all deadlines of the process: sleeps until the earliest, fires it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._limit = 1024
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            if len(self._heap) >= self._limit:  # drop finished downloads now and then (amortised O(1))
                self._heap = [entry for entry in self._heap if not entry[2]._done]
                heapq.heapify(self._heap)
                self._limit = max(1024, 2 * len(self._heap))
            heapq.heappush(self._heap, (deadline.at, id(deadline), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="deadline-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][2] is deadline:  # only a new earliest deadline changes the watchdog's wait
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline._fire()


_WATCHDOG = _Watchdog()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_DNS_TTL = 60.0
_DNS_CACHE_MAX = 4096
_dns_cache: dict[tuple[str, int], tuple[float, list[tuple]]] = {}


def resolve(host: str, port: int, timeout: float | None) -> list[tuple]:
    """getaddrinfo for a TCP connection, bounded by `timeout` seconds and cached for a minute.

    The lookup runs on a daemon thread of its own, so a hanging resolver holds neither the caller
    (past its bound it gets `socket.timeout`) nor other lookups, nor the process's exit.
    """
    key = (host, port)
    now = time.monotonic()
    hit = _dns_cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    box: list[list[tuple] | OSError] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except OSError as exc:
            box.append(exc)
        done.set()

    threading.Thread(target=lookup, name="dns", daemon=True).start()
    if not done.wait(timeout):
        raise socket.timeout(f"DNS lookup of {host!r} took longer than {timeout:g} s")
    if isinstance(box[0], OSError):
        raise box[0]
    if len(_dns_cache) >= _DNS_CACHE_MAX:
        _dns_cache.clear()
    _dns_cache[key] = (now + _DNS_TTL, box[0])
    return box[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class _Watched:
    """Mixin for urllib3 connections: a bounded DNS lookup, and the socket handed to the deadline."""

    def _new_conn(self) -> socket.socket:
        if _is_ip(self._dns_host):
            return super()._new_conn()  # type: ignore[misc]
        deadline = Deadline.active()
        limit = self.timeout if isinstance(self.timeout, (int, float)) else None
        if deadline is not None:
            limit = max(0.0, deadline.remaining() if limit is None else min(limit, deadline.remaining()))
        try:
            infos = resolve(self._dns_host, self.port, limit)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, str(exc)) from exc
        error: OSError | None = None
        for _family, _type, _proto, _name, address in infos:
            try:
                return create_connection(address[:2], self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except socket.timeout as exc:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                                f"(connect timeout={self.timeout})") from exc
            except OSError as exc:
                error = exc
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")

    def request(self, *args: object, **kwargs: object) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        deadline = Deadline.active()
        if deadline is not None:
            deadline.watch(self.sock)  # type: ignore[attr-defined]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    """An HTTP connection under the calling thread's deadline."""


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    """The HTTPS twin of `_WatchedHTTPConnection` (TLS still checks the host name, not the address)."""


class WatchedHTTPPool(HTTPConnectionPool):
    """A urllib3 pool whose connections obey the calling thread's `Deadline`."""

    ConnectionCls = _WatchedHTTPConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    """The HTTPS twin of `WatchedHTTPPool`."""

    ConnectionCls = _WatchedHTTPSConnection
