"""Benchmark exact pHash near-duplicate search (phash_pairs) and its connected components at scale.

Builds n random 64-bit hashes with planted near-duplicate groups (copies at Hamming distance
1..max_distance from a base hash) plus one block of identical hashes, then for each search
setting times phash_pairs + connected components and records peak RSS. A brute-force numpy
check on a sample of queries shows that every brute-force pair is found (and nothing else),
that every planted pair is found, and gives the extrapolated brute-force time for all n.
Prints one JSON line.

Run: python bench/hashdedup.py [--n 1000000] [--tables 3,4,5]
"""

from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np
from _common import emit, peak_rss_mb
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.hashing import (
    DEFAULT_MAX_DISTANCE,
    choose_plan,
    dedup,
    hamming_u64,
    phash_pairs,
)

_BIT = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def flip_masks(rng: np.random.Generator, distances: np.ndarray) -> np.ndarray:
    """One uint64 mask per entry with exactly distances[k] random bits set."""
    keys = rng.random((len(distances), 64))
    kth = np.sort(keys, axis=1)[np.arange(len(distances)), distances - 1]
    bits = keys <= kth[:, None]
    return (bits * _BIT).sum(axis=1, dtype=np.uint64)


def make_hashes(
    n: int, groups: int, max_distance: int, identical: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled hashes with planted groups; returns hashes and the planted (base, copy) pairs."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, groups)  # 1..3 copies per base
    n_copies = int(sizes.sum())
    values = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    base = np.arange(groups)
    copy_pos = np.arange(groups, groups + n_copies)
    copy_base = np.repeat(base, sizes)
    dist = rng.integers(1, max(max_distance, 1) + 1, n_copies)
    values[copy_pos] = values[copy_base] ^ flip_masks(rng, dist)
    block = np.arange(groups + n_copies, groups + n_copies + identical)
    values[block] = values[block[0]] if identical else values[block]
    perm = rng.permutation(n)
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)
    return values[perm], where[copy_base], where[copy_pos]


