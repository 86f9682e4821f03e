"""Benchmark: images/s of curate.download against a bare sequential requests loop, on loopback.

The `ImageServer` runs in a child process (so the server and the client do not share a GIL)
and serves N distinct URLs of ~20 KB JPEGs. Every configuration fetches the same URLs and
checks every body byte for byte; the JSON line reports the best of --repeat runs as images/s
and ratio = ours / baseline.

    python bench/download.py [--n 2000] [--concurrency 8 32 64] [--repeat 3] [--latency-ms 0]

With the default zero latency it measures pure client overhead (loopback, CPU-bound); with
--latency-ms it shows how much of a remote host's round trip the thread pool hides.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from curate.download import DownloadSettings, download, download_many  # noqa: E402
from pipelines.synth import encode, make_image  # noqa: E402
from tests.httpserver import ImageServer  # noqa: E402

DISTINCT_BODIES = 64


def make_bodies() -> list[bytes]:
    """Distinct ~20 KB JPEGs (served round-robin under N distinct paths)."""
    return [encode(make_image(seed, size=(320, 240), n_shapes=12), quality=95, subsampling=0)
            for seed in range(DISTINCT_BODIES)]


def serve(bodies: list[bytes], n: int, latency: float, port_queue: mp.Queue, stop: mp.Event) -> None:
    """Child process: serve /b/<i>.jpg for i < n until told to stop."""
    with ImageServer(latency=latency) as server:
        for i in range(n):
            server.add(f"/b/{i}.jpg", bodies[i % len(bodies)])
        port_queue.put(server.port)
        stop.wait()


def timed(name: str, run: Callable[[], dict[int, bytes]], expected: list[bytes], repeat: int) -> dict[str, float]:
    """Run one configuration `repeat` times, verify all bodies, and report the best throughput."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        got = run()
        best = min(best, time.perf_counter() - start)
        bad = [i for i, body in enumerate(expected) if got.get(i) != body]
        if bad:
            raise SystemExit(f"{name}: {len(bad)} wrong or missing bodies, first index {bad[0]}")
    return {"seconds": round(best, 3), "images_per_s": round(len(expected) / best, 1)}


def baseline(urls: list[str]) -> dict[int, bytes]:
    """A bare sequential loop over one plain requests.Session."""
    out = {}
    with requests.Session() as session:
        for i, url in enumerate(urls):
            resp = session.get(url, timeout=10)
            resp.raise_for_status()
            out[i] = resp.content
    return out


def ours_sequential(urls: list[str]) -> dict[int, bytes]:
    """`download` called in a loop (isolates per-request overhead from concurrency gains)."""
    settings = DownloadSettings()
    with requests.Session() as session:
        return {i: download(url, settings, session=session).data for i, url in enumerate(urls)}


def ours_many(urls: list[str], concurrency: int) -> dict[int, bytes]:
    """`download_many` at the given concurrency."""
    settings = DownloadSettings(concurrency=concurrency)
    return {i: res.data for i, res in download_many(iter(urls), settings)}


def main() -> None:
    """Parse flags, start the server process, run every configuration, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of images (distinct URLs)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best is reported")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="server delay per request (simulated RTT)")
    args = parser.parse_args()

    bodies = make_bodies()
    expected = [bodies[i % len(bodies)] for i in range(args.n)]
    ctx = mp.get_context("fork")
    port_queue, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=serve, args=(bodies, args.n, args.latency_ms / 1000, port_queue, stop), daemon=True)
    child.start()
    try:
        port = port_queue.get(timeout=60)
        urls = [f"http://127.0.0.1:{port}/b/{i}.jpg" for i in range(args.n)]
        baseline(urls[:50])  # warm-up: server threads, imports, caches
        base = timed("baseline", lambda: baseline(urls), expected, args.repeat)
        seq = timed("download", lambda: ours_sequential(urls), expected, args.repeat)
        many = {}
        for c in args.concurrency:
            many[str(c)] = timed(f"download_many[{c}]", lambda c=c: ours_many(urls, c), expected, args.repeat)
    finally:
        stop.set()
        child.join(timeout=10)
    for result in [seq, *many.values()]:
        result["ratio"] = round(result["images_per_s"] / base["images_per_s"], 2)
    print(json.dumps({
        "bench": "download",
        "n": args.n,
        "latency_ms": args.latency_ms,
        "repeat": args.repeat,
        "mean_image_bytes": round(sum(len(b) for b in expected) / len(expected)),
        "baseline_requests_sequential": base,
        "download_sequential": seq,
        "download_many": many,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "requests": requests.__version__,
        "server": "tests.httpserver.ImageServer (ThreadingHTTPServer) in a child process, 127.0.0.1",
    }))


if __name__ == "__main__":
    main()
