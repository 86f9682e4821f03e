"""k-means over memory-mapped float16 embeddings: FAISS nearest-centroid search, our own Lloyd loop.

The per-iteration work is split into a pure map (`shard_step`: assign a block and sum it per
cluster in float64) and a reduce (`reduce_stats` + `update_centroids`), so that a distributed
driver can run the map over parts on workers; `lloyd` takes that driver as its `step_fn`
(step(centroids, out=None) -> StepStats; a pass that keeps its labels puts chunk i's labels and
distances into part i of `out`, an `kmeans_parts.Assignment`, in memory or in a directory).
Sums of float16 inputs in float64 are exact (every float16 is a multiple of 2**-24), so the
centroids do not depend on the chunk size, the number of workers or the reduction order.

Empty clusters: after a pass, each empty cluster (ascending id) is re-seeded at the point
farthest from its centroid in the largest remaining cluster (size desc, ties by id; one point
per donor, donors need >= 2 points); that point then sits at distance 0 from the new centroid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

from curate.kmeans_stats import (  # noqa: F401 (re-exported)
    StepAccumulator,
    StepStats,
    accumulate,
    farthest,
    partial_sums,
    reduce_stats,
)
from curate.kmeans_parts import Assignment, PartedRows, PartVectors, chunk_sizes, drop_pages
from curate.kmeans_pp import PP_SHARD_ROWS, PlusPlus, ShardFactory, sharded_plusplus
from curate.parts import list_parts

DEFAULT_CHUNK = 65_536
PP_FLOP_PER_THREAD = 1 << 24  # k-means++: a BLAS thread per this many multiply-adds of a chunk's product
Seed = int | Sequence[int]


@runtime_checkable
class Vectors(Protocol):
    """Rows of an n x dim matrix, read as float32 a chunk (or a set of rows) at a time."""

    n: int
    dim: int

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class ArrayVectors(PartedRows):
    """One or several 2-D arrays (in RAM or memory-mapped .npy parts) seen as one matrix, in order."""

    def __init__(self, arrays: np.ndarray | Sequence[np.ndarray]) -> None:
        self.arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        if not self.arrays or any(a.ndim != 2 for a in self.arrays):
            raise ValueError("ArrayVectors needs one or more 2-D arrays")
        dims = {int(a.shape[1]) for a in self.arrays}
        if len(dims) != 1:
            raise ValueError(f"parts disagree on the dimension: {sorted(dims)}")
        self.dim: int = dims.pop()
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)
        self.n: int = int(self.offsets[-1])

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> ArrayVectors:
        """Memory-map every part-XXXXX.npy of a directory, in part-number order."""
        paths = list_parts(directory, ".npy")
        if not paths:
            raise FileNotFoundError(f"no part-XXXXX.npy files in {directory}")
        return cls([np.load(p, mmap_mode="r") for p in paths])

    def part_rows(self, i: int, a: int = 0, b: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        arr = self.arrays[i]
        out = np.array(arr[a:b] if rows is None else arr[rows], dtype=np.float32)  # a copy, then the pages go
        drop_pages(arr)
        return out


def as_vectors(source: str | os.PathLike | np.ndarray | Sequence[np.ndarray] | Vectors) -> Vectors:
    """Adapt a directory of parts, an array (or list of arrays) or a Vectors object."""
    if isinstance(source, (str, os.PathLike)):
        return ArrayVectors.from_dir(source)
    if isinstance(source, np.ndarray) or (isinstance(source, (list, tuple)) and source):
        return ArrayVectors(source)
    if isinstance(source, (Vectors, PartVectors)):
        return source
    raise TypeError(f"cannot read vectors from {type(source).__name__}")


def use_gpu(gpu: bool | None = None) -> bool:
    """Whether to search on GPU: `gpu`, None meaning 'when faiss sees one'."""
    available = hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0
    return available if gpu is None else bool(gpu and available)


def make_index(centroids: np.ndarray, gpu: bool | None = None) -> faiss.Index:
    """Exact L2 index over the centroids, spread over all GPUs when there are any."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    return faiss.index_cpu_to_all_gpus(index) if use_gpu(gpu) else index


def assign_chunk(
    x: np.ndarray, centroids: np.ndarray, index: faiss.Index | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int32) and squared distance to it (float32) of each row of x.

    The distance is recomputed as ||x - c||^2, the same whichever faiss path (BLAS or not, GPU) ran.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    index = make_index(centroids) if index is None else index
    _, nearest = index.search(x, 1)
    labels = nearest[:, 0].astype(np.int32)
    diff = x - np.asarray(centroids, dtype=np.float32)[labels]
    return labels, np.einsum("ij,ij->i", diff, diff)


def shard_step(
    x: np.ndarray, centroids: np.ndarray, row_offset: int = 0, index: faiss.Index | None = None
) -> tuple[StepStats, np.ndarray, np.ndarray]:
    """The map of a Lloyd step on a block: (stats, labels, squared distances); rows are global."""
    k = len(centroids)
    labels, dists = assign_chunk(x, centroids, index)
    sums, counts = accumulate(x, labels, k)
    rows = np.arange(row_offset, row_offset + len(x), dtype=np.int64)
    far_dist, far_row = farthest(labels, dists, rows, k)
    return StepStats(sums, counts, float(dists.sum(dtype=np.float64)), far_dist, far_row), labels, dists


