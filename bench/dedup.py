"""Benchmark embedding copy dedup (curate.dedup.copy_dedup) at scale on synthetic embeddings.

Writes n L2-normalised float16 vectors as memory-mapped parts: a clustered background (Gaussian
clusters whose members have cosine ~0.2) with planted duplicate groups of 2-5 near copies
(cosine ~0.8 between copies). Builds one IVF index (curate.index), runs copy_dedup with it for
each k, and reports seconds, peak RSS, the recall of planted pairs (same component) and the
recall of the k-NN edges against exact flat search for a subsample of query rows. One JSON line.

Run: python bench/dedup.py [--n 1000000] [--dim 256] [--groups 20000] [--k 64,16] [--nprobe N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from _common import emit, peak_rss_mb

PART_ROWS = 100_000


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = x.astype(np.float32, copy=False)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_layout(n: int, groups: int, seed: int) -> np.ndarray:
    """Planted group label per row (-1: background), groups of 2-5 rows scattered over the rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, groups)
    if sizes.sum() > n:
        raise SystemExit(f"{groups} groups need {sizes.sum()} rows, more than n={n}")
    label = np.full(n, -1, dtype=np.int64)
    label[: sizes.sum()] = np.repeat(np.arange(groups), sizes)
    return label[rng.permutation(n)]


def write_parts(directory: Path, label: np.ndarray, dim: int, clusters: int, spread: float,
                noise: float, seed: int) -> None:
    """Background rows around cluster centres; each planted group's rows are noisy copies of one base."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    groups = int(label.max()) + 1
    bases = unit(centres[rng.integers(0, clusters, groups)]
                 + spread * rng.standard_normal((groups, dim), dtype=np.float32) / np.sqrt(dim))
    for p, start in enumerate(range(0, len(label), PART_ROWS)):
        lab = label[start : start + PART_ROWS]
        prng = np.random.default_rng([seed, p])
        x = centres[prng.integers(0, clusters, len(lab))]
        x = x + spread * prng.standard_normal(x.shape, dtype=np.float32) / np.float32(np.sqrt(dim))
        planted = lab >= 0
        x[planted] = bases[lab[planted]] + noise * prng.standard_normal((int(planted.sum()), dim),
                                                                       dtype=np.float32) / np.float32(np.sqrt(dim))
        np.save(directory / f"part-{p:05d}.npy", unit(x).astype(np.float16))


def exact_neighbours(directory: Path, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-(k + 1) (sims, ids) of the given rows over all rows, streaming the parts."""
    from curate.dedup import gather
    from curate.index import EmbeddingParts

    parts = EmbeddingParts(directory)
    queries = gather(parts, rows).astype(np.float32)
    heap = faiss.ResultHeap(len(rows), k + 1, keep_max=True)
    for start, chunk in parts.chunks():
        sims, ids = faiss.knn(queries, chunk, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, ids + start)
    heap.finalize()
    return heap.D, heap.I


def exact_edges(rows: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int, threshold: float) -> set[tuple[int, int]]:
    """(query row, neighbour) pairs among each row's exact k nearest others with sim > threshold."""
    out = set()
    for q, row_sims, row_ids in zip(rows, sims, ids):
        others = [(s, j) for s, j in zip(row_sims, row_ids) if j != q and j >= 0][:k]
        out.update((int(q), int(j)) for s, j in others if s > threshold)
    return out


def pair_recall(found_i: np.ndarray, found_j: np.ndarray, truth: set[tuple[int, int]], rows: np.ndarray) -> float:
    """Fraction of the exact (row, neighbour) pairs that the run's edges contain (either direction)."""
    keep = np.isin(found_i, rows) | np.isin(found_j, rows)
    found = set(zip(found_i[keep].tolist(), found_j[keep].tolist()))
    hits = sum(1 for q, j in truth if (min(q, j), max(q, j)) in found)
    return round(hits / max(len(truth), 1), 4)


