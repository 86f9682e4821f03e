"""Benchmark the vector index (curate.index) on synthetic clustered embeddings at scale.

Writes n L2-normalised float16 vectors (Gaussian clusters of mixed spread around random unit
centres) as memory-mapped parts, computes the exact top-k of held-out queries by streaming the
parts, then for each index kind builds the index in a fresh process (so its peak RSS is its own)
and reports build time, search time and recall@k for several nprobe values (plus the auto one).
Prints one JSON line; progress goes to stderr.

Run: python bench/index.py [--n 1000000] [--dim 256] [--kinds ivf_flat,ivf_pq] [--nprobe 4,8,16,32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from _common import emit, peak_rss_mb

PART_ROWS = 100_000


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = x.astype(np.float32, copy=False)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def centres(clusters: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random unit cluster centres and per-cluster noise norms, uniform in [spread/2, 3*spread/2]."""
    rng = np.random.default_rng(seed)
    return unit(rng.standard_normal((clusters, dim))), rng.uniform(0.5 * spread, 1.5 * spread, clusters)


def points(c: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> np.ndarray:
    """n unit vectors: a random centre plus isotropic Gaussian noise of that cluster's norm."""
    mean, spread = c
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(mean), n)
    noise = rng.standard_normal((n, mean.shape[1]), dtype=np.float32)
    noise *= (spread[which] / np.sqrt(mean.shape[1])).astype(np.float32)[:, None]
    return unit(mean[which] + noise)


def note(message: str) -> None:
    """Progress line on stderr (the JSON result goes to stdout)."""
    print(f"[bench/index {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_parts(directory: Path, n: int, c: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    """The n base vectors as float16 part-XXXXX.npy files of PART_ROWS rows."""
    for i, start in enumerate(range(0, n, PART_ROWS)):
        rows = min(PART_ROWS, n - start)
        np.save(directory / f"part-{i:05d}.npy", points(c, rows, seed + 1 + i).astype(np.float16))


def exact_topk(directory: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product, streaming the memory-mapped parts chunk by chunk."""
    import faiss

    from curate.index import EmbeddingParts

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, chunk in EmbeddingParts(directory).chunks():
        sims, ids = faiss.knn(queries, chunk, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, ids + start)
    heap.finalize()
    return heap.I


def run_kind(kind: str, directory: str, queries: np.ndarray, k: int, nprobes: list[int], pq_m: int | None) -> dict:
    """In a fresh process: build one index kind, search at each nprobe; timings, ids, peak RSS."""
    from curate.index import IndexSpec, build_index

    cpu0, t0 = time.process_time(), time.perf_counter()
    index = build_index(directory, IndexSpec(kind=kind, pq_m=pq_m if kind == "ivf_pq" else None))
    build_s = time.perf_counter() - t0
    out = {
        "build_s": round(build_s, 1),
        "build_cpu_util": round((time.process_time() - cpu0) / build_s, 2),
        "nlist": index.spec.nlist,
        "train_size": index.spec.train_size,
        "auto_nprobe": index.nprobe,
        "searches": [],
    }
    if kind == "ivf_pq":
        out["pq_m"], out["pq_bits"] = index.spec.pq_m, index.spec.pq_bits
    for nprobe in sorted(set(nprobes + [index.nprobe])):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, ids = index.knn(queries, k)
        out["searches"].append({"nprobe": index.nprobe, "search_s": round(time.perf_counter() - t0, 2), "ids": ids})
    out["peak_rss_mb"] = round(peak_rss_self_mb())
    return out


def peak_rss_self_mb() -> float:
    """Peak RSS of this process in MiB from VmHWM (else getrusage): a spawned child's ru_maxrss
    starts at its parent's RSS (it survives fork and exec), VmHWM is its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum()
    return round(float(hits) / truth.size, 4)


def main() -> None:
    """Parse the flags, run the benchmark, print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=1.5, help="mean noise norm of a cluster (unit centres); each cluster draws its own in [s/2, 3s/2]")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="ivf_flat,ivf_pq")
    ap.add_argument("--nprobe", default="4,8,16,32", help="nprobe values to search with (plus the auto one)")
    ap.add_argument("--pq-m", type=int, default=None, help="IVF-PQ sub-quantizers (default: auto)")
    ap.add_argument("--workdir", default=None, help="where to write the parts (default: a temp dir, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    parts = root / "embed"
    parts.mkdir(parents=True, exist_ok=True)
    try:
        c = centres(args.clusters, args.dim, args.spread, args.seed)
        t0 = time.perf_counter()
        write_parts(parts, args.n, c, args.seed)
        write_s = time.perf_counter() - t0
        note(f"wrote {args.n:,} x {args.dim} float16 in {write_s:.1f} s")
        queries = points(c, args.queries, args.seed + 10**6)

        t0 = time.perf_counter()
        truth = exact_topk(parts, queries, args.k)
        exact_s = time.perf_counter() - t0
        note(f"exact top-{args.k} of {args.queries:,} queries in {exact_s:.1f} s")

        results = {}
        for kind in args.kinds.split(","):
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                nprobes = [int(v) for v in args.nprobe.split(",") if v]
                res = pool.submit(run_kind, kind, str(parts), queries, args.k, nprobes, args.pq_m).result()
            for s in res["searches"]:
                s["recall_at_k"] = recall(s.pop("ids"), truth)
                s["qps"] = round(args.queries / max(s["search_s"], 1e-9))
            results[kind] = res
            note(f"{kind}: built in {res['build_s']} s, {[(s['nprobe'], s['recall_at_k']) for s in res['searches']]}")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    emit(
        "index",
        n=args.n,
        dim=args.dim,
        clusters=args.clusters,
        spread=args.spread,
        queries=args.queries,
        k=args.k,
        parts_gib=round(args.n * args.dim * 2 / 2**30, 2),
        write_parts_s=round(write_s, 1),
        exact_search_s=round(exact_s, 1),
        results=results,
        parent_peak_rss_mb=round(peak_rss_mb()),
        total_s=round(time.perf_counter() - t_start, 1),
        loadavg_before=[round(v, 2) for v in load_before],
        loadavg_after=[round(v, 2) for v in os.getloadavg()],
    )


if __name__ == "__main__":
    main()
