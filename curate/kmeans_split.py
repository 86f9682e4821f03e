"""Split mode of a k-means level (the reference's layout for a huge level): k-means with `split` clusters,
then cluster j of n_j points gets k_j sub-clusters (`apportion`: largest remainder, 1 <= k_j <= n_j) and a
k-means inside it. Its work runs as jobs (a curate Mapper's, e.g. Ray tasks): the splits' points routed to
buckets of consecutive splits in one pass over the coarse labels (`route_chunks`), one job per bucket
running the k-means inside its splits (`fit_bucket`), the labels inside the splits gathered back per chunk
(`within_chunk`); through files in a scratch directory, or in memory. The driver holds O(splits + clusters).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curate.kmeans import DEFAULT_CHUNK, Seed, StepFn, Vectors, kmeans
from curate.kmeans_parts import Assignment, chunk_sizes, npy_header, save_npy_atomic
from curate.kmeans_pp import PlusPlus

if TYPE_CHECKING:
    from curate.kmeans_tree import LevelSpec


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split `total` sub-clusters over clusters of `sizes`: largest remainder, 1 <= k_j <= size_j."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n, live = int(sizes.sum()), int((sizes > 0).sum())
    if not live <= total <= n:
        raise ValueError(f"cannot split into {total} clusters: {live} non-empty clusters, {n} points")
    ks = np.clip(total * sizes // n, (sizes > 0).astype(np.int64), sizes)
    while (diff := total - int(ks.sum())) != 0:
        gap = total * sizes - ks * n  # n * (exact quota - k_j), an integer
        if diff > 0:
            cand = np.flatnonzero(ks < sizes)
            pick = cand[np.argsort(-gap[cand], kind="stable")][:diff]
            ks[pick] += 1
        else:
            cand = np.flatnonzero(ks > 1)
            pick = cand[np.argsort(gap[cand], kind="stable")][:-diff]
            ks[pick] -= 1
    return ks



ROUTE_CHUNKS = 64  # chunks of coarse labels one routing job reads
BUCKET_POINTS = (1 << 16, 1 << 23)  # a bucket of consecutive splits holds ~n/64 points, within these bounds


def split_buckets(split_sizes: np.ndarray, bucket_points: int) -> np.ndarray:
    """Edges of buckets of consecutive splits, each of at most `bucket_points` points (or one split)."""
    edges, total = [0], 0
    for j, size in enumerate(np.asarray(split_sizes, dtype=np.int64).tolist()):
        if total and total + size > bucket_points:
            edges.append(j)
            total = 0
        total += size
    edges.append(len(split_sizes))
    return np.asarray(edges, dtype=np.int64)


def route_chunks(assign_dir: str | None, sizes: np.ndarray, edges: np.ndarray, first_chunk: int, last_chunk: int,
                 out_dir: str | None, job: int, labels_of: Sequence[np.ndarray] | None = None) -> list | None:
    """One routing job of split mode: the points of chunks [first_chunk, last_chunk) of the coarse assignment
    (a directory, or `labels_of` in memory) sent to their bucket of splits, as (global rows, split) in row
    order; written as route-{job}-{bucket}.npy files in out_dir (a task's output), else returned per bucket."""
    coarse = Assignment(sizes, assign_dir) if assign_dir is not None else None
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows, labels = [], []
    for i in range(first_chunk, last_chunk):
        lab = labels_of[i] if labels_of is not None else coarse.get(i)[0]
        rows.append(np.arange(len(lab), dtype=np.int64) + offsets[i])
        labels.append(np.asarray(lab, dtype=np.int64))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    bucket = np.searchsorted(edges, labels, side="right") - 1
    order = np.argsort(bucket, kind="stable")  # rows stay ascending inside each bucket
    cuts = np.searchsorted(bucket[order], np.arange(len(edges)))
    out = []
    for b in range(len(edges) - 1):
        take = order[cuts[b] : cuts[b + 1]]
        pair = np.stack([rows[take], labels[take]])
        if out_dir is None:
            out.append(pair)
        elif len(take):
            save_npy_atomic(Path(out_dir) / f"route-{job:05d}-{b:05d}.npy", pair)
    return out if out_dir is None else None


def fit_bucket(data: Vectors, spec: LevelSpec, seed: Seed, chunk_size: int, gpu: bool | None, ks: np.ndarray,
               first: np.ndarray, within: bool, out_dir: str | None, bucket: int, lo: int, hi: int,
               routed: Sequence[np.ndarray] | None = None, n_jobs: int = 0) -> tuple[dict, tuple | None]:
    """The k-means inside each split j in [lo, hi) of one bucket (k = ks[j], seeded by (seed, 1, j), on the
    split's points in row order): {split: centroids}, and with `within` the bucket's (rows, labels, squared
    distances) in row order; with out_dir (a task's output) written there as centroids-{bucket}.npy (the
    splits' centroids in split order; {} returned) and within-{rows,labels,dists}-{bucket}.npy."""
    parts = routed if routed is not None else [
        np.load(f) for f in (Path(out_dir) / f"route-{m:05d}-{bucket:05d}.npy" for m in range(n_jobs)) if f.exists()]
    pairs = np.concatenate([p for p in parts if p.shape[1]], axis=1) if parts else np.zeros((2, 0), np.int64)
    rows, labels = pairs[0], pairs[1]
    order = np.argsort(labels, kind="stable")  # each split's rows ascending, as they came
    cuts = np.searchsorted(labels[order], np.arange(lo, hi + 1))
    centroids, sub_labels, sub_dists = {}, np.zeros(len(rows), np.int32), np.zeros(len(rows), np.float32)
    for j in range(lo, hi):
        if not ks[j]:
            continue
        at = order[cuts[j - lo] : cuts[j - lo + 1]]
        sub = kmeans(data.take(rows[at]), int(ks[j]), spec.n_iters, init=spec.init, seed=[*seed, 1, int(j)],
                     init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu)
        centroids[j] = sub.centroids
        if within:
            sub_labels[at], sub_dists[at] = (sub.labels + int(first[j])).astype(np.int32), sub.sq_dists
    if out_dir is not None:  # a task's output: the bucket's centroids in split order, not through the driver
        save_npy_atomic(Path(out_dir) / f"centroids-{bucket:05d}.npy",
                        np.concatenate([centroids[j] for j in sorted(centroids)]) if centroids
                        else np.zeros((0, data.dim), np.float32))
        centroids = {}
    if not within:
        return centroids, None
    by_row = np.argsort(rows, kind="stable")
    triple = (rows[by_row], sub_labels[by_row], sub_dists[by_row])
    if out_dir is None:
        return centroids, triple
    d = Path(out_dir)
    save_npy_atomic(d / f"within-rows-{bucket:05d}.npy", triple[0])
    save_npy_atomic(d / f"within-labels-{bucket:05d}.npy", triple[1])
    save_npy_atomic(d / f"within-dists-{bucket:05d}.npy", triple[2])
    return centroids, None


def within_chunk(out_dir: str | None, n_buckets: int, i: int, start: int, size: int, assign_dir: str | None,
                 sizes: np.ndarray, triples: Sequence[tuple] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Chunk i's labels and distances inside its splits, gathered from every bucket's rows (binary search in
    each bucket's sorted rows); written to the Assignment directory (a task's output) or returned."""
    labels, dists = np.zeros(size, dtype=np.int32), np.zeros(size, dtype=np.float32)
    for b in range(n_buckets):
        if triples is not None:
            rows, lab, dist = triples[b]
        else:
            path = Path(out_dir) / f"within-rows-{b:05d}.npy"
            if not path.exists():  # an empty bucket
                continue
            rows = np.load(path, mmap_mode="r")
            lab = np.load(Path(out_dir) / f"within-labels-{b:05d}.npy", mmap_mode="r")
            dist = np.load(Path(out_dir) / f"within-dists-{b:05d}.npy", mmap_mode="r")
        lo, hi = np.searchsorted(rows, [start, start + size])
        where = np.asarray(rows[lo:hi]) - start
        labels[where], dists[where] = lab[lo:hi], dist[lo:hi]
    if assign_dir is None:
        return labels, dists
    Assignment(sizes, assign_dir).put(i, labels, dists)
    return None


def split_fit(
    data: Vectors, spec: LevelSpec, seed: Seed, step: StepFn, chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None,
    within: Assignment | None = None, scratch: str | os.PathLike | None = None, mapper=None,
    pp: PlusPlus | None = None,
) -> tuple[np.ndarray, list[float]]:
    """k-means with spec.split clusters, then k-means with apportion(sizes) clusters inside each one.

    `within` (an Assignment) receives the labels and squared distances of every point inside its own split.
    The splits' points are routed to buckets of consecutive splits (one pass over the coarse labels, in jobs
    of ROUTE_CHUNKS chunks), each bucket's k-means run by one job, and the within labels gathered back per
    chunk; with `scratch` (a directory) all of it goes through files there (removed at the end), so the jobs
    can be `mapper`'s tasks (e.g. Ray: the driver then holds O(splits + clusters)); without it, in memory.
    `pp` shards the coarse fit's k-means++ (the fits inside the splits run in their jobs)."""
    from curate.parts import map_in_order

    sizes = chunk_sizes(data.n, chunk_size)
    tmp = Path(scratch) if scratch is not None else None
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    coarse_out = Assignment(sizes, tmp / "coarse" if tmp is not None else None)
    coarse = kmeans(data, spec.split, spec.n_iters, init=spec.init, seed=[*seed, 0],
                    init_sample_size=spec.init_sample_size, chunk_size=chunk_size, gpu=gpu, step_fn=step,
                    out=coarse_out, pp=pp)
    split_sizes = coarse_out.counts(spec.split)
    ks = apportion(split_sizes, spec.n_clusters)
    first = np.concatenate([[0], np.cumsum(ks)]).astype(np.int64)  # each split's first sub-cluster
    edges = split_buckets(split_sizes, int(np.clip(data.n // 64, *BUCKET_POINTS)))
    n_buckets, mapper = len(edges) - 1, mapper if tmp is not None else None  # in memory: here
    route_jobs = [(int(c), int(min(c + ROUTE_CHUNKS, len(sizes)))) for c in range(0, len(sizes), ROUTE_CHUNKS)]
    want_within = within is not None
    if tmp is None:  # in memory: the same jobs, their outputs passed along
        labels_of = [coarse_out.get(i)[0] for i in range(len(sizes))]
        routed = [route_chunks(None, sizes, edges, a, b, None, m, labels_of) for m, (a, b) in enumerate(route_jobs)]
        fits = [fit_bucket(data, spec, seed, chunk_size, gpu, ks, first, want_within, None, b, int(edges[b]),
                           int(edges[b + 1]), [r[b] for r in routed]) for b in range(n_buckets)]
    else:
        routes = tmp / "routes"
        routes.mkdir(parents=True, exist_ok=True)
        map_in_order(mapper, route_chunks, [(str(coarse_out.dir), sizes, edges, a, b, str(routes), m)
                                            for m, (a, b) in enumerate(route_jobs)])
        fits = map_in_order(mapper, fit_bucket, [(want_within, str(routes), b, int(edges[b]), int(edges[b + 1]), None,
                                                  len(route_jobs)) for b in range(n_buckets)],
                            (data, spec, seed, chunk_size, gpu, ks, first))
    centroids = {j: c for fit, _ in fits for j, c in fit.items()}  # in memory only; through files: {}
    if want_within:
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if tmp is None or within.dir is None:
            triples = [t for _, t in fits] if tmp is None else None
            for i in range(len(sizes)):
                within.put(i, *within_chunk(str(tmp / "routes") if tmp is not None else None, n_buckets, i,
                                            int(offsets[i]), int(sizes[i]), None, sizes, triples))
        else:
            map_in_order(mapper, within_chunk, [(str(tmp / "routes"), n_buckets, i, int(offsets[i]), int(sizes[i]),
                                                 str(within.dir), sizes) for i in range(len(sizes))])
    if tmp is None:
        return np.concatenate([centroids[j] for j in sorted(centroids)]), coarse.objective
    path = gathered_path(tmp)
    gather_npy([tmp / "routes" / f"centroids-{b:05d}.npy" for b in range(n_buckets)], int(ks.sum()), data.dim, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return np.load(path, mmap_mode="r"), coarse.objective


def gathered_path(scratch: str | os.PathLike) -> Path:
    """Where split_fit with a scratch directory gathers the level's centroids: beside the scratch (which it
    removes), for the caller to map and then remove."""
    return Path(f"{scratch}-centroids.npy")


def gather_npy(paths: Sequence[Path], rows: int, dim: int, out: Path) -> None:
    """Concatenate float32 [*, dim] .npy files into one at `out` (atomically), one file in memory at a time."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        npy_header(fh, (rows, dim), np.float32)
        done = 0
        for p in paths:
            a = np.ascontiguousarray(np.load(p), dtype=np.float32)
            fh.write(a.tobytes())
            done += len(a)
        fh.flush()
        os.fsync(fh.fileno())
    if done != rows:
        tmp.unlink()
        raise ValueError(f"split mode gathered {done} centroids, expected {rows}")
    os.replace(tmp, out)