def planted_recall(group: np.ndarray, label: np.ndarray) -> tuple[float, int, int]:
    """Fraction of planted pairs whose rows share a component, pairs missed, rows grouped outside plants."""
    planted = np.flatnonzero(label >= 0)
    lab, grp = label[planted], group[planted]
    total = hits = 0
    order = np.argsort(lab, kind="stable")
    lab, grp = lab[order], grp[order]
    bounds = np.flatnonzero(np.diff(lab)) + 1
    for g in np.split(grp, bounds):
        total += len(g) * (len(g) - 1) // 2
        _, counts = np.unique(g[g >= 0], return_counts=True)
        hits += int((counts * (counts - 1) // 2).sum())
    stray = int(((group >= 0) & (label < 0)).sum())
    return round(hits / max(total, 1), 6), total - hits, stray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--groups", type=int, default=20_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=2.0, help="background noise norm (cluster members ~1/(1+s^2))")
    ap.add_argument("--noise", type=float, default=0.5, help="copy noise norm (copies ~1/(1+noise^2) apart)")
    ap.add_argument("--k", default="64,16", help="k values to run, comma-separated")
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--kind", default="ivf_flat")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the index module's)")
    ap.add_argument("--method", default="scipy", choices=["scipy", "union_find"])
    ap.add_argument("--sample", type=int, default=2000, help="query rows checked against exact search")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from curate.dedup import copy_dedup
    from curate.index import IndexSpec, build_index

    load = os.getloadavg()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dedup-"))
    parts = root / "embed"
    parts.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        label = planted_layout(args.n, args.groups, args.seed)
        write_parts(parts, label, args.dim, args.clusters, args.spread, args.noise, args.seed)
        write_s = time.perf_counter() - t0
        ids = np.char.mod("%010d", np.arange(args.n))
        pixels = np.random.default_rng(args.seed).integers(1, 1000, args.n) * 1000
        rng = np.random.default_rng(args.seed + 1)
        planted, other = np.flatnonzero(label >= 0), np.flatnonzero(label < 0)
        half = min(args.sample // 2, len(planted))
        sample = np.sort(np.concatenate([rng.choice(planted, half, replace=False),
                                         rng.choice(other, args.sample - half, replace=False)]))

        t0 = time.perf_counter()
        index = build_index(parts, IndexSpec(kind=args.kind, nprobe=args.nprobe))
        build_s = time.perf_counter() - t0
        ks = [int(v) for v in args.k.split(",")]
        t0 = time.perf_counter()
        exact = exact_neighbours(parts, sample, max(ks))
        exact_s = time.perf_counter() - t0
        runs = []
        for k in ks:
            t0 = time.perf_counter()
            res = copy_dedup(parts, ids, pixels, k=k, threshold=args.threshold, index=index, method=args.method)
            dedup_s = time.perf_counter() - t0
            i, j, _ = res.edges
            truth = exact_edges(sample, *exact, k, args.threshold)
            recall, missed, stray = planted_recall(res.group, label)
            runs.append({"k": k, "copy_dedup_s": round(dedup_s, 1), "total_s": round(build_s + dedup_s, 1),
                         "pairs": res.stats["pairs"], "groups": res.stats["groups"],
                         "dropped": res.stats["dropped"], "largest_component": res.stats["largest_component"],
                         "planted_pair_recall": recall, "planted_pairs_missed": missed,
                         "rows_grouped_outside_plants": stray,
                         "edge_recall_vs_exact": pair_recall(i, j, truth, sample), "exact_pairs_checked": len(truth)})
        emit("dedup", n=args.n, dim=args.dim, groups=args.groups, planted_rows=int((label >= 0).sum()),
             threshold=args.threshold, kind=index.kind, nlist=index.spec.nlist, nprobe=index.nprobe,
             method=args.method, write_s=round(write_s, 1), exact_check_s=round(exact_s, 1),
             index_build_s=round(build_s, 1), runs=runs,
             peak_rss_mb=round(peak_rss_mb()), faiss_threads=faiss.omp_get_max_threads(),
             load_before=[round(v, 1) for v in load], load_after=[round(v, 1) for v in os.getloadavg()])
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
