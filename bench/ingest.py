"""Folder ingest throughput vs a bare PIL decode loop on the same files, in the same run.

    python bench/ingest.py [--n 3000] [--size 128x96] [--repeat 3] [--rss 10000,100000] [--exact]
    python bench/ingest.py --plan-rss 1000000,4000000

Ratio = ingest images/s / bare decode images/s, for 1 process each and for 2 processes each,
each pair timed back to back, --repeat times (the first ingest also pays the one-time imports
of the process: pyarrow loads pandas). --exact: ingest with phash_exact (full decode, imagehash).
With --rss, also runs `curate ingest` in subprocesses on folders of those sizes and reports the
peak RSS of the largest process (memory must not grow with the pool). --plan-rss 1000000,4000000
measures only the planner on URL lists of those sizes (10% repeats), each in a fresh process, in the
process (`local`) and with its names counted on Ray actors (`ray`: a local Ray; the driver's RSS).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import ROOT, emit, make_folder


def bare_decode(paths: list[str]) -> int:
    """The baseline: read and fully decode every file with PIL."""
    from PIL import Image

    n = 0
    for p in paths:
        with Image.open(p) as img:
            img.load()
        n += 1
    return n


def bare_decode_parallel(paths: list[str], workers: int) -> int:
    chunks = [paths[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(bare_decode, chunks))


def run_ingest(folder: Path, work: Path, workers: int, part_size: int, exact: bool = False) -> float:
    from curate.images import CheckSettings
    from curate.ingest import IngestSettings, ingest

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    ingest([str(folder)], work, IngestSettings(part_size=part_size, workers=workers,
                                               check=CheckSettings(phash_exact=exact)))
    return time.perf_counter() - t0


def rss_for(n: int, tmp: Path) -> dict:
    folder = tmp / f"rss{n}"
    make_folder(folder, n, size=(64, 48))
    work = tmp / f"rss_work{n}"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "ingest", str(folder), "--workdir", str(work), "--workers", "2"]
    # a fresh wrapper process per size, so the peak of one run cannot hide in another's figure
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return {"files": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 1),
            "peak_rss_mb_largest_process": round(int(out.stdout.split()[-1]) / 1024, 1)}


PLAN_CHILD = """
import resource, shutil, sys, time
from curate.ingest import plan
urls, work, on_ray = sys.argv[1], sys.argv[2], sys.argv[3] == "ray"
if on_ray:  # the names counted on actors (executor ray): the driver's own RSS, the actors' apart
    import ray
    from pipelines.stages.ingest import ray_plan
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
t = time.process_time()
parts = ray_plan([urls], work, 10000, None) if on_ray else plan([urls], work, 10000)
print(time.process_time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, parts)
"""


def plan_rss_for(n: int, tmp: Path, repeats: float = 0.1, on: str = "local") -> dict:
    """Peak RSS of planning a URL list of n lines (a share `repeats` of them repeating earlier URLs) in a
    fresh process: the planner keeps a count of every name seen, to number the repeats."""
    urls = tmp / f"urls{n}.txt"
    distinct = max(1, int(n * (1 - repeats)))
    with open(urls, "w") as f:
        f.writelines(f"http://127.0.0.1:9/img/{i % distinct}.jpg\n" for i in range(n))
    work = tmp / f"plan_work{n}"
    shutil.rmtree(work, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(urls), str(work), on], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout.split()[-3:]
    shutil.rmtree(work, ignore_errors=True)
    urls.unlink()
    return {"urls": n, "repeats": repeats, "planner": on, "cpu_s": round(float(out[0]), 2),
            "peak_rss_mb": round(int(out[1]) / 1024, 1), "parts": int(out[2])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--part-size", type=int, default=500)
    ap.add_argument("--size", default="128x96", help="image size WxH of the generated JPEGs")
    ap.add_argument("--rss", default="", help="comma-separated folder sizes for the memory check")
    ap.add_argument("--plan-rss", default="", help="comma-separated URL-list sizes: peak RSS of the planner alone")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--exact", action="store_true", help="ingest with phash_exact=True")
    args = ap.parse_args()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_ingest_"))
    if args.plan_rss:  # the planner's memory only
        emit("ingest_plan", plans=[plan_rss_for(int(n), tmp, on=on) for n in args.plan_rss.split(",") if n
                                   for on in ("local", "ray")])
        return
    size = tuple(int(v) for v in args.size.split("x"))
    folder = tmp / f"folder{args.size}"
    paths = [str(p) for p in make_folder(folder, args.n, size=size)]
    bare_decode(paths[:200])  # warm the page cache
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(args.repeat):
        for workers in (1, 2):
            t0 = time.perf_counter()
            if workers == 1:
                bare_decode(paths)
            else:
                bare_decode_parallel(paths, workers)
            base = args.n / (time.perf_counter() - t0)
            ours = args.n / run_ingest(folder, tmp / "work", workers, args.part_size, args.exact)
            runs[workers].append((ours, base))
    figures = {}
    for workers, pairs in runs.items():
        ratios = sorted(o / b for o, b in pairs)
        ours, base = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
        figures[f"workers{workers}"] = {"ingest_images_per_s": round(ours, 1), "bare_decode_images_per_s": round(base, 1),
                                        "ratio": round(ratios[len(ratios) // 2], 3),
                                        "ratios": [round(r, 3) for r in ratios]}
    rss = [rss_for(int(n), tmp) for n in args.rss.split(",") if n]
    emit("ingest", n=args.n, image=f"{args.size} jpeg q85", phash="exact" if args.exact else "fast",
         repeat=args.repeat, **figures, rss=rss)


if __name__ == "__main__":
    main()
