"""A whole-request deadline for HTTP downloads: past it, the request's sockets are shut down.

Per-read timeouts do not bound a request: a server that trickles one byte every half second (or
keeps the headers coming) never trips them. When a `Deadline` passes, one watchdog thread (shared
by all deadlines) shuts down every socket the request used, which wakes the blocked read at once.
Sockets are registered by the connection classes of `DeadlineAdapter`, for the calling thread's
current deadline (`Deadline.active`).
"""

from __future__ import annotations

import heapq
import socket
import threading
import time
from types import TracebackType

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

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


class _WatchedHTTPConnection(HTTPConnection):
    """An HTTP connection whose socket is handed to the thread's deadline on every request."""

    def request(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        super().request(*args, **kwargs)  # type: ignore[arg-type]
        deadline = Deadline.active()
        if deadline is not None:
            deadline.watch(self.sock)


class _WatchedHTTPSConnection(HTTPSConnection):
    """The HTTPS twin of `_WatchedHTTPConnection`."""

    def request(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        super().request(*args, **kwargs)  # type: ignore[arg-type]
        deadline = Deadline.active()
        if deadline is not None:
            deadline.watch(self.sock)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connections obey the calling thread's `Deadline`."""

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
