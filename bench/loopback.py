"""A lean loopback image server for download benchmarks, run in its own process(es).

Serves GET /b/<i>.jpg (i < n) as bodies[i % len(bodies)], HTTP/1.1 keep-alive unless the client
asks for `Connection: close` or speaks HTTP/1.0; every answer has the same headers whoever asks,
so two clients are served identically. An asyncio protocol with no header parsing beyond what
it needs keeps the server's CPU per request small (it must not be the bottleneck; `probe`
measures it alone). Several processes can share the port (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_MAX_HEAD = 16 * 1024


class _Http(asyncio.Protocol):
    """One connection: answer each complete request head at once, in order."""

    def __init__(self, answers: Callable[[bytes], bytes | None], latency: float) -> None:
        self.answers, self.latency = answers, latency
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            line, _, fields = head.partition(b"\r\n")
            parts = line.split(b" ")
            lowered = fields.lower()
            close = (len(parts) != 3 or parts[2] == b"HTTP/1.0" and b"connection: keep-alive" not in lowered
                     or b"connection: close" in lowered)
            body = self.answers(parts[1]) if len(parts) == 3 and parts[0] == b"GET" else None
            if body is None:
                status, ctype, body = b"404 Not Found", b"text/plain", b"no such path\n"
            else:
                status, ctype = b"200 OK", b"image/jpeg"
            answer = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
                      % (status, ctype, len(body), b"close" if close else b"keep-alive") + body)
            if self.latency > 0:
                asyncio.get_running_loop().call_later(self.latency, self._send, answer, close)
            else:
                self._send(answer, close)
            if close:
                return

    def _send(self, answer: bytes, close: bool) -> None:
        if not self.transport.is_closing():
            self.transport.write(answer)
            if close:
                self.transport.close()


def _answers(bodies: list[bytes], n: int) -> Callable[[bytes], bytes | None]:
    def answer(path: bytes) -> bytes | None:
        if path.startswith(b"/b/") and path.endswith(b".jpg") and path[3:-4].isdigit():
            i = int(path[3:-4])
            return bodies[i % len(bodies)] if i < n else None
        return None
    return answer


def _serve(sock: socket.socket, bodies: list[bytes], n: int, latency: float, stop: mp.Event) -> None:
    """Child process: serve on the shared listening socket until `stop` is set."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Http(_answers(bodies, n), latency), sock=sock, backlog=1024)
        async with server:
            await loop.run_in_executor(None, stop.wait)
    asyncio.run(main())


class LoopbackServer:
    """Context manager: `procs` server processes (each answer `latency` s late) on one 127.0.0.1 port (forked, so they share the socket)."""

    def __init__(self, bodies: list[bytes], n: int, procs: int = 1, latency: float = 0.0) -> None:
        self.bodies, self.n, self.procs, self.latency = bodies, n, procs, latency
        self.port = 0
        self._children: list[mp.Process] = []

    def __enter__(self) -> LoopbackServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        ctx = mp.get_context("fork")
        self._stop = ctx.Event()
        self._children = [ctx.Process(target=_serve, args=(sock, self.bodies, self.n, self.latency, self._stop), daemon=True)
                          for _ in range(self.procs)]
        for child in self._children:
            child.start()
        sock.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for child in self._children:
            child.join(timeout=10)

    def url(self, i: int) -> str:
        """The URL of image i."""
        return f"http://127.0.0.1:{self.port}/b/{i}.jpg"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server processes have used so far (Linux /proc)."""
        total = 0
        for child in self._children:
            with open(f"/proc/{child.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")


def _get(sock: socket.socket, path: str, close: bool) -> bytes:
    """A bare HTTP/1.1 GET on a raw socket; returns the body (Content-Length framing only)."""
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += _recv(sock)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += _recv(sock)
    return body


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed the connection mid-answer")
    return data


def probe(server: LoopbackServer, count: int, threads: int, reuse: bool) -> dict[str, float]:
    """Requests/s a trivial raw-socket client gets from `server` (keep-alive or one connection each)."""
    def worker(indices: range) -> int:
        got = 0
        sock = None
        for i in indices:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", server.port))
            got += len(_get(sock, f"/b/{i}.jpg", close=not reuse))
            if not reuse:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()
        return got

    cpu0 = server.cpu_seconds()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, [range(t, count, threads) for t in range(threads)]))
    wall = time.perf_counter() - start
    return {"requests_per_s": round(count / wall, 1), "server_cpu_ms_per_request": round(
        1000 * (server.cpu_seconds() - cpu0) / count, 3)}