def run_setting(values: np.ndarray, max_distance: int, tables: int | None) -> dict:
    """Time phash_pairs + connected components for one search setting."""
    t0, c0 = time.perf_counter(), time.process_time()
    i, j, d = phash_pairs(values, max_distance, tables=tables)
    t1, c1 = time.perf_counter(), time.process_time()
    n = len(values)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    ncomp, _ = connected_components(graph, directed=False)
    t2 = time.perf_counter()
    return {
        "pairs": (i, j, d),
        "row": {
            "tables": "auto" if tables is None else tables,
            "pairs_s": round(t1 - t0, 2),
            "pairs_cpu_s": round(c1 - c0, 2),
            "components_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2),
            "n_pairs": int(len(i)),
            "n_components": int(ncomp),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }


def time_dedup(values: np.ndarray, max_distance: int) -> dict:
    """Time the full dedup() on string ids, sha256 stand-ins (identical hashes share one) and
    pixel counts, as the hashdedup stage calls it."""
    n = len(values)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    ids = [f"img{k:07d}" for k in range(n)]
    sha = [f"sha{k}" for k in first[inverse.reshape(-1)].tolist()]
    pixels = np.random.default_rng(0).integers(10_000, 1_000_000, n)
    t0 = time.perf_counter()
    result = dedup(ids, sha, values, pixels, max_distance)
    seconds = time.perf_counter() - t0
    reasons = np.array([r or "" for r in result.reason])
    return {
        "dedup_s": round(seconds, 2),
        "dedup_kept": int(result.keep.sum()),
        "dedup_exact": int(np.sum(reasons == "exact")),
        "dedup_near": int(np.sum(reasons == "near")),
        "dedup_groups": int(result.group.max() + 1),
    }


def flat_estimate(values: np.ndarray, max_distance: int, n_queries: int) -> float:
    """Seconds an IndexBinaryFlat all-pairs search would take, from a timed sample of queries.

    phash_pairs compares each value only with later chunks, so the full run is about half of
    n range queries against all n values.
    """
    uniq = np.unique(values)
    codes = uniq.astype("<u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    t0 = time.perf_counter()
    index.range_search(codes[:n_queries], max_distance + 1)
    return (time.perf_counter() - t0) / n_queries * len(uniq) / 2


def brute_force_check(
    values: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    queries: np.ndarray,
    max_distance: int,
) -> dict:
    """Compare phash_pairs with numpy brute force for the given query indices.

    phash_pairs reports pairs between the representatives (smallest index) of distinct hash
    values, so brute-force pairs are mapped to representatives before comparing.
    """
    n = len(values)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rep = first.astype(np.int64)[inverse.reshape(-1)]
    t0 = time.perf_counter()
    bq, bk = [], []
    for start in range(0, len(queries), 16):
        q = queries[start : start + 16]
        hit = hamming_u64(values[q][:, None], values[None, :]) <= max_distance
        r, k = np.nonzero(hit)
        bq.append(q[r])
        bk.append(k)
    brute_s = time.perf_counter() - t0
    bq, bk = np.concatenate(bq), np.concatenate(bk)
    distinct = values[bq] != values[bk]
    a, b = rep[bq[distinct]], rep[bk[distinct]]
    brute = np.unique(np.minimum(a, b) * n + np.maximum(a, b))

    i, j, d = pairs
    found = i * n + j
    qreps = np.unique(rep[queries])
    mine = np.isin(i, qreps) | np.isin(j, qreps)
    reported = np.unique(found[mine & (d > 0)])
    dist_ok = bool(np.all(hamming_u64(values[i], values[j]) == d) and np.all(d <= max_distance))
    return {
        "brute_queries": int(len(queries)),
        "brute_pairs": int(len(brute)),
        "brute_pairs_found": int(np.isin(brute, found).sum()),
        "reported_pairs_not_in_brute": int((~np.isin(reported, brute)).sum()),
        "distances_exact": dist_ok,
        "brute_s_per_query": brute_s / len(queries),
        "brute_s_all_n": round(brute_s / len(queries) * n, 1),
        "_found": found,
        "_rep": rep,
    }


def main() -> None:
    """Generate hashes, time every requested setting, check exactness, print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE)
    ap.add_argument("--groups", type=int, default=20_000, help="planted near-duplicate groups")
    ap.add_argument("--identical", type=int, default=10_000, help="copies of one single hash")
    ap.add_argument("--tables", default="3,4,5", help="settings: auto, 0 (flat) or m tables")
    ap.add_argument("--sample", type=int, default=2000, help="brute-force query sample")
    ap.add_argument("--flat-queries", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = args.max_distance

    values, planted_a, planted_b = make_hashes(args.n, args.groups, r, args.identical, args.seed)
    rss_data = peak_rss_mb()
    settings = [None if t == "auto" else int(t) for t in args.tables.split(",")]
    rows, pairs = [], None
    for tables in settings:
        res = run_setting(values, r, tables)
        rows.append(res["row"])
        if pairs is None:
            pairs = res["pairs"]
        elif not np.array_equal(np.stack(pairs[:2]), np.stack(res["pairs"][:2])):
            raise SystemExit(f"setting {tables} returned different pairs")

    full = time_dedup(values, r)
    rng = np.random.default_rng(args.seed + 1)
    half = args.sample // 2
    queries = np.unique(
        np.concatenate(
            [rng.choice(planted_b, half, replace=False), rng.choice(args.n, half, replace=False)]
        )
    )
    check = brute_force_check(values, pairs, queries, r)
    found, rep = check.pop("_found"), check.pop("_rep")
    pa, pb = rep[planted_a], rep[planted_b]
    planted = np.minimum(pa, pb) * args.n + np.maximum(pa, pb)
    planted_recall = float(np.mean((pa == pb) | np.isin(planted, found)))

    auto = choose_plan(len(np.unique(values)), r)
    best = min(rows, key=lambda row: row["total_s"])
    flat_s = flat_estimate(values, r, args.flat_queries)
    emit(
        "hashdedup",
        n=args.n,
        max_distance=r,
        planted_groups=args.groups,
        planted_pairs=int(len(planted_a)),
        identical_block=args.identical,
        auto_plan={"tables": auto.tables, "bits": auto.bits, "nflip": auto.nflip},
        settings=rows,
        best_tables=best["tables"],
        planted_recall=planted_recall,
        **full,
        **check,
        faiss_flat_est_s=round(flat_s, 1),
        speedup_vs_numpy_brute=round(check["brute_s_all_n"] / best["total_s"], 1),
        rss_after_data_mb=round(rss_data, 1),
        peak_rss_mb=round(peak_rss_mb(), 1),
        threads=faiss.omp_get_max_threads(),
        loadavg_1m=round(os.getloadavg()[0], 2),
    )


if __name__ == "__main__":
    main()
