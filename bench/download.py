"""Benchmark: `curate ingest urls.txt` against img2dataset on the same loopback server and URL list.

    python bench/download.py [--n 5000] [--pairs 3] [--workers 2] [--concurrency 64]
                             [--img2dataset /work/venv-i2d/bin/img2dataset] [--reencode]
    python bench/download.py --library [--n 2000] [--concurrency 8 32 64] [--latency-ms 0]

The server (bench/loopback.py) runs in its own process and is first measured alone with a
trivial raw-socket client. Each pair runs both CLIs once, back to back, in alternating order;
wall time is from process start to exit. Every run is checked: all N images ok, and (ours, and
img2dataset without --reencode) every stored sha256 equal to the served bytes'. Ratio = ours
images/s / img2dataset images/s per pair; the JSON line has the median and every pair.
img2dataset runs with resize_mode=no, webdataset output, retries 0, --skip_reencode True (it keeps
the original bytes, as ingest does; --reencode uses its default, decode + re-encode), its shards
as large as our parts. --library: the old issue-2 comparison, `download_many` vs sequential requests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit

from loopback import LoopbackServer, probe

DISTINCT_BODIES = 64


def make_bodies() -> list[bytes]:
    """Distinct JPEGs of ~20 KB (served round-robin under N distinct paths)."""
    from pipelines.synth import encode, make_image

    return [encode(make_image(seed, size=(320, 240), n_shapes=12), quality=90, subsampling=0)
            for seed in range(DISTINCT_BODIES)]


def run_ours(urls: Path, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    """`curate ingest` in a fresh process; returns (wall, CPU) seconds."""
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", str(urls), "--workdir", str(work),
           "--workers", str(args.workers), "--concurrency", str(args.concurrency), "--part-size", str(args.part_size)]
    return timed_run(cmd, env)


def run_img2dataset(urls: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """img2dataset in a fresh process (its own venv); returns (wall, CPU) seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    cmd = [args.img2dataset, "--url_list", str(urls), "--input_format", "txt", "--output_folder", str(out),
           "--output_format", "webdataset", "--processes_count", str(args.workers),
           "--thread_count", str(args.concurrency), "--resize_mode", "no", "--retries", "0",
           "--number_sample_per_shard", str(args.part_size), "--enable_wandb", "False",
           "--skip_reencode", str(not args.reencode)]
    return timed_run(cmd, env)


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command to its end; (wall seconds, CPU seconds of it and all its descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def check_ours(work: Path, expected: list[str]) -> None:
    """Every record ok, in input order, with the served bytes' sha256."""
    from curate.parts import read_table

    table = read_table(work / "ingest", columns=["status", "sha256"])
    if table.column("status").to_pylist() != ["ok"] * len(expected) or table.column("sha256").to_pylist() != expected:
        raise SystemExit(f"curate ingest: wrong records in {work}")


def check_img2dataset(out: Path, expected: list[str], same_bytes: bool) -> None:
    """Every sample a success (and, when the bytes are kept, with the served bytes' sha256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])
    rows = sorted(zip(table.column("key").to_pylist(), table.column("status").to_pylist(),
                      table.column("sha256").to_pylist()))
    if [r[1] for r in rows] != ["success"] * len(expected) or same_bytes and [r[2] for r in rows] != expected:
        raise SystemExit(f"img2dataset: {sum(r[1] == 'success' for r in rows)} of {len(expected)} ok in {out}")


def load_average() -> float:
    """The 1-minute load average (other jobs on the machine)."""
    return round(os.getloadavg()[0], 2)


def side_by_side(args: argparse.Namespace) -> None:
    """Server alone, then `--pairs` alternating pairs of img2dataset and curate ingest."""
    bodies = make_bodies()
    expected = [hashlib.sha256(bodies[i % len(bodies)]).hexdigest() for i in range(args.n)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        with LoopbackServer(bodies, args.n, procs=args.server_procs) as server:
            alone = {"keepalive_8_threads": probe(server, 4000, 8, reuse=True),
                     "new_connection_8_threads": probe(server, 4000, 8, reuse=False)}
            urls = tmp / "urls.txt"
            urls.write_text("".join(server.url(i) + "\n" for i in range(args.n)))
            pairs = []
            for k in range(args.pairs):
                pair = {"load_before": load_average()}
                for side in (("img2dataset", "ours") if k % 2 == 0 else ("ours", "img2dataset")):
                    cpu0 = server.cpu_seconds()
                    if side == "ours":
                        wall, cpu = run_ours(urls, tmp / "work", args)
                        check_ours(tmp / "work", expected)
                    else:
                        wall, cpu = run_img2dataset(urls, tmp / "i2d", args)
                        check_img2dataset(tmp / "i2d", expected, same_bytes=not args.reencode)
                    pair[f"{side}_s"], pair[f"{side}_cpu_ms_per_image"] = round(wall, 2), round(1000 * cpu / args.n, 3)
                    pair[f"server_cpu_s_{side}"] = round(server.cpu_seconds() - cpu0, 2)
                pair["ours_img_s"] = round(args.n / pair["ours_s"], 1)
                pair["img2dataset_img_s"] = round(args.n / pair["img2dataset_s"], 1)
                pair["ratio"] = round(pair["img2dataset_s"] / pair["ours_s"], 3)
                pairs.append(pair)
                print(pair, file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [p["ratio"] for p in pairs]
    emit("download_vs_img2dataset", n=args.n, workers=args.workers, concurrency=args.concurrency,
         part_size=args.part_size, reencode=args.reencode, mean_image_bytes=round(sum(map(len, bodies)) / len(bodies)),
         server_alone=alone, ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
         ours_img_s_median=statistics.median(p["ours_img_s"] for p in pairs),
         img2dataset_img_s_median=statistics.median(p["img2dataset_img_s"] for p in pairs),
         ours_cpu_ms_per_image_median=statistics.median(p["ours_cpu_ms_per_image"] for p in pairs),
         img2dataset_cpu_ms_per_image_median=statistics.median(p["img2dataset_cpu_ms_per_image"] for p in pairs),
         pairs=pairs)


def library(args: argparse.Namespace) -> None:
    """Issue 2's figures: `download` and `download_many` against a sequential requests loop."""
    import requests

    from curate.download import Client, DownloadSettings, download, download_many

    bodies = make_bodies()
    expected = [bodies[i % len(bodies)] for i in range(args.n)]

    def timed(run: object) -> dict[str, float]:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            got = run()
            best = min(best, time.perf_counter() - start)
            if [got.get(i) for i in range(args.n)] != expected:
                raise SystemExit("wrong or missing bodies")
        return {"seconds": round(best, 3), "images_per_s": round(args.n / best, 1)}

    def sequential(urls: list[str]) -> dict[int, bytes]:
        with requests.Session() as session:
            return {i: session.get(url, timeout=10).content for i, url in enumerate(urls)}

    def ours_sequential(urls: list[str]) -> dict[int, bytes]:
        client = Client()
        try:
            return {i: download(url, DownloadSettings(), client=client).data for i, url in enumerate(urls)}
        finally:
            client.close()

    with LoopbackServer(bodies, args.n, latency=args.latency_ms / 1000) as server:
        urls = [server.url(i) for i in range(args.n)]
        sequential(urls[:50])
        base = timed(lambda: sequential(urls))
        seq = timed(lambda: ours_sequential(urls))
        many = {str(c): timed(lambda c=c: {i: r.data for i, r in download_many(urls, DownloadSettings(concurrency=c))})
                for c in args.concurrency_list}
    for result in [seq, *many.values()]:
        result["ratio"] = round(result["images_per_s"] / base["images_per_s"], 2)
    emit("download_library", n=args.n, latency_ms=args.latency_ms, baseline_requests_sequential=base,
         download_sequential=seq, download_many=many, requests=requests.__version__)


def main() -> None:
    """Parse flags and run the side-by-side comparison (or the --library one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of images (distinct URLs)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating runs of both tools")
    parser.add_argument("--workers", type=int, default=2, help="processes of each tool")
    parser.add_argument("--concurrency", type=int, default=64, help="download threads per process")
    parser.add_argument("--part-size", type=int, default=1000, help="our part size = img2dataset's shard size")
    parser.add_argument("--server-procs", type=int, default=1)
    parser.add_argument("--img2dataset", default="/work/venv-i2d/bin/img2dataset", help="its CLI, in its own venv")
    parser.add_argument("--reencode", action="store_true", help="img2dataset decodes and re-encodes every image")
    parser.add_argument("--library", action="store_true", help="download_many vs sequential requests instead")
    parser.add_argument("--concurrency-list", type=int, nargs="+", default=[8, 32, 64], help="--library only")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="--library only: server delay per request")
    parser.add_argument("--repeat", type=int, default=3, help="--library only: best of this many runs")
    args = parser.parse_args()
    (library if args.library else side_by_side)(args)


if __name__ == "__main__":
    main()