StepFn = Callable[..., StepStats]
"""step(centroids, out=None) -> StepStats: one assignment pass over all the points; when `out` (an Assignment
with the pass's part sizes) is given, every part's labels and squared distances are put into it."""


def local_step_fn(vectors: Vectors, chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None) -> StepFn:
    """A step function running shard_step chunk by chunk in this process; chunk i's labels are part i of `out`
    (whose layout is chunk_sizes(n, chunk_size))."""

    def step(centroids: np.ndarray, out: Assignment | None = None) -> StepStats:
        index = make_index(centroids, gpu)
        k = len(centroids)
        total = StepAccumulator(k, vectors.dim)
        for i, (start, x) in enumerate(vectors.chunks(chunk_size)):
            lab, d = assign_chunk(x, centroids, index)
            if out is not None:
                out.put(i, lab, d)
            counts = np.bincount(lab, minlength=k)
            _, partial = partial_sums(x, lab, counts)
            rows = np.arange(start, start + len(x), dtype=np.int64)
            total.add(counts, partial, float(d.sum(dtype=np.float64)), *farthest(lab, d, rows, k))
        if total.stats is None:
            raise ValueError("no vectors to cluster")
        return total.result()

    return step


def assign_all(step: StepFn, centroids: np.ndarray, n: int, chunk_size: int = DEFAULT_CHUNK) -> tuple[
        StepStats, np.ndarray, np.ndarray]:
    """(stats, labels, squared distances) of a pass over n rows read chunk_size at a time, labels in memory."""
    out = Assignment(chunk_sizes(n, chunk_size))
    stats = step(centroids, out)
    return (stats, *out.arrays())


def part_step(
    source: np.ndarray | str | os.PathLike | Vectors, centroids: np.ndarray, row_offset: int = 0,
    chunk_size: int = DEFAULT_CHUNK, gpu: bool | None = None,
) -> tuple[StepStats, np.ndarray, np.ndarray]:
    """shard_step over a whole part (e.g. one memory-mapped .npy on a worker), chunk by chunk; global rows."""
    vectors = as_vectors(source)
    stats, labels, dists = assign_all(local_step_fn(vectors, chunk_size, gpu), centroids, vectors.n, chunk_size)
    stats.far_row[stats.far_row >= 0] += row_offset
    return stats, labels, dists


def update_centroids(
    stats: StepStats, old: np.ndarray, take: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, list[int]]:
    """(new centroids, repaired ids): float64 means, and empty clusters re-seeded as the module says.

    take(rows) fetches the donors' farthest points; without it an empty cluster keeps its centroid.
    """
    new = np.asarray(old, dtype=np.float32).copy()
    full = stats.counts > 0
    new[full] = (stats.sums[full] / stats.counts[full, None]).astype(np.float32)
    empty = np.flatnonzero(~full)
    if len(empty) == 0 or take is None:
        return new, []
    by_size = np.argsort(-stats.counts, kind="stable")
    donors = [int(c) for c in by_size if stats.counts[c] >= 2 and stats.far_row[c] >= 0]
    pairs = list(zip(empty.tolist(), donors))
    if pairs:
        new[[e for e, _ in pairs]] = take(np.array([stats.far_row[d] for _, d in pairs], dtype=np.int64))
    return new, [e for e, _ in pairs]


def _rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(list(seed) if isinstance(seed, (list, tuple)) else seed)


def init_sample(vectors: Vectors, size: int, seed: Seed) -> np.ndarray:
    """float32 rows of a deterministic uniform sample (sorted rows) of min(size, n) vectors."""
    if size >= vectors.n:
        return vectors.take(np.arange(vectors.n))
    rows = np.sort(_rng(seed).choice(vectors.n, size=size, replace=False))
    return vectors.take(rows)


