"""A whole-request deadline for HTTP downloads: past it, the request's sockets are shut down.

Per-read timeouts do not bound a request: a server that trickles one byte every half second (or
keeps the headers coming) never trips them. `Deadline` arms a timer that shuts down every socket
a request used, which wakes the blocked read at once. Sockets are registered by the connection
classes of `deadline_adapter`, for the thread's current deadline (`Deadline.active`).
"""

from __future__ import annotations

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
        self._timer: threading.Timer | None = None

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
        self._timer = threading.Timer(max(0.0, self.remaining()), self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _active.deadline = None
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._sockets.clear()

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)


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