def kmeans_plusplus(
    x: np.ndarray, k: int, seed: Seed, chunk_size: int = DEFAULT_CHUNK, n_candidates: int | None = None,
    blas_threads: int | str | None = "auto", shard_rows: int = PP_SHARD_ROWS, shards: ShardFactory | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeding on in-memory rows x: at each step draw n_candidates points by D^2
    sampling (default 2 + ln k) and keep the one that lowers the potential most (1: plain k-means++).

    The rows are cut into shards of `shard_rows` (curate.kmeans_pp), run in this process or by `shards`
    (e.g. one Ray actor each); up to shard_rows points, one shard. Its matrix products are thin (a chunk
    of rows x dim x a few candidates); where one is small, BLAS threads cost more than they give. In this
    process they run on `blas_threads` threads: "auto" gives one thread per PP_FLOP_PER_THREAD of a
    chunk's product, up to the cores (1 on small samples, all cores on a paper-scale level 2), None
    BLAS's own setting. A gemm's elements do not depend on how its threads split it, so the centres are
    the same (tested).
    """
    from threadpoolctl import threadpool_limits

    def seeded() -> np.random.Generator:
        return _rng(seed)

    if blas_threads == "auto":
        trials = n_candidates or 2 + int(np.log(max(k, 1)))
        work = min(len(x), chunk_size, shard_rows) * (x.shape[1] if x.ndim == 2 else 1) * trials
        blas_threads = int(max(1, min(os.cpu_count() or 1, work // PP_FLOP_PER_THREAD)))
    if blas_threads is None:
        return sharded_plusplus(x, k, seeded, chunk_size, n_candidates, shard_rows, shards)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return sharded_plusplus(x, k, seeded, chunk_size, n_candidates, shard_rows, shards)


def init_sample_rows(n: int, k: int, sample_size: int | None = None) -> int:
    """Rows of the deterministic sample k-means++ seeds on: sample_size, default max(8k, 4096), capped at n."""
    return min(n, sample_size or max(8 * k, 4096))


def initial_centroids(
    vectors: Vectors, k: int, method: str = "kmeans++", seed: Seed = 0, sample_size: int | None = None,
    pp: PlusPlus | None = None,
) -> np.ndarray:
    """k initial centroids by k-means++ (its shards as `pp` says) or random rows, drawn from a deterministic sample.

    The default sample is max(8k, 4096) rows (capped at n): k-means++ costs k passes over it.
    """
    if k < 1 or k > vectors.n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={vectors.n}")
    size = init_sample_rows(vectors.n, k, sample_size)
    seeds = [*((seed,) if isinstance(seed, int) else seed)]
    x = init_sample(vectors, max(size, k), [*seeds, 1])
    if method == "kmeans++":
        pp = pp or PlusPlus()
        return kmeans_plusplus(x, k, [*seeds, 2], shard_rows=pp.shard_rows, shards=pp.shards)
    if method == "random":
        return x[np.sort(_rng([*seeds, 2]).choice(len(x), size=k, replace=False))].copy()
    raise ValueError(f"unknown init {method!r} (kmeans++ | random)")


@dataclass
class KMeansResult:
    """Centroids, the final assignment and the objective (inertia) of every assignment pass."""

    centroids: np.ndarray  # float32 [k, d]
    assignment: Assignment  # per part: nearest final centroid (int32) and squared distance to it (float32)
    objective: list[float] = field(default_factory=list)  # inertia per iteration, then of the final pass
    repaired: list[int] = field(default_factory=list)  # empty clusters re-seeded, all iterations

    @property
    def labels(self) -> np.ndarray:
        """int32 [n]: nearest final centroid of every point (all parts concatenated)."""
        return self.assignment.arrays()[0]

    @property
    def sq_dists(self) -> np.ndarray:
        """float32 [n]: squared distance of every point to its centroid."""
        return self.assignment.arrays()[1]


def lloyd(
    vectors: Vectors | np.ndarray | str | os.PathLike,
    init_centroids: np.ndarray,
    n_iters: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    gpu: bool | None = None,
    step_fn: StepFn | None = None,
    on_iter: Callable[[int, np.ndarray, float], None] | None = None,
    out: Assignment | None = None,
) -> KMeansResult:
    """n_iters Lloyd updates from init_centroids, then a final assignment pass (n_iters + 1 passes).

    step_fn (StepFn) replaces the local pass (e.g. a Ray map + reduce); the final pass's labels go to `out`
    (e.g. an Assignment directory), in memory when it is None.
    """
    vectors = as_vectors(vectors)
    step = step_fn or local_step_fn(vectors, chunk_size, gpu)
    centroids = np.asarray(init_centroids, dtype=np.float32).copy()
    objective: list[float] = []
    repaired: list[int] = []
    for it in range(n_iters):
        stats = step(centroids)
        objective.append(stats.inertia)
        centroids, fixed = update_centroids(stats, centroids, vectors.take)
        repaired += fixed
        if on_iter is not None:
            on_iter(it, centroids, stats.inertia)
    assignment = out if out is not None else Assignment(chunk_sizes(vectors.n, chunk_size))
    stats = step(centroids, assignment)
    objective.append(stats.inertia)
    return KMeansResult(centroids, assignment, objective, repaired)


def kmeans(
    vectors: Vectors | np.ndarray | str | os.PathLike,
    k: int,
    n_iters: int = 20,
    *,
    init: str = "kmeans++",
    seed: Seed = 0,
    init_sample_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    gpu: bool | None = None,
    step_fn: StepFn | None = None,
    out: Assignment | None = None,
    pp: PlusPlus | None = None,
) -> KMeansResult:
    """k-means: seeded init on a deterministic sample (k-means++ as `pp` says), then `lloyd`; same seed -> same
    result."""
    vectors = as_vectors(vectors)
    c0 = initial_centroids(vectors, k, init, seed, init_sample_size, pp)
    return lloyd(vectors, c0, n_iters, chunk_size=chunk_size, gpu=gpu, step_fn=step_fn, out=out)
